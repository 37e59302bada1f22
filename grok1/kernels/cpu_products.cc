// A few rows times a chunked int8 (block scales) or bfloat16 weight on CPU, reading the weight
// once: the XLA FFI target behind grok1/kernels/native.py.
//
// Why: XLA:CPU streams an int8/bfloat16 weight at memory bandwidth only in a one-row
// matrix-vector product; 2-16 rows in one product fall 10-50x below it, so grok1 runs a few rows
// as one-row products, each reading the weight again. Here all rows that use one weight share one
// pass over it, the convert fused into the loop.
//
// Semantics (see grok1/weights/layout.py, LinearWeight, groups == 1):
//   x       float32 [P, n_in]          the rows
//   index   int32   [P]                which stack entry s each row multiplies
//   values  int8 | bfloat16 [S, C, O, R]  n_in = C * R; chunk c = input positions c*R .. c*R+R-1,
//                                       stored [O, R] (a row of it contiguous over the input)
//   scales  bfloat16 | float32 [S, B, O]  (scaled target only) input block b = positions
//                                       b*(n_in/B) ..; each chunk lies inside one block
//   y       float32 [P, O]
//   y[p, o] = sum_c scale[index[p], block(c), o] * sum_r x[p, c*R + r] * values[index[p], c, o, r]
// Products are accumulated in float32, each chunk's dot then scaled (dot-then-scale). Every
// output element is computed by one thread in a fixed order, so results do not depend on the
// thread count or on scheduling.
//
// Work: rows are grouped by stack index (each group one pass over its weight); the work items
// are (group, run of output columns), in one contiguous span per thread (cpu_common.h,
// run_parallel) for the calling thread and helpers scheduled on XLA's intra-op thread pool. The
// caller itself drains every span, so the call completes even if no helper ever runs; it only
// waits for items a helper has begun.

#include <numeric>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace grok1_cpu;

// Output columns per work item (a multiple of kColumnStep).
constexpr int64_t kColumnsPerItem = 64;
// Columns handled together for one chunk: their weight rows are read from memory once and
// then from L1 for every further tile of rows.
constexpr int64_t kColumnStep = 4;
// The weight rows of kColumnStep columns are short streams (R bytes each) that the hardware
// prefetcher barely learns before they end: the weight this many columns ahead is prefetched
// explicitly, a line per column as the loop reaches it, and for two rows (little compute per
// byte) also the whole step at once when it starts; measured best of these on Zen 3 (a
// prefetch past the end of the buffer is harmless: it never faults).
constexpr int64_t kPrefetchColumns = 2 * kColumnStep;

inline void prefetch_slab(const void* start, int64_t bytes) {
#if GROK1_AVX2
  const char* p = static_cast<const char*>(start);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
#else
  (void)start, (void)bytes;
#endif
}

// Rows per register tile (6 rows x 2 columns: 12 accumulators, 2 weight vectors and one row
// vector in the 16 ymm registers; measured faster than 8 x 1 or 4 x 2).
constexpr int kMaxTileRows = 6;


// dots[i][j] = sum_r xs[i][r] * w[j * R + r] for NR rows and NC weight rows (columns) of length R.
template <int NR, int NC, typename W>
inline void tile_dots(const float* const* xs, const W* w, int64_t R, float (*dots)[kColumnStep]) {
  int64_t r = 0;
#if GROK1_AVX2
  constexpr int64_t kLine = 64 / sizeof(W);  // weight elements per cache line
  __m256 acc[NR][NC];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm256_setzero_ps();
  for (; r + 8 <= R; r += 8) {  // fully unrolled over the tile: the accumulators stay in registers
    __m256 wv[NC];
    if ((r & (kLine - 1)) == 0) {  // the same line kPrefetchColumns columns ahead
#pragma GCC unroll 8
      for (int j = 0; j < NC; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + (j + kPrefetchColumns) * R + r), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) wv[j] = load8(w + j * R + r);
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      __m256 xv = _mm256_loadu_ps(xs[i] + r);
      if (NC > 1) asm("" : "+x"(xv));  // one load per row, not one per column (GCC re-loads)
#pragma GCC unroll 8
      for (int j = 0; j < NC; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) dots[i][j] = hsum(acc[i][j]);
#else
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) dots[i][j] = 0.0f;
#endif
  for (; r < R; ++r) {  // the tail (all of it without AVX2), in order
    for (int j = 0; j < NC; ++j) {
      float wf = to_float(w[j * R + r]);
      for (int i = 0; i < NR; ++i) dots[i][j] += xs[i][r] * wf;
    }
  }
}

