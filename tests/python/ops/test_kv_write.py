import numpy as np
import pytest

from op_testing import DTYPES, Guarded, args, from_storage, run, to_storage


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kv_heads,hd,block_size,blocks", [(1, 1, 2, 1, 1), (7, 2, 16, 16, 3), (20, 3, 64, 8, 5)])
def test_kv_write(dev, dtype, tokens, kv_heads, hd, block_size, blocks):
    rng = np.random.default_rng(tokens)
    num_slots = blocks * block_size
    slots = rng.permutation(num_slots)[:tokens].astype(np.int64) if tokens <= num_slots else None
    slots[0] = -1  # skipped
    k = rng.standard_normal((tokens, kv_heads * hd)).astype(np.float32)
    v = rng.standard_normal((tokens, kv_heads * hd)).astype(np.float32)
    storage = to_storage(np.zeros(1), dtype).dtype
    kc = Guarded((blocks, block_size, kv_heads, hd), dtype=storage)
    vc = Guarded((blocks, block_size, kv_heads, hd), dtype=storage)
    a = args("KVWriteArgs", num_tokens=tokens, num_kv_heads=kv_heads, head_dim=hd, block_size=block_size,
             num_slots=num_slots, k_stride=kv_heads * hd, v_stride=kv_heads * hd)
    run(dev, f"kv_write_{dtype}", a, [k, v, slots, kc.array, vc.array])
    kf = from_storage(kc.array, dtype).reshape(num_slots, kv_heads * hd)
    vf = from_storage(vc.array, dtype).reshape(num_slots, kv_heads * hd)
    written = slots >= 0
    np.testing.assert_array_equal(kf[slots[written]], from_storage(to_storage(k[written], dtype), dtype))
    np.testing.assert_array_equal(vf[slots[written]], from_storage(to_storage(v[written], dtype), dtype))
    untouched = np.setdiff1d(np.arange(num_slots), slots[written])
    assert not kf[untouched].any() and not vf[untouched].any()
    kc.check_guards()
    vc.check_guards()
