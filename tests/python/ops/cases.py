"""Every op case, defined once (in the manner of llama.cpp's test-backend-ops). test_backend_ops.py runs each
on the cpu backend against its float64 numpy reference, and on every other backend the build has (metal-sim's
emulator in both thread orders, the Metal backend) against the cpu op. Buffers are passed as the engine passes
them: q and k as column ranges of the fused q | k | v rows, gate and up as the halves of one gate_up row.
Outputs start NaN-filled (in-out buffers with their inputs) inside guard bands.

A case: the kernel, its argument struct, its buffers (arrays; None unbound), which of them the kernel writes
(`outputs`: index -> initial contents, None for NaN), the float64 reference of those outputs, and tolerances
(rtol, atol) against the reference (cpu) and against the cpu op (other backends)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from op_testing import DTYPES, QUANT_FORMATS, args, from_storage, gguf_dequantize, random_quant_rows, to_storage


@dataclass
class Case:
    id: str
    kernel: str
    args: object
    buffers: list
    outputs: dict                      # buffer index -> initial contents (np array) or None (NaN-filled)
    reference: Callable[[], dict]      # -> {buffer index: float64 expected}
    tol: tuple = (1e-5, 1e-5)          # cpu vs float64 (rtol, atol)
    backend_tol: tuple = (2e-5, 2e-5)  # another backend vs the cpu op
    views: dict = field(default_factory=dict)  # buffer index -> (base buffer index, element offset): aliasing views
    cpu_kernel: Optional[str] = None   # the kernel the backends are compared with, if not `kernel` itself
    nmse: Optional[float] = None       # compare by normalised mean squared error instead (quantized matmuls:
                                       # the activations' int8 rounding is the kernel's, as test-backend-ops)

    @property
    def op(self):
        return self.args.__class__.__name__


def _rng(*key):
    return np.random.default_rng(abs(hash(key)) % (1 << 32))


CASES: list[Case] = []


def case(**kw):
    CASES.append(Case(**kw))


# ---------------------------------------------------------------------------------------------- embedding
for dtype in DTYPES:
    for tokens, hidden, vocab in [(1, 1, 1), (5, 7, 11), (33, 64, 1000), (3, 576, 49)]:
        for scale in (1.0, 24.0):  # Gemma scales embeddings by sqrt(hidden)
            rng = np.random.default_rng(tokens + hidden)
            table = to_storage(rng.standard_normal((vocab, hidden)), dtype)
            ids = rng.integers(0, vocab, tokens).astype(np.int32)
            ids[-1] = vocab - 1
            case(id=f"embedding_{dtype}-{tokens}x{hidden}-v{vocab}-s{scale}", kernel=f"embedding_{dtype}",
                 args=args("EmbeddingArgs", num_tokens=tokens, hidden=hidden, vocab=vocab, scale=scale),
                 buffers=[ids, table, np.zeros((tokens, hidden), np.float32)], outputs={2: None},
                 reference=lambda t=table, i=ids, d=dtype, s=scale: {2: from_storage(t, d)[i].astype(np.float32) * np.float32(s)},
                 tol=(0, 0), backend_tol=(0, 0))

# ----------------------------------------------------------------------------------------------- rms_norm
for dtype in DTYPES:
    for rows, dim in [(1, 1), (1, 64), (3, 7), (5, 576), (17, 130), (4, 300)]:
        for add in (False, True):
            rng = np.random.default_rng(rows * 100 + dim)
            x = rng.standard_normal((rows, dim)).astype(np.float32)
            res = rng.standard_normal((rows, dim)).astype(np.float32)
            w = to_storage(1 + 0.1 * rng.standard_normal(dim), dtype)

            def ref(x=x, res=res, w=w, add=add, d=dtype):
                src = x.astype(np.float64) + res if add else x.astype(np.float64)
                out = {3: src / np.sqrt((src**2).mean(-1, keepdims=True) + 1e-5) * from_storage(w, d)}
                if add:
                    out[1] = src
                return out

            case(id=f"rms_norm_{dtype}-{rows}x{dim}-{'add' if add else 'plain'}", kernel=f"rms_norm_{dtype}",
                 args=args("RmsNormArgs", rows=rows, dim=dim, eps=1e-5, add_residual=int(add)),
                 buffers=[x, res.copy() if add else None, w, np.zeros_like(x)],
                 outputs={1: res, 3: None} if add else {3: None}, reference=ref, tol=(2e-5, 2e-5),
                 backend_tol=(2e-5, 2e-5))
# in place: out aliases x (the engine's h = RMSNorm(residual += h))
_rng0 = np.random.default_rng(0)
_h, _r = _rng0.standard_normal((4, 33)).astype(np.float32), _rng0.standard_normal((4, 33)).astype(np.float32)
case(id="rms_norm_f32-in_place", kernel="rms_norm_f32",
     args=args("RmsNormArgs", rows=4, dim=33, eps=1e-6, add_residual=1),
     buffers=[_h, _r.copy(), np.ones(33, np.float32), _h], outputs={0: _h, 1: _r}, views={3: (0, 0)},
     reference=lambda h=_h, r=_r: (lambda s: {0: s / np.sqrt((s**2).mean(-1, keepdims=True) + 1e-6), 1: s})(
         h.astype(np.float64) + r), tol=(2e-5, 2e-5))

# ------------------------------------------------------------------------------------------------- matmul
MATMUL_SHAPES = [  # (m, n, k): decode rows (GEMV, 1-3 rows), odd sizes, tiles and their remainders
    (1, 1, 1), (1, 17, 7), (1, 64, 64), (2, 33, 513), (3, 100, 300), (4, 31, 129),
    (5, 16, 16), (6, 47, 77), (7, 130, 200), (13, 1, 9), (64, 96, 256), (65, 33, 520),
    # whole 8- and 6-row tiles and every remainder, W blocks of 2 and 3 rows and remainders, enough W rows per
    # thread that the prefetch of later blocks runs, x in 32-row blocks and a remainder block
    (8, 50, 40), (12, 49, 24), (16, 100, 576), (17, 101, 33), (31, 65, 130), (32, 20, 9), (103, 70, 48),
    # Metal: the GEMV's 4-wide loads (k % 4 == 0) up to 4 rows, the GEMM's 32 x 32 tiles and their edges
    (2, 33, 64), (4, 40, 128), (33, 65, 48), (64, 96, 100),
    # prefill rows: the cpu's 512-bit panels where they run (from 256 rows): whole and partial 32-column panels
    # split over the threads, 14-row blocks and a remainder, odd k
    (256, 64, 48), (301, 70, 33),
]
for dtype in DTYPES:
    for m, n, k in MATMUL_SHAPES:
        for bias in (False, True):
            rng = np.random.default_rng(m * 1000 + n * 10 + k)
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = to_storage(rng.standard_normal((n, k)), dtype)
            b = to_storage(rng.standard_normal(n), dtype) if bias else None

            def ref(x=x, w=w, b=b, d=dtype):
                y = x.astype(np.float64) @ from_storage(w, d).T
                return {3: y + from_storage(b, d) if b is not None else y}

            tol = (1e-5, 1e-4 * np.sqrt(k) + 1e-5)
            for kernel in ("matmul", "matmul_blas"):  # matmul_blas: prefill via the BLAS, as on macOS (cpu only)
                case(id=f"{kernel}_{dtype}-{m}x{n}x{k}-{'bias' if bias else 'nobias'}", kernel=f"{kernel}_{dtype}",
                     args=args("MatmulArgs", m=m, n=n, k=k, has_bias=int(bias)),
                     buffers=[x, w, b, np.zeros((m, n), np.float32)], outputs={3: None}, reference=ref, tol=tol,
                     backend_tol=(1e-4, 1e-4 * np.sqrt(k)))

# y_stride > n: one part of a fused output (its columns of wider rows, the rest untouched)
for dtype in DTYPES:
    for m, n, k in [(1, 17, 64), (3, 20, 40), (5, 33, 48), (40, 35, 64), (70, 35, 64)]:
        rng = np.random.default_rng([m, n, k, 7])
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = to_storage(rng.standard_normal((n, k)), dtype)
        y0 = rng.standard_normal((m, n + 9)).astype(np.float32)

        def ref(x=x, w=w, d=dtype, y0=y0, n=n):
            y = y0.astype(np.float64)
            y[:, :n] = x.astype(np.float64) @ from_storage(w, d).T
            return {3: y}

        case(id=f"matmul_{dtype}-{m}x{n}x{k}-ystride{n + 9}", kernel=f"matmul_{dtype}",
             args=args("MatmulArgs", m=m, n=n, k=k, has_bias=0, y_stride=n + 9), buffers=[x, w, None, y0.copy()],
             outputs={3: y0}, reference=ref, tol=(1e-5, 1e-4 * np.sqrt(k) + 1e-5), backend_tol=(1e-4, 1e-4 * np.sqrt(k)))

# ------------------------------------------------------------------ quantized weights: matmul_<q>, embedding_<q>
# Weights are random blocks (every code, every packed sub-scale); the reference multiplies by gguf-py's
# dequantization of them, so quantization error is not kernel error. The kernels quantize each row of x to
# int8 groups of 32: NMSE <= 5e-4 against float64, as llama.cpp's test-backend-ops.
QUANT_MATMUL_SHAPES = [  # (m, n, k): decode 1-4 rows (1 row: blocks of W rows, their prefetch and remainders),
    # 4-row passes and remainders, 64-row blocks, odd n, rows not whole chunks of 256 (NMSE over 8+ outputs: a single
    # dot product of 32 random terms may cancel to near 0)
    (1, 16, 32), (1, 17, 256), (2, 33, 512), (3, 100, 768), (4, 31, 256), (5, 16, 256), (7, 65, 512),
    (13, 8, 256), (9, 21, 576), (1, 40, 576), (1, 40, 768), (3, 40, 576), (4, 24, 576), (64, 40, 256), (67, 33, 768), (130, 20, 256), (257, 40, 256),
]
for fmt, q in QUANT_FORMATS.items():
    for m, n, k in QUANT_MATMUL_SHAPES:
        if k % q["block_elems"]:
            continue
        for bias in ((None, "f32", "f16") if (m, n) in ((3, 100), (67, 33)) else (None,)):
            rng = np.random.default_rng([m, n, k, q["block_bytes"]])
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = random_quant_rows(fmt, n, k, rng)
            b = to_storage(rng.standard_normal(n), bias) if bias else None

            def ref(x=x, w=w, b=b, fmt=fmt, k=k, bias=bias):
                y = x.astype(np.float64) @ gguf_dequantize(fmt, w, k).T
                return {3: y + from_storage(b, bias) if b is not None else y}

            case(id=f"matmul_{fmt}-{m}x{n}x{k}-{'bias_' + bias if bias else 'nobias'}", kernel=f"matmul_{fmt}",
                 args=args("MatmulArgs", m=m, n=n, k=k, has_bias=1 + DTYPES.index(bias) if bias else 0),
                 buffers=[x, w, b, np.zeros((m, n), np.float32)], outputs={3: None}, reference=ref, nmse=5e-4)
    for m in (1, 2, 20):  # y_stride > n, through the decode blocks, the integer passes and the dequantized tiles
        rng = np.random.default_rng([m, q["block_bytes"], 9])
        x = rng.standard_normal((m, 256)).astype(np.float32)
        w = random_quant_rows(fmt, 24, 256, rng)
        y0 = rng.standard_normal((m, 31)).astype(np.float32)

        def ref(x=x, w=w, fmt=fmt, y0=y0):
            y = y0.astype(np.float64)
            y[:, :24] = x.astype(np.float64) @ gguf_dequantize(fmt, w, 256).T
            return {3: y}

        case(id=f"matmul_{fmt}-{m}x24x256-ystride31", kernel=f"matmul_{fmt}",
             args=args("MatmulArgs", m=m, n=24, k=256, has_bias=0, y_stride=31), buffers=[x, w, None, y0.copy()],
             outputs={3: y0}, reference=ref, nmse=5e-4)
    for tokens, hidden, vocab in [(1, 256, 3), (5, 512, 11), (17, 768, 40)]:
        if hidden % q["block_elems"]:
            continue
        for scale in (1.0, 24.0):
            rng = np.random.default_rng([tokens, hidden, q["block_bytes"]])
            table = random_quant_rows(fmt, vocab, hidden, rng)
            ids = rng.integers(0, vocab, tokens).astype(np.int32)
            ids[-1] = vocab - 1
            case(id=f"embedding_{fmt}-{tokens}x{hidden}-v{vocab}-s{scale}", kernel=f"embedding_{fmt}",
                 args=args("EmbeddingArgs", num_tokens=tokens, hidden=hidden, vocab=vocab, scale=scale),
                 buffers=[ids, table, np.zeros((tokens, hidden), np.float32)], outputs={2: None},
                 reference=lambda t=table, i=ids, f=fmt, h=hidden, s=scale: {2: gguf_dequantize(f, t, h)[i] * s},
                 tol=(2e-6, 1e-7), backend_tol=(1e-6, 1e-7))

# ------------------------------------------------------------------------------------------- rope, qk_norm
def rope_ref(x, positions, inv_freq, scaling=1.0):
    """HF rotate_half over the first 2 * len(inv_freq) dims of each head (the rest pass through)."""
    rot = 2 * len(inv_freq)
    half = rot // 2
    ang = positions[:, None, None].astype(np.float64) * inv_freq[None, None, :]
    cos, sin = np.cos(ang) * scaling, np.sin(ang) * scaling
    x1, x2 = x[..., :half], x[..., half:rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


# (tokens, heads, kv_heads, head_dim, rotary_dim, scaling): partial rotary (Phi-3, Phi-4-mini) and yarn/longrope's
# cos/sin scaling; q and k inside fused q | k | v rows
for tokens, heads, kv_heads, hd, rot, scaling in [(1, 1, 1, 2, 2, 1.0), (5, 4, 2, 16, 16, 1.0), (7, 9, 3, 64, 64, 1.0),
                                                  (3, 2, 1, 128, 128, 1.0), (4, 3, 1, 96, 72, 1.0),
                                                  (6, 2, 2, 64, 32, 1.19), (2, 4, 2, 10, 6, 0.9)]:
    rng = np.random.default_rng(tokens * hd)
    pos = rng.integers(0, 5000, tokens).astype(np.int32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    QD, KD, stride = heads * hd, kv_heads * hd, (heads + 2 * kv_heads) * hd
    qkv = rng.standard_normal((tokens, stride)).astype(np.float32)

    def ref(qkv=qkv, pos=pos, f=inv_freq, scaling=scaling, heads=heads, kv_heads=kv_heads, hd=hd):
        t = qkv.shape[0]
        x = qkv.astype(np.float64).reshape(t, heads + 2 * kv_heads, hd)
        x[:, :heads + kv_heads] = rope_ref(x[:, :heads + kv_heads], pos, f.astype(np.float64), scaling)
        return {2: x.reshape(t, -1)}

    # angles up to 5000 rad in fp32: the argument's own rounding (5000 * 2^-24 ~ 3e-4)
    case(id=f"rope-{tokens}t-{heads}h{kv_heads}kv-hd{hd}-rot{rot}-s{scaling}", kernel="rope",
         args=args("RopeArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, rotary_dim=rot,
                   q_stride=stride, k_stride=stride, scaling=scaling),
         buffers=[pos, inv_freq, qkv, None], outputs={2: qkv}, views={3: (2, QD)}, reference=ref, tol=(0, 2e-3),
         backend_tol=(1e-5, 1e-5))

for dtype in DTYPES:
    for tokens, heads, kv_heads, hd in [(1, 1, 1, 2), (5, 4, 2, 24), (7, 9, 3, 64), (3, 2, 1, 256)]:
        rng = np.random.default_rng(tokens * 31 + hd)
        stride = (heads + 2 * kv_heads) * hd
        qkv = (rng.standard_normal((tokens, stride)) * 3).astype(np.float32)
        qw, kw = (to_storage(1 + 0.1 * rng.standard_normal(hd), dtype) for _ in range(2))

        def ref(qkv=qkv, qw=qw, kw=kw, d=dtype, heads=heads, kv_heads=kv_heads, hd=hd):
            def norm(x, w):
                return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * from_storage(w, d)
            t = qkv.shape[0]
            x = qkv.astype(np.float64).reshape(t, heads + 2 * kv_heads, hd)
            x[:, :heads] = norm(x[:, :heads], qw)
            x[:, heads:heads + kv_heads] = norm(x[:, heads:heads + kv_heads], kw)
            return {0: x.reshape(t, -1)}  # v untouched

        case(id=f"qk_norm_{dtype}-{tokens}t-{heads}h{kv_heads}kv-hd{hd}", kernel=f"qk_norm_{dtype}",
             args=args("QKNormArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                       q_stride=stride, k_stride=stride, eps=1e-6),
             buffers=[qkv, None, qw, kw], outputs={0: qkv}, views={1: (0, heads * hd)}, reference=ref,
             tol=(2e-5, 2e-5))

# ------------------------------------------------------------------------------- silu_mul, gelu_tanh_mul
def silu(g):
    return g / (1 + np.exp(-g))


def gelu_tanh(g):
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))


for op, act, tol in (("silu_mul", silu, (1e-5, 1e-6)), ("gelu_tanh_mul", gelu_tanh, (2e-5, 2e-6))):
    for rows, dim, fused in [(1, 1, False), (3, 7, False), (9, 1536, False), (2, 1000, False), (1, 5, True),
                             (3, 7, True), (4, 1536, True)]:
        rng = np.random.default_rng(dim + fused)
        gu = rng.standard_normal((rows, 2 * dim)).astype(np.float32)
        gu[:, :dim] *= 4
        if fused:  # gate and up: the two halves of each row of one [rows, 2 * dim] projection
            bufs, views = [gu, None, np.zeros((rows, dim), np.float32)], {1: (0, dim)}
        else:
            bufs, views = [np.ascontiguousarray(gu[:, :dim]), np.ascontiguousarray(gu[:, dim:]),
                           np.zeros((rows, dim), np.float32)], {}
        case(id=f"{op}-{rows}x{dim}-{'fused' if fused else 'apart'}", kernel=op,
             args=args("SiluMulArgs", rows=rows, dim=dim, in_stride=2 * dim if fused else dim), buffers=bufs,
             outputs={2: None}, views=views, tol=tol, backend_tol=(2e-6, 1e-6),
             reference=lambda gu=gu, dim=dim, act=act: {2: act(gu[:, :dim].astype(np.float64)) * gu[:, dim:]})
    # the whole range: no overflow, no NaN (silu(-100) ~ 0, gelu(100) = 100)
    g = np.linspace(-100, 100, 20001).astype(np.float32)[None, :]
    case(id=f"{op}-whole_range", kernel=op, args=args("SiluMulArgs", rows=1, dim=g.shape[1], in_stride=g.shape[1]),
         buffers=[g, np.ones_like(g), np.zeros_like(g)], outputs={2: None},
         reference=lambda g=g, act=act: {2: act(g.astype(np.float64))}, tol=(2e-5, 1e-6), backend_tol=(2e-6, 1e-6))

# ------------------------------------------------------------------------------ kv_write, gather, argmax
for dtype in DTYPES:
    for tokens, kv_heads, hd, bs, blocks in [(1, 1, 2, 1, 1), (7, 2, 16, 16, 3), (20, 3, 64, 8, 5)]:
        rng = np.random.default_rng(tokens)
        num_slots = blocks * bs
        slots = rng.permutation(num_slots)[:tokens].astype(np.int64)
        slots[0] = -1  # skipped
        stride = 2 * kv_heads * hd + 3  # k and v inside wider rows, as in the fused q | k | v projection
        kv = rng.standard_normal((tokens, stride)).astype(np.float32)
        storage = to_storage(np.zeros(1), dtype).dtype
        cache = np.zeros((blocks, bs, kv_heads, hd), storage)

        def ref(kv=kv, slots=slots, d=dtype, n=num_slots, kd=kv_heads * hd, shape=cache.shape):
            out = []
            for part in (kv[:, :kd], kv[:, kd:2 * kd]):
                c = np.zeros((n, kd))
                ok = slots >= 0
                c[slots[ok]] = from_storage(to_storage(part[ok], d), d)
                out.append(c.reshape(shape))
            return {3: out[0], 4: out[1]}

        case(id=f"kv_write_{dtype}-{tokens}t-{kv_heads}kv-hd{hd}-bs{bs}", kernel=f"kv_write_{dtype}",
             args=args("KVWriteArgs", num_tokens=tokens, num_kv_heads=kv_heads, head_dim=hd, block_size=bs,
                       num_slots=num_slots, k_stride=stride, v_stride=stride),
             buffers=[kv, None, slots, cache, cache.copy()], outputs={3: cache, 4: cache}, views={1: (0, kv_heads * hd)},
             reference=ref, tol=(0, 0), backend_tol=(0, 0))

for rows, dim in [(1, 1), (3, 17), (8, 576)]:
    rng = np.random.default_rng(rows)
    src = rng.standard_normal((11, dim)).astype(np.float32)
    idx = rng.integers(0, 11, rows).astype(np.int32)
    case(id=f"gather_rows-{rows}x{dim}", kernel="gather_rows", args=args("GatherRowsArgs", rows=rows, dim=dim),
         buffers=[src, idx, np.zeros((rows, dim), np.float32)], outputs={2: None},
         reference=lambda s=src, i=idx: {2: s[i]}, tol=(0, 0), backend_tol=(0, 0))

for rows, vocab in [(1, 1), (3, 7), (5, 49152), (2, 1000)]:
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((rows, vocab)).astype(np.float32)
    if vocab > 10:
        x[0, 3] = x[0, vocab - 2] = x[0].max() + 1  # a tie across threads: the first index wins, as numpy's
    case(id=f"argmax-{rows}x{vocab}", kernel="argmax", args=args("ArgmaxArgs", rows=rows, vocab=vocab),
         buffers=[x, np.zeros(rows, np.int32)], outputs={1: None}, reference=lambda x=x: {1: x.argmax(-1)},
         tol=(0, 0), backend_tol=(0, 0))

# ----------------------------------------------------------------------------------------------- feed_tokens
for tokens, num_src in [(1, 1), (5, 3), (300, 17)]:  # 300: more than one threadgroup of 256
    rng = np.random.default_rng(tokens)
    src = rng.integers(0, 50000, num_src).astype(np.int32)
    rows = rng.integers(-1, num_src + 2, tokens).astype(np.int32)  # -1 and past num_src keep dst's token
    rows[0] = num_src - 1
    dst = rng.integers(0, 50000, tokens).astype(np.int32)

    def feed_ref(src=src, rows=rows, dst=dst):
        ok = (rows >= 0) & (rows < len(src))
        return {2: np.where(ok, src[np.clip(rows, 0, len(src) - 1)], dst)}

    case(id=f"feed_tokens-{tokens}-from{num_src}", kernel="feed_tokens",
         args=args("FeedTokensArgs", num_tokens=tokens, num_src=num_src), buffers=[src, rows, dst], outputs={2: dst},
         reference=feed_ref, tol=(0, 0), backend_tol=(0, 0))

# -------------------------------------------------------------------------------------------------- softcap
for rows, cols, cap in [(1, 1, 30.0), (3, 211, 4.0), (2, 49152, 30.0)]:
    rng = np.random.default_rng(cols)
    x = (3 * cap * rng.standard_normal((rows, cols))).astype(np.float32)
    case(id=f"softcap-{rows}x{cols}-cap{cap}", kernel="softcap", args=args("SoftcapArgs", rows=rows, cols=cols, cap=cap),
         buffers=[x, np.zeros_like(x)], outputs={1: None}, tol=(1e-6, 1e-6 * cap), backend_tol=(1e-6, 1e-6 * cap),
         reference=lambda x=x, cap=cap: {1: cap * np.tanh(x.astype(np.float64) / cap)})

# ------------------------------------------------------------------------------------ mixture of experts
def route_ref(logits, k, renormalize):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # stable: the lower id first on ties
    w = np.take_along_axis(p, ids, -1)
    return ids, (w / w.sum(-1, keepdims=True) if renormalize else w)


for tokens, experts, k in [(1, 2, 1), (5, 8, 2), (17, 60, 4), (3, 128, 8)]:
    for renormalize in (False, True):
        rng = np.random.default_rng(tokens * experts + k)
        logits = (3 * rng.standard_normal((tokens, experts))).astype(np.float32)
        logits[0, :2] = logits[0].max() + 1.0  # a tie at the top: the lower id wins
        case(id=f"moe_route-{tokens}t-{experts}e-top{k}-{'renorm' if renormalize else 'raw'}", kernel="moe_route",
             args=args("MoeRouteArgs", num_tokens=tokens, num_experts=experts, top_k=k, renormalize=int(renormalize)),
             buffers=[logits, np.zeros((tokens, k), np.int32), np.zeros((tokens, k), np.float32)],
             outputs={1: None, 2: None}, tol=(2e-6, 1e-7), backend_tol=(1e-6, 1e-7),
             reference=lambda l=logits, k=k, r=renormalize: dict(zip((1, 2), route_ref(l.astype(np.float64), k, r))))

for dtype in DTYPES:
    for tokens, k, experts, n, kdim in [(1, 2, 8, 24, 16), (3, 2, 8, 17, 33), (20, 2, 4, 40, 64), (9, 4, 16, 7, 130)]:
        for layout in ("gate_up", "down"):  # gate_up: a token's row feeds its k slots; down: each slot its own row
            rng = np.random.default_rng(tokens * 7 + n)
            rows, div = tokens * k, (k if layout == "gate_up" else 1)
            x = rng.standard_normal((rows // div, kdim)).astype(np.float32)
            w = to_storage(rng.standard_normal((experts, n, kdim)) * 0.1, dtype)
            ids = rng.integers(0, experts, rows).astype(np.int32)
            ids[-1] = -1  # not an expert: a zero row

            def ref(x=x, w=w, ids=ids, d=dtype, div=div, n=n, experts=experts):
                wf = from_storage(w, d)
                return {3: np.stack([x[r // div].astype(np.float64) @ wf[e].T if 0 <= e < experts else np.zeros(n)
                                     for r, e in enumerate(ids)])}

            case(id=f"moe_matmul_{dtype}-{tokens}t-top{k}-{experts}e-{n}x{kdim}-{layout}", kernel=f"moe_matmul_{dtype}",
                 args=args("MoeMatmulArgs", rows=rows, n=n, k=kdim, num_experts=experts, x_row_div=div),
                 buffers=[x, w, ids, np.zeros((rows, n), np.float32)], outputs={3: None}, reference=ref,
                 tol=(1e-5, 1e-5 * np.sqrt(kdim)), backend_tol=(2e-5, 2e-5))

for fmt, q in QUANT_FORMATS.items():  # the experts of a quantized MoE through the quantized matmul
    for tokens, k, experts, n, kdim in [(1, 2, 8, 24, 256), (20, 2, 4, 40, 512)]:
        for layout in ("gate_up", "down"):
            rng = np.random.default_rng([tokens, n, q["block_bytes"]])
            rows, div = tokens * k, (k if layout == "gate_up" else 1)
            x = rng.standard_normal((rows // div, kdim)).astype(np.float32)
            w = random_quant_rows(fmt, experts * n, kdim, rng)
            ids = rng.integers(0, experts, rows).astype(np.int32)
            ids[-1] = -1

            def ref(x=x, w=w, ids=ids, fmt=fmt, div=div, n=n, experts=experts, kdim=kdim):
                wf = gguf_dequantize(fmt, w, kdim).reshape(experts, n, kdim)
                return {3: np.stack([x[r // div].astype(np.float64) @ wf[e].T if 0 <= e < experts else np.zeros(n)
                                     for r, e in enumerate(ids)])}

            case(id=f"moe_matmul_{fmt}-{tokens}t-top{k}-{experts}e-{n}x{kdim}-{layout}", kernel=f"moe_matmul_{fmt}",
                 args=args("MoeMatmulArgs", rows=rows, n=n, k=kdim, num_experts=experts, x_row_div=div),
                 buffers=[x, w, ids, np.zeros((rows, n), np.float32)], outputs={3: None}, reference=ref, nmse=5e-4)

for tokens, k, dim in [(1, 1, 1), (5, 2, 33), (17, 8, 576)]:
    rng = np.random.default_rng(tokens + dim)
    y = rng.standard_normal((tokens * k, dim)).astype(np.float32)
    w = rng.random((tokens, k)).astype(np.float32)
    case(id=f"moe_combine-{tokens}t-top{k}-{dim}", kernel="moe_combine",
         args=args("MoeCombineArgs", num_tokens=tokens, top_k=k, dim=dim),
         buffers=[y, w, np.zeros((tokens, dim), np.float32)], outputs={2: None}, tol=(1e-5, 1e-6),
         backend_tol=(1e-6, 1e-6),
         reference=lambda y=y, w=w, t=tokens, k=k, d=dim: {
             2: np.einsum("tk,tkd->td", w.astype(np.float64), y.reshape(t, k, d).astype(np.float64))})

# ------------------------------------------------------------------------------------------ paged attention
def dense_attention(q, k, v, q_lens, seq_lens, scale, window, softcap=0.0):
    """q [T, H, D]; k, v per sequence [L, KVH, D] (float64). Causal, GQA, optional sliding window and softcap."""
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


ATTENTION_CASES = [  # (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window)
    ([1], [1], 1, 1, 8, 1, 0),                     # smallest
    ([5, 1, 1], [5, 9, 33], 4, 2, 16, 4, 0),       # a prefill and two decode rows in one step
    ([7], [20], 8, 2, 64, 16, 0),                  # a chunk continuing over cached pages
    ([13, 2], [13, 40], 9, 3, 64, 16, 5),          # sliding window smaller than the prompt
    ([3, 1], [3, 70], 2, 1, 128, 8, 0),            # head_dim 128
    ([6], [6], 3, 3, 24, 5, 0),                    # MHA, odd block size
    ([2, 1], [11, 30], 4, 1, 20, 4, 0),            # head_dim not a multiple of 8 (no vector path)
    ([1, 1, 1], [25, 64, 8], 6, 2, 80, 16, 0),     # head_dim 80: a 64-wide and a 16-wide piece of V
    # long prefill chunks (the cpu op's sgemm path: 16+ rows of a sequence, 64-row pieces)
    ([40], [40], 4, 2, 16, 16, 0),                 # a whole prompt
    ([20, 1, 33], [50, 7, 33], 9, 3, 64, 16, 7),   # a chunk over cached pages, a decode row, a window
    ([150], [170], 2, 1, 64, 8, 0),                # several 64-row pieces after 20 cached tokens
    ([17], [17], 6, 2, 128, 16, 9),                # head_dim 128 with a window
    # heads wider than 128 (Gemma 2 and 3: 256): Metal's wide-head pipelines, 8 values a lane
    ([3, 1], [3, 40], 4, 1, 256, 8, 0),            # Gemma 3 1B's shape: 4 query heads of 256 over one KV head
    ([18, 1], [18, 9], 2, 1, 192, 16, 5),          # head_dim 192 with a window, a long chunk
]

for dtype in DTYPES:
    for q_lens, seq_lens, heads, kv_heads, hd, bs, window in ATTENTION_CASES:
        for softcap in (0.0, 1.5):  # Gemma 2's tanh softcapping of the scores
            rng = np.random.default_rng(sum(seq_lens) + hd)
            S, T = len(q_lens), sum(q_lens)
            nblocks = [-(-n // bs) for n in seq_lens]
            num_blocks = sum(nblocks) + 3
            perm = rng.permutation(num_blocks)  # shuffled, non-contiguous physical blocks
            width = max(nblocks) + 1
            bt = np.full((S, width), -1, np.int32)
            tables, i = [], 0
            for s_, n in enumerate(nblocks):
                tables.append(perm[i : i + n])
                bt[s_, :n] = tables[-1]
                i += n
            k_seq = [rng.standard_normal((n, kv_heads, hd)) for n in seq_lens]
            v_seq = [rng.standard_normal((n, kv_heads, hd)) for n in seq_lens]
            storage = to_storage(np.zeros(1), dtype).dtype
            kc = np.zeros((num_blocks, bs, kv_heads, hd), storage)
            vc = np.zeros((num_blocks, bs, kv_heads, hd), storage)
            for s_, n in enumerate(seq_lens):
                for p in range(n):
                    kc[tables[s_][p // bs], p % bs] = to_storage(k_seq[s_][p], dtype)
                    vc[tables[s_][p // bs], p % bs] = to_storage(v_seq[s_][p], dtype)
            stride = (heads + 2 * kv_heads) * hd  # q inside the fused q | k | v rows
            qkv = rng.standard_normal((T, stride)).astype(np.float32)
            qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
            scale = 1.0 / np.sqrt(hd)

            def ref(qkv=qkv, ks=k_seq, vs=v_seq, d=dtype, ql=q_lens, sl=seq_lens, scale=scale, w=window, c=softcap,
                    heads=heads, hd=hd):
                q = qkv[:, :heads * hd].astype(np.float64).reshape(len(qkv), heads, hd)
                kr = [from_storage(to_storage(x, d), d) for x in ks]
                vr = [from_storage(to_storage(x, d), d) for x in vs]
                return {6: dense_attention(q, kr, vr, ql, sl, scale, w, c).reshape(len(qkv), -1)}

            case(id=f"paged_attention_{dtype}-q{q_lens}-s{seq_lens}-{heads}h{kv_heads}kv-hd{hd}-bs{bs}-w{window}"
                    f"-cap{softcap}",
                 kernel=f"paged_attention_{dtype}",
                 args=args("PagedAttentionArgs", num_seqs=S, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                           block_size=bs, block_table_width=width, q_stride=stride, sliding_window=window, scale=scale,
                           num_tokens=T, softcap=softcap),
                 buffers=[qkv, kc, vc, bt, qsl, np.array(seq_lens, np.int32), np.zeros((T, heads * hd), np.float32)],
                 outputs={6: None}, reference=ref, tol=(1e-4, 5e-5), backend_tol=(1e-4, 2e-5))
