"""Paged attention over shuffled, non-contiguous blocks against dense attention over the gathered K/V."""

import numpy as np
import pytest

from op_testing import DTYPES, Guarded, args, from_storage, run, to_storage


def dense_reference(q, k, v, q_lens, seq_lens, scale, window, softcap=0.0):
    """q [T, H, D]; k, v per sequence [L, KVH, D] (float64). Causal, GQA, optional sliding window."""
    out = np.zeros_like(q)
    H, KVH = q.shape[1], k[0].shape[1]
    t = 0
    for s, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        for i in range(ql):
            p = sl - ql + i
            lo = max(0, p - window + 1) if window > 0 else 0
            for h in range(H):
                g = h // (H // KVH)
                sc = k[s][lo : p + 1, g] @ q[t, h] * scale
                if softcap:
                    sc = softcap * np.tanh(sc / softcap)
                w = np.exp(sc - sc.max())
                out[t, h] = (w / w.sum()) @ v[s][lo : p + 1, g]
            t += 1
    return out


CASES = [  # (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window)
    ([1], [1], 1, 1, 8, 1, 0),                     # smallest
    ([5, 1, 1], [5, 9, 33], 4, 2, 16, 4, 0),       # a prefill and two decode rows in one step
    ([7], [20], 8, 2, 64, 16, 0),                  # a chunk continuing over cached pages
    ([13, 2], [13, 40], 9, 3, 64, 16, 5),          # sliding window smaller than the prompt
    ([3, 1], [3, 70], 2, 1, 128, 8, 0),            # head_dim 128
    ([6], [6], 3, 3, 24, 5, 0),                    # MHA, odd block size
    ([2, 1], [11, 30], 4, 1, 20, 4, 0),            # head_dim not a multiple of 8 (no vector path)
    ([1, 1, 1], [25, 64, 8], 6, 2, 80, 16, 0),     # head_dim 80: a 64-wide and a 16-wide piece of V
    # long prefill chunks (the BLAS path where one is present: 16+ rows of a sequence, 64-row pieces)
    ([40], [40], 4, 2, 16, 16, 0),                 # a whole prompt
    ([20, 1, 33], [50, 7, 33], 9, 3, 64, 16, 7),   # a chunk over cached pages, a decode row, a window
    ([150], [170], 2, 1, 64, 8, 0),                # several 64-row pieces after 20 cached tokens
    ([17], [17], 6, 2, 128, 16, 9),                # head_dim 128 with a window
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens,seq_lens,heads,kv_heads,hd,bs,window", CASES)
@pytest.mark.parametrize("softcap", [0.0, 1.5])  # Gemma 2's tanh softcapping of the scores
def test_paged_attention(dev, dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, softcap):
    rng = np.random.default_rng(sum(seq_lens) + hd)
    S, T = len(q_lens), sum(q_lens)
    nblocks = [-(-l // bs) for l in seq_lens]
    num_blocks = sum(nblocks) + 3
    perm = rng.permutation(num_blocks)  # shuffled physical blocks
    tables, i = [], 0
    for n in nblocks:
        tables.append(perm[i : i + n])
        i += n
    width = max(nblocks) + 1
    bt = np.full((S, width), -1, np.int32)
    for s, tb in enumerate(tables):
        bt[s, : len(tb)] = tb
    k_seq = [rng.standard_normal((l, kv_heads, hd)) for l in seq_lens]
    v_seq = [rng.standard_normal((l, kv_heads, hd)) for l in seq_lens]
    storage = to_storage(np.zeros(1), dtype).dtype
    kc = np.zeros((num_blocks, bs, kv_heads, hd), storage)
    vc = np.zeros((num_blocks, bs, kv_heads, hd), storage)
    for s, l in enumerate(seq_lens):
        for p in range(l):
            kc[tables[s][p // bs], p % bs] = to_storage(k_seq[s][p], dtype)
            vc[tables[s][p // bs], p % bs] = to_storage(v_seq[s][p], dtype)
    q = rng.standard_normal((T, heads, hd)).astype(np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    out = Guarded((T, heads * hd))
    scale = 1.0 / np.sqrt(hd)
    a = args("PagedAttentionArgs", num_seqs=S, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, block_size=bs,
             block_table_width=width, q_stride=heads * hd, sliding_window=window, scale=scale, softcap=softcap)
    run(dev, f"paged_attention_{dtype}", a,
        [q.reshape(T, -1), kc, vc, bt, qsl, np.array(seq_lens, np.int32), out.array])
    kr = [from_storage(to_storage(x, dtype), dtype) for x in k_seq]
    vr = [from_storage(to_storage(x, dtype), dtype) for x in v_seq]
    ref = dense_reference(q.astype(np.float64), kr, vr, q_lens, seq_lens, scale, window, softcap)
    np.testing.assert_allclose(out.array.reshape(T, heads, hd), ref, atol=5e-5, rtol=1e-4)
    out.check_guards()
