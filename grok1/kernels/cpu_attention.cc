// Grok-1's attention for a decode step, read straight out of the stacked KV cache: the XLA FFI
// target behind grok1/kernels/native.py's `cached_attention`.
//
// Why: XLA:CPU multiplies a few queries by the cache [L, B, S, N, K] only after copying the
// layer's keys and values into a [B, N, K, S] / [B, N, S, K] order, every layer of every step
// (measured: about 9 of 80 ms of a bench-1b batch-8 step). Here each (row, kv head) reads its keys
// and values once, in place, and skips the positions no query may see (past the row's length).
//
// Semantics (grok1/model.py, MultiHeadAttention; H = N * G query heads):
//   q       float32 [B, T, N, G, K]        this step's queries (after RoPE)
//   keys    float32 | bfloat16 [L, B, S, N, K]   the cache, every layer
//   values  as keys
//   layer   int32 []                       which layer of the cache to read
//   mask    bool [B, T, S]                 which keys each query may see
//   out     float32 [B, T, N, G, K]
//   logit[s] = cap * tanh(multiplier * (q . keys[layer, b, s, n]) / cap)  if mask[b, t, s]
//              masked_logit                                               otherwise
//   out[b, t, n, g] = sum_s softmax(logit)[s] * values[layer, b, s, n]
// in float32, as the model computes it (exp and tanh to within a few float32 ulps of the
// correctly rounded ones). A query that sees no key averages all S values, as the model does.

#include <cmath>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace grok1_cpu;

#if GROK1_AVX2
// e^x for x in [-87.3, 88.3] (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times
// 2^n); below that range 0 (the float32 result would be a denormal, or 0, anyway).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 in_range = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                             _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), in_range);
}

// tanh(x): an odd polynomial below |x| 0.625 (Cephes' tanhf), else 1 - 2 / (e^2|x| + 1) with x's
// sign (no cancellation there: the result is at least 0.55).
inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 e = exp8(_mm256_min_ps(_mm256_add_ps(ax, ax), _mm256_set1_ps(88.0f)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 large = _mm256_or_ps(
      _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one))), sign);
  return _mm256_blendv_ps(large, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}
#endif

struct Problem {
  const float* q;
  const void* keys;
  const void* values;
  const bool* mask;
  float* out;
  int64_t L, B, T, N, G, K, S, layer;
  float multiplier, cap, masked_logit;
};

template <typename C>
inline float dot(const float* q, const C* k, int64_t K) {
  int64_t i = 0;
  float d = 0.0f;
#if GROK1_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; i + 16 <= K; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
  }
  for (; i + 8 <= K; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  d = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; i < K; ++i) d += q[i] * to_float(k[i]);
  return d;
}

// logits[0, n) -> softmax weights in place: cap * tanh(multiplier * x / cap) where `seen`, else
// masked_logit; then exp(x - max) / sum.
inline void softmax_in_place(float* x, const bool* seen, int64_t n, float multiplier, float cap,
                             float masked_logit) {
  int64_t s = 0;
  const float scale = multiplier / cap;
#if GROK1_AVX2
  for (; s + 8 <= n; s += 8) {
    __m256 capped = _mm256_mul_ps(_mm256_set1_ps(cap),
                                  tanh8(_mm256_mul_ps(_mm256_loadu_ps(x + s), _mm256_set1_ps(scale))));
    // seen[s .. s+8) as an all-ones / all-zeros lane mask
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(seen + s)));
    __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
    _mm256_storeu_ps(x + s, _mm256_blendv_ps(_mm256_set1_ps(masked_logit), capped, keep));
  }
#endif
  for (; s < n; ++s) x[s] = seen[s] ? cap * std::tanh(x[s] * scale) : masked_logit;
  float top = x[0];
  for (int64_t i = 1; i < n; ++i) top = std::max(top, x[i]);
  float total = 0.0f;
  s = 0;
#if GROK1_AVX2
  __m256 sum8 = _mm256_setzero_ps();
  for (; s + 8 <= n; s += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + s), _mm256_set1_ps(top)));
    _mm256_storeu_ps(x + s, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  total = hsum(sum8);
#endif
  for (; s < n; ++s) total += (x[s] = std::exp(x[s] - top));
  for (int64_t i = 0; i < n; ++i) x[i] /= total;
}

// A head's keys (values) of successive positions lie N * K apart: a stride the hardware
// prefetcher does not follow across pages, so each position's is fetched this many ahead (a
// prefetch past the end of the buffer is harmless: it never faults).
constexpr int64_t kPrefetchPositions = 8;

