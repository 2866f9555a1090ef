#include "metal_engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace metal_engine {

namespace {

// A positive float's bits keep its order; their top 16 (sign, exponent, 7 mantissa bits) are its bucket.
inline uint32_t bucket_of(float p) {
  uint32_t b;
  std::memcpy(&b, &p, 4);
  return b >> 16;
}
constexpr uint32_t kBuckets = 0x3F81;  // bucket_of(1.0f) + 1: p <= 1

// Any float's bits made to keep its order as an unsigned integer (negatives flipped).
inline uint32_t order_key(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Scratch {
  std::vector<float> p;
  std::vector<double> mass;     // [kBuckets]
  std::vector<int64_t> counts;  // [4096]: top-k
  std::vector<std::pair<float, int32_t>> edge;
};

// exp(x) for x <= 0, vectorisable (no library call): x / ln 2 split into an integer n (rounded to nearest)
// and f in [-1/2, 1/2], 2^f by its Taylor polynomial to f^6 (relative error ~1e-7), times 2^n. exp(-87) and
// below are 0 (as far as sampling cares).
inline float exp_nonpositive(float x) {
  const float t = (x > -87.0f ? x : -87.0f) * 1.44269504089f;
  const float shifted = t + 12582912.0f;  // 1.5 x 2^23: the fraction shifted out, t rounded to nearest
  uint32_t sb;
  std::memcpy(&sb, &shifted, 4);
  const int32_t n = int32_t(sb) - 0x4B400000;  // that integer, from the mantissa bits
  const float f = t - (shifted - 12582912.0f);
  float q = 1.5403530393e-4f;
  q = q * f + 1.3333558146e-3f;
  q = q * f + 9.6181291076e-3f;
  q = q * f + 5.5504108665e-2f;
  q = q * f + 2.4022650696e-1f;
  q = q * f + 6.9314718056e-1f;
  q = q * f + 1.0f;
  const uint32_t bits = uint32_t(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return q * scale * float(x > -87.0f);
}

// Sum of n floats in double, in 8 lanes (vectorised).
inline double sum(const float* p, int64_t n) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) lanes[k] += double(p[i + k]);
  for (; i < n; ++i) lanes[0] += double(p[i]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// One row. p[i] = exp((x[i] - max) / T), so the most likely token's is 1. Every pass over the vocabulary is
// branch-free (vectorised) but the last, which walks one 256-token block.
int64_t sample_row(const float* x, int64_t V, float temperature, int32_t top_k, float top_p, float min_p, double u,
                   Scratch& s) {
  float lanes[8];
  for (float& l : lanes) l = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8)
    for (int k = 0; k < 8; ++k) lanes[k] = x[i + k] > lanes[k] ? x[i + k] : lanes[k];
  float m = lanes[0];
  for (int k = 1; k < 8; ++k) m = lanes[k] > m ? lanes[k] : m;
  for (; i < V; ++i) m = x[i] > m ? x[i] : m;
  if (!std::isfinite(m)) return 0;
  float kth = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < V) {  // the k-th largest logit (ties with it stay): counted in 4096 buckets of the
    // logits' order-keeping bits, then selected only among the bucket where the count reaches k
    s.counts.assign(4096, 0);
    for (int64_t j = 0; j < V; ++j) ++s.counts[order_key(x[j]) >> 20];
    int64_t above = 0;
    uint32_t b = 4096;
    while (b-- > 0 && above + s.counts[b] < top_k) above += s.counts[b];
    s.p.clear();
    for (int64_t j = 0; j < V; ++j)
      if ((order_key(x[j]) >> 20) == b) s.p.push_back(x[j]);
    const int64_t need = top_k - above;  // the need-th largest of that bucket
    std::nth_element(s.p.begin(), s.p.begin() + (need - 1), s.p.end(), std::greater<float>());
    kth = s.p[size_t(need - 1)];
  }
  s.p.resize(size_t(V));
  float* p = s.p.data();
  const float inv_t = 1.0f / temperature;
  for (int64_t j = 0; j < V; ++j) {
    const float e = exp_nonpositive((x[j] - m) * inv_t);
    p[j] = x[j] >= kth ? e : 0.0f;
  }
  const double total = sum(p, V);  // top-p's mass is of the top-k set, before min-p
  if (min_p > 0.0f)  // min-p: p >= min_p x the largest (which is 1)
    for (int64_t j = 0; j < V; ++j) p[j] = p[j] >= min_p ? p[j] : 0.0f;
  // top-p: keep a token while the mass of the tokens strictly more likely (ties: lower ids first) is below
  // top_p. Bucketed by the probabilities' bits, the buckets above the one where the mass crosses top_p are
  // kept whole, those below dropped, and only that edge bucket is sorted.
  double kept_mass;
  if (top_p < 1.0f) {
    s.mass.assign(kBuckets, 0.0);
    for (int64_t j = 0; j < V; ++j) s.mass[bucket_of(p[j])] += p[j];  // p = 0 adds 0 to bucket 0
    const double want = double(top_p) * total;
    double before = 0.0;
    uint32_t b = kBuckets;
    while (b-- > 0) {
      if (before + s.mass[b] >= want || b == 0) break;
      before += s.mass[b];
    }
    const uint32_t edge = b;
    s.edge.clear();
    for (int64_t j = 0; j < V; ++j)
      if (p[j] > 0.0f && bucket_of(p[j]) == edge) s.edge.emplace_back(p[j], int32_t(j));
    std::sort(s.edge.begin(), s.edge.end(), [](const auto& a, const auto& c) {
      return a.first > c.first || (a.first == c.first && a.second < c.second);
    });
    float edge_p = 0.0f;
    int32_t edge_i = int32_t(V);
    for (size_t k = 0; k < s.edge.size(); ++k) {  // the first always stays (nothing is more likely)
      if (k > 0 && before >= want) break;
      edge_p = s.edge[k].first;
      edge_i = s.edge[k].second;
      before += s.edge[k].first;
    }
    kept_mass = before;
    // tokens in buckets above the edge stay; in it, those up to (edge_p, edge_i); the rest go
    for (int64_t j = 0; j < V; ++j) {
      const float q = p[j];
      const uint32_t bq = bucket_of(q);
      const bool keep = bq > edge || (bq == edge && (q > edge_p || (q == edge_p && j <= edge_i)));
      p[j] = keep ? q : 0.0f;
    }
  } else {
    kept_mass = sum(p, V);
  }
  // the inverse CDF, in token order: the 256-token block where the mass crosses u, then the token in it
  const double target = u * kept_mass;
  double acc = 0.0;
  int64_t last = -1;
  for (int64_t b0 = 0; b0 < V; b0 += 256) {
    const int64_t n = std::min<int64_t>(256, V - b0);
    const double block = sum(p + b0, n);
    if (block > 0.0) last = b0;
    if (acc + block <= target) {
      acc += block;
      continue;
    }
    for (int64_t j = b0; j < b0 + n; ++j) {
      if (p[j] <= 0.0f) continue;
      acc += p[j];
      if (acc > target) return j;
    }
  }
  for (int64_t j = std::min<int64_t>(V, last + 256) - 1; last >= 0 && j >= last; --j)  // rounding: the last kept
    if (p[j] > 0.0f) return j;
  return 0;
}

}  // namespace

void sample_rows(const float* logits, int64_t rows, int64_t vocab, const float* temperature, const int32_t* top_k,
                 const float* top_p, const float* min_p, const double* u, int64_t* tokens) {
  Scratch s;
  for (int64_t r = 0; r < rows; ++r)
    tokens[r] = sample_row(logits + r * vocab, vocab, temperature[r], top_k[r], top_p[r], min_p[r], u[r], s);
}

}  // namespace metal_engine
