// The quantized weight formats in MSL (include/metal_engine/quant.h; the cpu side: src/cpu/quant_blocks.h). A
// row of W is blocks along k, laid out as ggml-common.h (little-endian, f16 = IEEE half). The kernels read a row
// 16 weights at a time (a "half-group": half of a 32-weight group, or a sixteenth of a K-quant super-block):
//   w[16 h + i] = a * q[i] + b        (a, b: the half-group's scale and offset; q: its unsigned codes, a high
//                                      nibble left in place and a scaled by 1/16 for it)
// Each format is a struct with kElems / kBytes per block and codes16(block, s, q, a, b) for half-group s of the
// block. The tests check every format against gguf-py's dequantization (through the cpu kernels they are
// compared with: tests/python/ops/cases.py).
#pragma once
#include <metal_stdlib>
using namespace metal;

namespace metal_engine {

inline float q_f16(device const uchar* p) { return float(*(device const half*)p); }  // p 2-byte aligned
inline uint q_u32(device const uchar* p) {  // 4 bytes at any alignment (Q5_0's qh sits at byte 2)
  return uint(p[0]) | (uint(p[1]) << 8) | (uint(p[2]) << 16) | (uint(p[3]) << 24);
}

// The nibble formats keep a high nibble in place (q = byte & 0xF0, its upper bits above it) and scale it by 1/16
// instead of shifting it down: exact (a power of two), one AND per code
inline float q_nibble_scale(int high) { return high ? 1.0f / 16.0f : 1.0f; }

// Q4_K / Q5_K: sub-block j's (0..7) a = d * sc and b = -dmin * m, from its 6-bit scale and min in the 12 packed
// bytes after d and dmin (ggml's get_scale_min_k4); a scaled by 1/16 for an odd j, whose codes are high nibbles
inline void q_k4_affine(device const uchar* blk, int j, thread float& a, thread float& b) {
  device const uchar* s = blk + 4;
  int sc, m;
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
  a = q_f16(blk) * float(sc) * q_nibble_scale(j & 1);
  b = -q_f16(blk + 2) * float(m);
}

// {f16 d; i8 qs[32]}: w = d * q (the codes signed: q + 128 stored as unsigned, b = -128 d)
struct QuantQ8_0 {
  enum { kElems = 32, kBytes = 34 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    a = q_f16(blk);
    b = -128.0f * a;
    device const uchar* qs = blk + 2 + 16 * s;
    for (int i = 0; i < 16; ++i) q[i] = float(int(qs[i] ^ 0x80));
  }
};

// {f16 d; u8 qs[16]}: w = d * (q - 8), weights 0..15 in the low nibbles, 16..31 in the high
struct QuantQ4_0 {
  enum { kElems = 32, kBytes = 18 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    const float d = q_f16(blk);
    a = d * q_nibble_scale(s);
    b = -8.0f * d;
    const uint mask = 0xFu << (4 * s);
    for (int i = 0; i < 16; ++i) q[i] = float(blk[2 + i] & mask);
  }
};

// {f16 d, m; u8 qs[16]}: w = d * q + m
struct QuantQ4_1 {
  enum { kElems = 32, kBytes = 20 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    a = q_f16(blk) * q_nibble_scale(s);
    b = q_f16(blk + 2);
    const uint mask = 0xFu << (4 * s);
    for (int i = 0; i < 16; ++i) q[i] = float(blk[4 + i] & mask);
  }
};

// {f16 d; u8 qh[4]; u8 qs[16]}: w = d * (q - 16), q's fifth bit for weight j in bit j of qh
struct QuantQ5_0 {
  enum { kElems = 32, kBytes = 22 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    const float d = q_f16(blk);
    a = d * q_nibble_scale(s);
    b = -16.0f * d;
    const uint qh = q_u32(blk + 2) >> (16 * s), mask = 0xFu << (4 * s), hi = 4 + 4 * s;
    for (int i = 0; i < 16; ++i) q[i] = float((blk[6 + i] & mask) | (((qh >> i) & 1) << hi));
  }
};

// {f16 d, m; u8 qh[4]; u8 qs[16]}: w = d * q + m
struct QuantQ5_1 {
  enum { kElems = 32, kBytes = 24 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    a = q_f16(blk) * q_nibble_scale(s);
    b = q_f16(blk + 2);
    const uint qh = q_u32(blk + 4) >> (16 * s), mask = 0xFu << (4 * s), hi = 4 + 4 * s;
    for (int i = 0; i < 16; ++i) q[i] = float((blk[8 + i] & mask) | (((qh >> i) & 1) << hi));
  }
};

// Super-blocks of 256: {f16 d, dmin; u8 scales[12]; u8 qs[128]}: sub-block j of 32 (6-bit scale sc, min m)
// w = d * sc * q - dmin * m, its codes in the low (j even) or high nibbles of qs[32 (j / 2) ..][32]
struct QuantQ4_K {
  enum { kElems = 256, kBytes = 144 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    const int j = s / 2, l0 = (s & 1) * 16;
    q_k4_affine(blk, j, a, b);
    device const uchar* qs = blk + 16 + 32 * (j / 2) + l0;
    const uint mask = 0xFu << (4 * (j & 1));
    for (int i = 0; i < 16; ++i) q[i] = float(qs[i] & mask);
  }
};

// {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K with a fifth bit, bit j of qh[l] (l: 0..31)
struct QuantQ5_K {
  enum { kElems = 256, kBytes = 176 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    const int j = s / 2, l0 = (s & 1) * 16;
    q_k4_affine(blk, j, a, b);
    device const uchar* qh = blk + 16 + l0;
    device const uchar* qs = blk + 48 + 32 * (j / 2) + l0;
    const uint mask = 0xFu << (4 * (j & 1)), hi = 4 + 4 * (j & 1);
    for (int i = 0; i < 16; ++i) q[i] = float((qs[i] & mask) | (((qh[i] >> j) & 1) << hi));
  }
};

// {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: w = d * scales[..] * (q - 32), 6-bit q. Each half of 128
// weights: quarter t (32 weights) takes ql[64 half + 32 (t & 1) + l] (low nibble for t < 2, high after), bits
// 2t..2t+1 of qh[32 half + l], and scale 8 half + l / 16 + 2 t.
struct QuantQ6_K {
  enum { kElems = 256, kBytes = 210 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    const int half_ = s / 8, t = (s / 2) & 3, l0 = (s & 1) * 16;
    const int sc = int(blk[192 + 8 * half_ + l0 / 16 + 2 * t] ^ 0x80) - 128;
    const float d = q_f16(blk + 208) * float(sc);
    a = d * q_nibble_scale(t >> 1);
    b = -32.0f * d;
    device const uchar* ql = blk + 64 * half_ + 32 * (t & 1) + l0;
    device const uchar* qh = blk + 128 + 32 * half_ + l0;
    const uint mask = 0xFu << (4 * (t >> 1)), hi = 4 + 4 * (t >> 1);
    for (int i = 0; i < 16; ++i) q[i] = float((ql[i] & mask) | (((qh[i] >> (2 * t)) & 3) << hi));
  }
};

// A8 (MLX 8-bit): {f16 d; f16 m; u8 qs[32]}: w = d * q + m
struct QuantA8 {
  enum { kElems = 32, kBytes = 36 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    a = q_f16(blk);
    b = q_f16(blk + 2);
    device const uchar* qs = blk + 4 + 16 * s;
    for (int i = 0; i < 16; ++i) q[i] = float(qs[i]);
  }
};

// A6 (MLX 6-bit): {f16 d; f16 m; u8 ql[16]; u8 qh[8]}: w = d * q + m, q's low 4 bits as Q4_1's, its top two for
// weight 8 t + l at bits 2t, 2t + 1 of qh[l]
struct QuantA6 {
  enum { kElems = 32, kBytes = 28 };
  static void codes16(device const uchar* blk, int s, thread float* q, thread float& a, thread float& b) {
    a = q_f16(blk) * q_nibble_scale(s);
    b = q_f16(blk + 2);
    const uint mask = 0xFu << (4 * s), hi = 4 + 4 * s;
    for (int i = 0; i < 16; ++i) {
      const int w = 16 * s + i;
      q[i] = float((blk[4 + i] & mask) | (((blk[20 + w % 8] >> (2 * (w / 8))) & 3) << hi));
    }
  }
};

// Half-group h (weights 16 h .. 16 h + 15) of a row of Q blocks
template <typename Q>
inline void q_codes16(device const uchar* row, int h, thread float* q, thread float& a, thread float& b) {
  Q::codes16(row + long(h / (Q::kElems / 16)) * Q::kBytes, h % (Q::kElems / 16), q, a, b);
}

// Bytes of a row of k weights
template <typename Q>
inline long q_row_bytes(int k) { return long(k / Q::kElems) * Q::kBytes; }

}  // namespace metal_engine