#if GROK1_AVX2
// How far ahead of the one-row loop its weight is prefetched: the hardware prefetcher stops at
// each 4 KiB page, and a column of R weights ends within a few lines. On the bench-1b decode
// step's shapes (Zen 3, 2 cores, medians of four alternating rounds, with per-thread spans):
// int8 experts 6.35 ms with none, 6.20 ms 2 KiB ahead, 6.84 ms 8 KiB ahead; table 9.13, 9.03,
// 9.88 ms.
#ifndef GROK1_ROW_PREFETCH
#define GROK1_ROW_PREFETCH 2048
#endif
constexpr int64_t kRowPrefetchBytes = GROK1_ROW_PREFETCH;

// One row times one column, four accumulators along the input: for one row the columns are read
// one after another, a single sequential stream the hardware prefetcher follows (measured 1.8x
// faster for the bfloat16 table than interleaving kColumnStep columns, and no slower for int8).
template <typename W>
inline float row_dot(const float* x, const W* w, int64_t R) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t r = 0;
  for (; r + 32 <= R; r += 32) {
    if (sizeof(W) * 32 >= 64 || (r & 63) == 0)  // a line per 64 bytes of weight
      _mm_prefetch(reinterpret_cast<const char*>(w + r) + kRowPrefetchBytes, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + r), load8(w + r), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + r + 8), load8(w + r + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + r + 16), load8(w + r + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + r + 24), load8(w + r + 24), a3);
  }
  for (; r + 8 <= R; r += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + r), load8(w + r), a0);
  float d = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; r < R; ++r) d += x[r] * to_float(w[r]);
  return d;
}
#endif

// NR rows times `columns` (<= kColumnStep) adjacent weight rows: picks a register tile that keeps
// at most 12 accumulators live.
template <int NR, typename W>
inline void step_dots(const float* const* xs, const W* w, int64_t R, int64_t columns,
                      float (*dots)[kColumnStep]) {
#if GROK1_AVX2
  if (NR == 1) {
    for (int64_t j = 0; j < columns; ++j) dots[0][j] = row_dot(xs[0], w + j * R, R);
    return;
  }
#endif
  if (columns == kColumnStep && NR <= 2) {
    tile_dots<NR, 4>(xs, w, R, dots);
  } else if (columns == kColumnStep && NR <= 6) {
    float part[NR][kColumnStep];
    tile_dots<NR, 2>(xs, w, R, dots);
    tile_dots<NR, 2>(xs, w + 2 * R, R, part);
    for (int i = 0; i < NR; ++i) dots[i][2] = part[i][0], dots[i][3] = part[i][1];
  } else {
    float part[NR][kColumnStep];
    for (int64_t j = 0; j < columns; ++j) {
      tile_dots<NR, 1>(xs, w + j * R, R, part);
      for (int i = 0; i < NR; ++i) dots[i][j] = part[i][0];
    }
  }
}

template <typename W>
void dots_any(int rows, const float* const* xs, const W* w, int64_t R, int64_t columns,
              float (*dots)[kColumnStep]) {
  switch (rows) {
    case 1: return step_dots<1>(xs, w, R, columns, dots);
    case 2: return step_dots<2>(xs, w, R, columns, dots);
    case 3: return step_dots<3>(xs, w, R, columns, dots);
    case 4: return step_dots<4>(xs, w, R, columns, dots);
    case 5: return step_dots<5>(xs, w, R, columns, dots);
    default: return step_dots<6>(xs, w, R, columns, dots);
  }
}

enum class ScaleType { kNone, kF32, kBF16 };

struct Problem {
  const float* x;
  const int32_t* index;
  const void* values;
  const void* scales;
  ScaleType scale_type;
  int64_t P, S, C, O, R, B, n_in;
  float* y;
  std::vector<int32_t> order;         // row ids sorted (stably) by stack index
  std::vector<int64_t> group_start;   // groups: order[group_start[g] .. group_start[g + 1])
  int64_t items_per_group;

  float scale(int64_t s, int64_t b, int64_t o) const {
    int64_t at = (s * B + b) * O + o;
    switch (scale_type) {
      case ScaleType::kF32: return static_cast<const float*>(scales)[at];
      case ScaleType::kBF16: return to_float(static_cast<const bf16_bits*>(scales)[at]);
      default: return 1.0f;
    }
  }
};

