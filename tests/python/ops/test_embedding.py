import numpy as np
import pytest

from op_testing import DTYPES, Guarded, args, from_storage, run, to_storage


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,vocab", [(1, 1, 1), (5, 7, 11), (33, 64, 1000), (3, 576, 49)])
@pytest.mark.parametrize("scale", [1.0, 24.0])  # Gemma scales embeddings by sqrt(hidden)
def test_embedding(dev, dtype, tokens, hidden, vocab, scale):
    rng = np.random.default_rng(tokens + hidden)
    table = to_storage(rng.standard_normal((vocab, hidden)), dtype)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    ids[-1] = vocab - 1
    out = Guarded((tokens, hidden))
    run(dev, f"embedding_{dtype}", args("EmbeddingArgs", num_tokens=tokens, hidden=hidden, vocab=vocab,
                                                 scale=scale), [ids, table, out.array])
    np.testing.assert_array_equal(out.array, from_storage(table, dtype)[ids].astype(np.float32) * np.float32(scale))
    out.check_guards()