template <typename C>
inline void prefetch_row(const C* start, int64_t K) {
#if GROK1_AVX2
  const char* p = reinterpret_cast<const char*>(start);
  for (int64_t b = 0; b < K * static_cast<int64_t>(sizeof(C)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
#else
  (void)start, (void)K;
#endif
}

// out[0, K) = sum over positions s in `used` of w[s] * v[s * stride + (0, K)]: 64 outputs at a
// time held in eight registers through all positions (the rows come from L2 after the first
// query of a head read them).
template <typename C>
void weigh_values(const float* w, const std::vector<int32_t>& used, const C* v, int64_t stride,
                  int64_t K, float* out) {
  int64_t k0 = 0;
#if GROK1_AVX2
  for (; k0 + 64 <= K; k0 += 64) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (size_t i = 0; i < used.size(); ++i) {
      const int64_t s = used[i];
      if (i + kPrefetchPositions < used.size())
        prefetch_row(v + used[i + kPrefetchPositions] * stride + k0, 64);
      const __m256 w8 = _mm256_set1_ps(w[s]);
      const C* row = v + s * stride + k0;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(w8, load8(row + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + k0 + 8 * j, acc[j]);
  }
#endif
  for (int64_t k = k0; k < K; ++k) {  // what is left of K (all of it without AVX2), in order
    float sum = 0.0f;
    for (int32_t s : used) sum += w[s] * to_float(v[s * stride + k]);
    out[k] = sum;
  }
}

// One work item: every query of row b that reads kv head n.
template <typename C>
void run_item(const Problem& pb, int64_t item, std::vector<float>& weights,
              std::vector<int32_t>& positions, std::vector<char>& query_sees_any) {
  const int64_t b = item / pb.N, n = item % pb.N;
  const int64_t Q = pb.T * pb.G, S = pb.S, K = pb.K;
  const C* keys = static_cast<const C*>(pb.keys);
  const C* values = static_cast<const C*>(pb.values);
  // position s of (layer, b, n): base + s * stride
  const int64_t base = ((pb.layer * pb.B + b) * S * pb.N + n) * K, stride = pb.N * K;
  const bool* mask = pb.mask + b * pb.T * S;        // [T, S]
  auto query = [&](int64_t t, int64_t g) { return pb.q + (((b * pb.T + t) * pb.N + n) * pb.G + g) * K; };

  // Positions from `seen_end` on are seen by no query of this row (typically the cache past the
  // row's length): their logit is masked_logit for every query, so they weigh exactly 0 for a
  // query that sees any position, and the work below stops there. A query that sees none
  // weighs all S positions alike (every logit is masked_logit), as the model does.
  int64_t seen_end = 0;
  bool query_seeing_none = false;
  std::vector<char>& sees_any = query_sees_any;  // [T]: whether token t sees any position
  sees_any.assign(pb.T, 0);
  for (int64_t t = 0; t < pb.T; ++t) {
    int64_t last = -1;
    for (int64_t s = 0; s < S; ++s)
      if (mask[t * S + s]) last = s;
    seen_end = std::max(seen_end, last + 1);
    sees_any[t] = last >= 0;
    query_seeing_none |= last < 0;
  }
  const int64_t span = query_seeing_none ? S : seen_end;  // positions some weight may touch
  weights.resize(Q * S);
  if (query_seeing_none) std::fill(weights.begin(), weights.end(), 0.0f);

  // A position no query of this row sees is left out of the dots: its logit is masked_logit.
  for (int64_t s = 0; s < seen_end; ++s) {
    bool any = false;
    for (int64_t t = 0; t < pb.T; ++t) any |= mask[t * S + s];
    if (!any) continue;
    const C* k = keys + base + s * stride;
    prefetch_row(keys + base + (s + kPrefetchPositions) * stride, K);
    for (int64_t t = 0; t < pb.T; ++t)
      for (int64_t g = 0; g < pb.G; ++g) weights[(t * pb.G + g) * S + s] = dot(query(t, g), k, K);
  }
  for (int64_t t = 0; t < pb.T; ++t) {
    for (int64_t g = 0; g < pb.G; ++g) {
      float* w = weights.data() + (t * pb.G + g) * S;
      if (sees_any[t])
        softmax_in_place(w, mask + t * S, seen_end, pb.multiplier, pb.cap, pb.masked_logit);
      else
        std::fill(w, w + S, 1.0f / static_cast<float>(S));
    }
  }

  // Values weighed exactly 0 by every query (the unseen positions, unless a query sees none)
  // are not read.
  std::vector<int32_t>& used = positions;
  used.clear();
  for (int64_t s = 0; s < span; ++s) {
    bool any = false;
    for (int64_t i = 0; i < Q; ++i) any |= weights[i * S + s] != 0.0f;
    if (any) used.push_back(static_cast<int32_t>(s));
  }
  for (int64_t t = 0; t < pb.T; ++t)
    for (int64_t g = 0; g < pb.G; ++g)
      weigh_values(weights.data() + (t * pb.G + g) * S, used, values + base, stride, K,
                   pb.out + (((b * pb.T + t) * pb.N + n) * pb.G + g) * K);
}

ffi::Error invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("grok1 cached_attention: " + message);
}

ffi::Error cached_attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer keys,
                            ffi::AnyBuffer values, ffi::AnyBuffer layer, ffi::AnyBuffer mask,
                            ffi::Result<ffi::AnyBuffer> out, float multiplier, float cap,
                            float masked_logit, int64_t threads) {
  auto qd = q.dimensions(), kd = keys.dimensions(), md = mask.dimensions();
  if (q.element_type() != ffi::DataType::F32 || qd.size() != 5)
    return invalid("q must be float32 [B, T, N, G, K], got " + dims_string(qd));
  const bool bf16 = keys.element_type() == ffi::DataType::BF16;
  if ((!bf16 && keys.element_type() != ffi::DataType::F32) || kd.size() != 5 ||
      values.element_type() != keys.element_type() || values.dimensions().size() != 5)
    return invalid("keys and values must be float32 or bfloat16 [L, B, S, N, K] alike, got " +
                   dims_string(kd) + " and " + dims_string(values.dimensions()));
  for (int i = 0; i < 5; ++i)
    if (values.dimensions()[i] != kd[i])
      return invalid("keys " + dims_string(kd) + " and values " + dims_string(values.dimensions()) +
                     " differ");
  Problem pb;
  pb.B = qd[0], pb.T = qd[1], pb.N = qd[2], pb.G = qd[3], pb.K = qd[4];
  pb.L = kd[0], pb.S = kd[2];
  if (kd[1] != pb.B || kd[3] != pb.N || kd[4] != pb.K)
    return invalid("q " + dims_string(qd) + " does not match the cache " + dims_string(kd));
  if (mask.element_type() != ffi::DataType::PRED || md.size() != 3 || md[0] != pb.B ||
      md[1] != pb.T || md[2] != pb.S)
    return invalid("mask must be bool [B, T, S] = [" + std::to_string(pb.B) + ", " +
                   std::to_string(pb.T) + ", " + std::to_string(pb.S) + "], got " + dims_string(md));
  if (layer.element_type() != ffi::DataType::S32 || layer.dimensions().size() != 0)
    return invalid("layer must be an int32 scalar");
  pb.layer = *static_cast<const int32_t*>(layer.untyped_data());
  if (pb.layer < 0 || pb.layer >= pb.L)
    return invalid("layer " + std::to_string(pb.layer) + " is outside the cache's " +
                   std::to_string(pb.L) + " layers");
  if (out->element_type() != ffi::DataType::F32 || out->dimensions().size() != 5)
    return invalid("out must be float32 like q");
  pb.q = static_cast<const float*>(q.untyped_data());
  pb.keys = keys.untyped_data();
  pb.values = values.untyped_data();
  pb.mask = static_cast<const bool*>(mask.untyped_data());
  pb.out = static_cast<float*>(out->untyped_data());
  pb.multiplier = multiplier, pb.cap = cap, pb.masked_logit = masked_logit;
  const int64_t items = pb.B * pb.N;
  if (items == 0 || pb.T * pb.G * pb.K == 0) return ffi::Error::Success();
  if (pb.S == 0) {
    std::fill(pb.out, pb.out + items * pb.T * pb.G * pb.K, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t item_bytes = 2 * pb.S * pb.K * (bf16 ? 2 : 4);
  auto work = [&pb, bf16](int64_t item) {
    thread_local std::vector<float> weights;
    thread_local std::vector<int32_t> positions;
    thread_local std::vector<char> sees_any;
    if (bf16) run_item<bf16_bits>(pb, item, weights, positions, sees_any);
    else run_item<float>(pb, item, weights, positions, sees_any);
  };
  run_parallel(pool, items, item_bytes, work, threads);
  return ffi::Error::Success();
}

}  // namespace

GROK1_EXPORT XLA_FFI_Error* Grok1CachedAttention(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1CachedAttention, cached_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // keys
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Arg<ffi::AnyBuffer>()  // layer
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<float>("multiplier")
                                  .Attr<float>("cap")
                                  .Attr<float>("masked_logit")
                                  .Attr<int64_t>("threads"));  // 0: as many as help