// One work item: the rows of group g times output columns [o0, o1) of their weight.
template <typename W>
void run_item(const Problem& pb, int64_t item) {
  const int64_t g = item / pb.items_per_group;
  const int64_t o0 = (item % pb.items_per_group) * kColumnsPerItem;
  const int64_t o1 = std::min(pb.O, o0 + kColumnsPerItem);
  const int32_t* rows = pb.order.data() + pb.group_start[g];
  const int64_t n_rows = pb.group_start[g + 1] - pb.group_start[g];
  const int64_t s = pb.index[rows[0]];
  const W* values = static_cast<const W*>(pb.values);
  const int64_t block_len = pb.n_in / pb.B;

  for (int64_t i = 0; i < n_rows; ++i) std::fill(pb.y + rows[i] * pb.O + o0, pb.y + rows[i] * pb.O + o1, 0.0f);
  // Row tiles of near-equal size, at most kMaxTileRows each.
  const int64_t n_tiles = (n_rows + kMaxTileRows - 1) / kMaxTileRows;
  const float* xs[kMaxTileRows];
  float dots[kMaxTileRows][kColumnStep];
  for (int64_t c = 0; c < pb.C; ++c) {
    const int64_t block = (c * pb.R) / block_len;
    const W* chunk = values + (s * pb.C + c) * pb.O * pb.R;
    for (int64_t o = o0; o < o1; o += kColumnStep) {
      const int64_t columns = std::min(kColumnStep, o1 - o);
      if (n_rows == 2)  // little compute per byte: the in-loop prefetch alone falls behind
        prefetch_slab(chunk + (o + kPrefetchColumns) * pb.R, kColumnStep * pb.R * sizeof(W));
      float scale[kColumnStep];
      for (int64_t j = 0; j < columns; ++j) scale[j] = pb.scale(s, block, o + j);
      for (int64_t t = 0, start = 0; t < n_tiles; ++t) {
        const int64_t count = (n_rows - start) / (n_tiles - t);
        for (int64_t i = 0; i < count; ++i) xs[i] = pb.x + rows[start + i] * pb.n_in + c * pb.R;
        dots_any<W>(static_cast<int>(count), xs, chunk + o * pb.R, pb.R, columns, dots);
        for (int64_t i = 0; i < count; ++i) {
          float* y = pb.y + rows[start + i] * pb.O + o;
          for (int64_t j = 0; j < columns; ++j) y[j] += scale[j] * dots[i][j];
        }
        start += count;
      }
    }
  }
}


ffi::Error invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("grok1 rows_times: " + message);
}

