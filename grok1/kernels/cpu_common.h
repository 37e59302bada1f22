// What grok1's native CPU kernels share (grok1/kernels/cpu_products.cc, grok1/kernels/cpu_attention.cc): loads
// that convert int8 / bfloat16 / float32 to eight floats, a horizontal sum, and the work sharing
// that runs a kernel's items on XLA's intra-op thread pool.

#ifndef GROK1_CPU_COMMON_H_
#define GROK1_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GROK1_AVX2 1
#else
#define GROK1_AVX2 0
#endif

#include "xla/ffi/api/ffi.h"

// The library is built with -fvisibility=hidden: only symbols marked so are exported.
#define GROK1_EXPORT extern "C" __attribute__((visibility("default")))

namespace grok1_cpu {

namespace ffi = xla::ffi;

using bf16_bits = uint16_t;  // a bfloat16, as its bits

inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(bf16_bits v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if GROK1_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
inline __m256 load8(const bf16_bits* p) {
  __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Work items in contiguous spans, one per thread: a thread takes the items of its own span in
// order (one unbroken stream through memory, which the hardware prefetcher follows across items),
// then helps finish the other spans. (Against one shared counter, which interleaves the threads'
// items: bench-1b's decode-step int8 experts 6.77 -> 6.35 ms, the bfloat16 table 9.67 -> 9.13 ms,
// medians of four alternating rounds on 2 Zen 3 cores.) Whoever takes an item finishes it; the
// caller drains every span, so the call completes even if no helper ever runs, and waits only
// for items a helper has begun. The state is shared-owned so a helper that starts after the call
// returned finds no items and touches nothing else.
struct Shared {
  struct alignas(64) Span {  // a cache line each: the threads' counters do not share one
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::unique_ptr<Span[]> spans;
  int64_t span_count = 0;
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> work;
  std::mutex mu;
  std::condition_variable cv;

  Shared(int64_t total_items, int64_t threads, std::function<void(int64_t)> fn)
      : spans(new Span[threads]), span_count(threads), total(total_items), work(std::move(fn)) {
    for (int64_t t = 0; t < threads; ++t) {
      spans[t].next.store(total * t / threads, std::memory_order_relaxed);
      spans[t].end = total * (t + 1) / threads;
    }
  }
  void drain(int64_t first_span) {
    for (int64_t k = 0; k < span_count; ++k) {
      Span& span = spans[(first_span + k) % span_count];
      for (int64_t item; (item = span.next.fetch_add(1, std::memory_order_relaxed)) < span.end;) {
        work(item);
        if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == total) {
          std::lock_guard<std::mutex> lock(mu);
          cv.notify_all();
        }
      }
    }
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done.load(std::memory_order_acquire) == total; });
  }
};

inline int64_t env_threads() {
  const char* s = std::getenv("GROK1_NATIVE_THREADS");
  return s ? std::atoll(s) : 0;
}

// `max_threads` > 0 caps the threads (grok1/kernels/platform.py: on a mesh, the process's cores shared
// among its devices, whose programs already run side by side); GROK1_NATIVE_THREADS overrides.
inline void run_parallel(ffi::ThreadPool& pool, int64_t total, int64_t bytes_per_item,
                  std::function<void(int64_t)> work, int64_t max_threads = 0) {
  int64_t threads = env_threads();
  if (threads <= 0 && max_threads > 0) threads = max_threads;
  if (threads <= 0) {
    int64_t cores = std::max<unsigned>(1, std::thread::hardware_concurrency());
    threads = std::min<int64_t>(cores, std::max<int64_t>(1, pool.num_threads()));
  }
  // Below ~256 KiB of weight a second thread costs more than it saves.
  int64_t useful = std::max<int64_t>(1, total * bytes_per_item / (256 << 10));
  threads = std::min({threads, total, useful});
  if (threads <= 1) {
    for (int64_t i = 0; i < total; ++i) work(i);
    return;
  }
  auto shared = std::make_shared<Shared>(total, threads, std::move(work));
  if (pool.num_threads() > 0) {
    for (int64_t h = 1; h < threads; ++h) pool.Schedule([shared, h] { shared->drain(h); });
    shared->drain(0);
    shared->wait();
  } else {  // no intra-op pool: plain threads, joined before returning
    std::vector<std::thread> helpers;
    for (int64_t h = 1; h < threads; ++h) helpers.emplace_back([shared, h] { shared->drain(h); });
    shared->drain(0);
    for (auto& t : helpers) t.join();
  }
}

inline std::string dims_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

}  // namespace grok1_cpu

#endif  // GROK1_CPU_COMMON_H_