ffi::Error rows_times(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer index,
                      ffi::AnyBuffer values, const ffi::AnyBuffer* scales,
                      ffi::Result<ffi::AnyBuffer> y, int64_t max_threads) {
  if (x.element_type() != ffi::DataType::F32 || x.dimensions().size() != 2)
    return invalid("x must be float32 [P, n_in], got " + dims_string(x.dimensions()));
  if (index.element_type() != ffi::DataType::S32 || index.dimensions().size() != 1)
    return invalid("index must be int32 [P], got " + dims_string(index.dimensions()));
  const bool int8 = values.element_type() == ffi::DataType::S8;
  if ((!int8 && values.element_type() != ffi::DataType::BF16) || values.dimensions().size() != 4)
    return invalid("values must be int8 or bfloat16 [S, C, O, R], got " +
                   dims_string(values.dimensions()));
  Problem pb;
  auto vd = values.dimensions();
  pb.P = x.dimensions()[0];
  pb.n_in = x.dimensions()[1];
  pb.S = vd[0], pb.C = vd[1], pb.O = vd[2], pb.R = vd[3];
  pb.B = 1;
  if (index.dimensions()[0] != pb.P)
    return invalid("index has " + std::to_string(index.dimensions()[0]) + " entries for " +
                   std::to_string(pb.P) + " rows of x");
  if (pb.C * pb.R != pb.n_in)
    return invalid("x has " + std::to_string(pb.n_in) + " inputs per row but values " +
                   dims_string(vd) + " hold C * R = " + std::to_string(pb.C * pb.R));
  pb.scale_type = ScaleType::kNone;
  pb.scales = nullptr;
  if (scales) {
    auto sd = scales->dimensions();
    if (scales->element_type() == ffi::DataType::F32) pb.scale_type = ScaleType::kF32;
    else if (scales->element_type() == ffi::DataType::BF16) pb.scale_type = ScaleType::kBF16;
    else return invalid("scales must be float32 or bfloat16");
    if (sd.size() != 3 || sd[0] != pb.S || sd[2] != pb.O || sd[1] < 1)
      return invalid("scales must be [S, B, O] = [" + std::to_string(pb.S) + ", B, " +
                     std::to_string(pb.O) + "], got " + dims_string(sd));
    pb.B = sd[1];
    if (pb.n_in % pb.B != 0 || (pb.n_in / pb.B) % pb.R != 0)
      return invalid("each chunk of " + std::to_string(pb.R) + " inputs must lie inside one of " +
                     std::to_string(pb.B) + " scale blocks of " + std::to_string(pb.n_in) +
                     " inputs");
    pb.scales = scales->untyped_data();
  }
  auto yd = y->dimensions();
  if (y->element_type() != ffi::DataType::F32 || yd.size() != 2 || yd[0] != pb.P || yd[1] != pb.O)
    return invalid("y must be float32 [P, O] = [" + std::to_string(pb.P) + ", " +
                   std::to_string(pb.O) + "], got " + dims_string(yd));
  pb.x = static_cast<const float*>(x.untyped_data());
  pb.index = static_cast<const int32_t*>(index.untyped_data());
  pb.values = values.untyped_data();
  pb.y = static_cast<float*>(y->untyped_data());
  if (pb.P == 0 || pb.O == 0) return ffi::Error::Success();
  for (int64_t p = 0; p < pb.P; ++p)
    if (pb.index[p] < 0 || pb.index[p] >= pb.S)
      return invalid("index[" + std::to_string(p) + "] = " + std::to_string(pb.index[p]) +
                     " is outside the stack of " + std::to_string(pb.S));
  if (pb.n_in == 0) {
    std::fill(pb.y, pb.y + pb.P * pb.O, 0.0f);
    return ffi::Error::Success();
  }

  pb.order.resize(pb.P);
  std::iota(pb.order.begin(), pb.order.end(), 0);
  std::stable_sort(pb.order.begin(), pb.order.end(),
                   [&](int32_t a, int32_t b) { return pb.index[a] < pb.index[b]; });
  for (int64_t p = 0; p < pb.P; ++p)
    if (p == 0 || pb.index[pb.order[p]] != pb.index[pb.order[p - 1]]) pb.group_start.push_back(p);
  pb.group_start.push_back(pb.P);
  const int64_t groups = static_cast<int64_t>(pb.group_start.size()) - 1;
  pb.items_per_group = (pb.O + kColumnsPerItem - 1) / kColumnsPerItem;
  const int64_t item_bytes = kColumnsPerItem * pb.n_in * (int8 ? 1 : 2);
  if (int8) {
    run_parallel(pool, groups * pb.items_per_group, item_bytes,
                 [&pb](int64_t i) { run_item<int8_t>(pb, i); }, max_threads);
  } else {
    run_parallel(pool, groups * pb.items_per_group, item_bytes,
                 [&pb](int64_t i) { run_item<bf16_bits>(pb, i); }, max_threads);
  }
  return ffi::Error::Success();
}

ffi::Error rows_times_scaled(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer index,
                             ffi::AnyBuffer values, ffi::AnyBuffer scales,
                             ffi::Result<ffi::AnyBuffer> y, int64_t threads) {
  return rows_times(pool, x, index, values, &scales, y, threads);
}

ffi::Error rows_times_unscaled(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer index,
                               ffi::AnyBuffer values, ffi::Result<ffi::AnyBuffer> y,
                               int64_t threads) {
  return rows_times(pool, x, index, values, nullptr, y, threads);
}

}  // namespace

GROK1_EXPORT XLA_FFI_Error* Grok1RowsTimesScaled(XLA_FFI_CallFrame* call_frame);
GROK1_EXPORT XLA_FFI_Error* Grok1RowsTimesUnscaled(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1RowsTimesScaled, rows_times_scaled,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // index
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("threads"));  // 0: as many as help

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1RowsTimesUnscaled, rows_times_unscaled,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // index
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("threads"));  // 0: as many as help

// Which code path this build took, for the log line.
GROK1_EXPORT int grok1_native_simd() { return GROK1_AVX2; }
