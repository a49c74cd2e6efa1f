// Pieces fp_jax's CPU kernels share (depthwise.cc, sep_train.cc, conv_train.cc,
// network.cc): the register-blocked depthwise rows, the hand-out of independent chunks to
// XLA's intra-op thread pool, and the small helpers around it.
#ifndef FP_JAX_INFER_KERNEL_COMMON_H_
#define FP_JAX_INFER_KERNEL_COMMON_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace fp_jax {

#define FP_KC_INLINE inline __attribute__((always_inline))

constexpr int kWB = 4;          // output pixels along W per register block
constexpr int kSpins = 1 << 16; // pause loops (~1 ms) before the caller sleeps
// Handing chunks to the pool costs ~15-25 us a call (waking a worker), so only calls of at
// least this many multiply-adds are split: on a 2-core Xeon the split of the depthwise broke
// even near 2-3.7 M (1.04x at 3.7 M, 1.3x at 7.4 M, 2.1x at 24 M; 0.6x at 0.37 M, a batch-1
// 32x32x40 3x3). Smaller calls run on the calling thread.
constexpr int64_t kMinParallelMacs = 1 << 22;

// One output row: y[q, c] = sum_{i,j} xr[i][ow + S*q + j, c] * wt[i, j, c], q < Wo, xr[i]
// the padded input row kernel row i reads.
template <int K, int S>
void RowP(const float* const* xr, int64_t ow, int64_t Wo, int64_t C, const float* wt,
          float* y) {
  const int64_t C8 = C / 8 * 8;
  constexpr int NV = (kWB - 1) * S + K;     // input vectors one block of outputs reads per row
  for (int64_t c = 0; c < C8; c += 8) {
    int64_t q0 = 0;
    for (; q0 + kWB <= Wo; q0 += kWB) {
      __m256 acc[kWB];
      for (int q = 0; q < kWB; ++q) acc[q] = _mm256_setzero_ps();
      for (int i = 0; i < K; ++i) {
        const float* r = xr[i] + (ow + S * q0) * C + c;
        __m256 xv[NV];
        for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(r + v * C);
        for (int j = 0; j < K; ++j) {
          const __m256 wv = _mm256_loadu_ps(wt + (i * K + j) * C + c);
          for (int q = 0; q < kWB; ++q) acc[q] = _mm256_fmadd_ps(xv[S * q + j], wv, acc[q]);
        }
      }
      for (int q = 0; q < kWB; ++q) _mm256_storeu_ps(y + (q0 + q) * C + c, acc[q]);
    }
    for (; q0 < Wo; ++q0) {
      __m256 acc = _mm256_setzero_ps();
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr[i] + (ow + S * q0 + j) * C + c),
                                _mm256_loadu_ps(wt + (i * K + j) * C + c), acc);
      _mm256_storeu_ps(y + q0 * C + c, acc);
    }
  }
  for (int64_t c = C8; c < C; ++c)
    for (int64_t q = 0; q < Wo; ++q) {
      float acc = 0.f;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j)
          acc += xr[i][(ow + S * q + j) * C + c] * wt[(i * K + j) * C + c];
      y[q * C + c] = acc;
    }
}

// RowP on the K slab rows from xp, Wp padded pixels of C floats each.
template <int K, int S>
void Row(const float* xp, int64_t Wp, int64_t ow, int64_t Wo, int64_t C, const float* wt,
         float* y) {
  const float* xr[K];
  for (int i = 0; i < K; ++i) xr[i] = xp + i * Wp * C;
  RowP<K, S>(xr, ow, Wo, C, wt, y);
}

// Rows [r0, r1) of x_b [H, W, C] + bias [C] (null: none), ReLU'd when relu, inside a zero
// border of P pixels: slab row r - r0 holds input row r - P (zeros above and below the
// image), W + 2P pixels of C floats each (the depthwise kernels' input).
template <int P>
inline void PaddedRows(const float* xb, int64_t H, int64_t W, int64_t C, const float* bias,
                       bool relu, int64_t r0, int64_t r1, float* slab) {
  const int64_t Wp = W + 2 * P;
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = slab + (r - r0) * Wp * C;
    const int64_t h = r - P;
    if (h < 0 || h >= H) {
      std::memset(dst, 0, sizeof(float) * Wp * C);
      continue;
    }
    std::memset(dst, 0, sizeof(float) * P * C);
    std::memset(dst + (P + W) * C, 0, sizeof(float) * P * C);
    const float* src = xb + h * W * C;
    float* d = dst + P * C;
    if (C % 8 == 0) {   // max(0, v) keeps v when v is -0 or NaN, as the scalar form does
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t w = 0; w < W; ++w, d += C, src += C)
        for (int64_t c = 0; c < C; c += 8) {
          __m256 v = _mm256_loadu_ps(src + c);
          if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + c));
          _mm256_storeu_ps(d + c, relu ? _mm256_max_ps(zero, v) : v);
        }
      continue;
    }
    for (int64_t w = 0; w < W; ++w, d += C, src += C)
      for (int64_t c = 0; c < C; ++c) {
        const float v = bias ? src[c] + bias[c] : src[c];
        d[c] = relu && v < 0.f ? 0.f : v;
      }
  }
}

// Row with blocks of 8 output pixels x 8 channels (C a multiple of 8): per tap (i, j) one
// weight vector and 8 input loads for 8 FMAs into 8 independent accumulators (Row's 4 chains
// leave half of the FMA units idle at 4 cycles of FMA latency). The sum order over taps is
// Row's, row-major (i, j), so the result is Row's bit for bit (network.cc: its depthwise).
template <int K, int S>
void Row8(const float* const* xr, int64_t ow, int64_t Wo, int64_t C, const float* wt,
          float* y) {
  constexpr int B = 8;
  int64_t q0 = 0;
  for (; q0 + B <= Wo; q0 += B)
    for (int64_t c = 0; c < C; c += 8) {
      __m256 acc[B];
#pragma GCC unroll 8
      for (int q = 0; q < B; ++q) acc[q] = _mm256_setzero_ps();
#pragma GCC unroll 5
      for (int i = 0; i < K; ++i) {
        const float* r = xr[i] + (ow + S * q0) * C + c;
#pragma GCC unroll 5
        for (int j = 0; j < K; ++j) {
          const __m256 wv = _mm256_loadu_ps(wt + (i * K + j) * C + c);
#pragma GCC unroll 8
          for (int q = 0; q < B; ++q)
            acc[q] = _mm256_fmadd_ps(_mm256_loadu_ps(r + (S * q + j) * C), wv, acc[q]);
        }
      }
#pragma GCC unroll 8
      for (int q = 0; q < B; ++q) _mm256_storeu_ps(y + (q0 + q) * C + c, acc[q]);
    }
  if (q0 < Wo)      // the last Wo % 8 outputs: Row's blocks of 4 and single pixels
    RowP<K, S>(xr, ow + S * q0, Wo - q0, C, wt, y + q0 * C);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw")

// Vectors of 16 (AVX-512) and 8 (AVX2 instructions, 32 registers) floats for Row8Wide.
struct V16 {
  using T = __m512;
  static constexpr int L = 16;
  static FP_KC_INLINE T Zero() { return _mm512_setzero_ps(); }
  static FP_KC_INLINE T Load(const float* p) { return _mm512_loadu_ps(p); }
  static FP_KC_INLINE T Fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static FP_KC_INLINE void Store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
struct V8 {
  using T = __m256;
  static constexpr int L = 8;
  static FP_KC_INLINE T Zero() { return _mm256_setzero_ps(); }
  static FP_KC_INLINE T Load(const float* p) { return _mm256_loadu_ps(p); }
  static FP_KC_INLINE T Fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static FP_KC_INLINE void Store(float* p, T v) { _mm256_storeu_ps(p, v); }
};

// 8 output pixels x V::L channels from c: per kernel row i the (8 - 1) * S + K input vectors
// it reads are loaded once and shared by the K taps (Row8 loads one per FMA; AVX-512's 32
// registers hold them). Taps are summed in Row8's order: the same bits.
template <class V, int K, int S>
FP_KC_INLINE void Block8(const float* const* xr, int64_t off, int64_t C, const float* wt,
                         float* y) {
  constexpr int B = 8, NX = (B - 1) * S + K;
  typename V::T acc[B];
#pragma GCC unroll 8
  for (int q = 0; q < B; ++q) acc[q] = V::Zero();
#pragma GCC unroll 5
  for (int i = 0; i < K; ++i) {
    const float* r = xr[i] + off;
    typename V::T xv[NX];
#pragma GCC unroll 19
    for (int v = 0; v < NX; ++v) xv[v] = V::Load(r + v * C);
#pragma GCC unroll 5
    for (int j = 0; j < K; ++j) {
      const typename V::T wv = V::Load(wt + (i * K + j) * C);
#pragma GCC unroll 8
      for (int q = 0; q < B; ++q) acc[q] = V::Fma(xv[S * q + j], wv, acc[q]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < B; ++q) V::Store(y + q * C, acc[q]);
}

// Row8 on AVX-512 (C a multiple of 8): blocks of 16 channels, then one of 8.
template <int K, int S>
void Row8Wide(const float* const* xr, int64_t ow, int64_t Wo, int64_t C, const float* wt,
              float* y) {
  int64_t q0 = 0;
  for (; q0 + 8 <= Wo; q0 += 8) {
    const int64_t x0 = (ow + S * q0) * C;
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) Block8<V16, K, S>(xr, x0 + c, C, wt + c, y + q0 * C + c);
    if (c < C) Block8<V8, K, S>(xr, x0 + c, C, wt + c, y + q0 * C + c);
  }
  if (q0 < Wo)      // the last Wo % 8 outputs: Row's blocks of 4 and single pixels
    RowP<K, S>(xr, ow + S * q0, Wo - q0, C, wt, y + q0 * C);
}

#pragma GCC pop_options

// Runs fn(t) for t in [0, total) on the calling thread and up to n - 1 threads of XLA's
// intra-op pool, which take chunks from a shared counter. The caller waits only for chunks
// already taken by running threads, so a pool whose threads are all busy cannot deadlock
// it (a late task finds no chunk left and returns). Each chunk must write its own outputs
// only: the result then does not depend on n.
inline void RunChunks(xla::ffi::ThreadPool& pool, int64_t total, int64_t n,
                      std::function<void(int64_t)> fn) {
  struct Shared {
    std::function<void(int64_t)> fn;
    int64_t total;
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
    void Work() {       // take chunks until none is left
      for (int64_t t; (t = next.fetch_add(1)) < total;) {
        fn(t);
        if (done.fetch_add(1) + 1 == total) {
          std::lock_guard<std::mutex> lock(mu);
          cv.notify_all();
        }
      }
    }
  };
  auto s = std::make_shared<Shared>();
  s->fn = std::move(fn);
  s->total = total;
  const int64_t helpers = std::min(n - 1, total - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([s] { s->Work(); });
  s->Work();
  // the chunks left are being computed by running threads: spin briefly (a sleeping
  // caller would add a wake-up, tens of microseconds, to every call), then sleep
  for (int spin = 0; spin < kSpins && s->done.load() != s->total; ++spin) _mm_pause();
  if (s->done.load() != s->total) {
    std::unique_lock<std::mutex> lock(s->mu);
    s->cv.wait(lock, [&] { return s->done.load() == s->total; });
  }
}

// How many threads a call with `macs` multiply-adds takes: `threads` (> 0) capped at the
// pool's, else all of the pool's for calls of at least kMinParallelMacs, else 1.
inline int64_t Threads(xla::ffi::ThreadPool& pool, int64_t threads, int64_t macs) {
  int64_t n = pool.num_threads();
  n = std::max<int64_t>(1, threads > 0 ? std::min(threads, std::max<int64_t>(n, 1)) : n);
  return threads == 0 && macs < kMinParallelMacs ? 1 : n;
}

// dst[i] = sum over n blocks of src[b * m + i], added in block order (sums over images that
// do not depend on which thread computed which image).
inline void SumBlocks(const float* src, int64_t n, int64_t m, float* dst) {
  std::copy(src, src + m, dst);
  for (int64_t b = 1; b < n; ++b)
    for (int64_t i = 0; i < m; ++i) dst[i] += src[b * m + i];
}

// o is [d0, d1, d2, last].
inline bool Same4(xla::ffi::Span<const int64_t> o, xla::ffi::Span<const int64_t> d,
                  int64_t last) {
  return o.size() == 4 && o[0] == d[0] && o[1] == d[1] && o[2] == d[2] && o[3] == last;
}

// The first 64-byte boundary at or after p (std::vector's storage is only 16-byte aligned: a
// large one starts 16 bytes past a page, so every other 32-byte vector there would straddle
// two cache lines). Buffers rounded this way are allocated 16 floats longer.
inline float* Align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// Thread-local scratch buffer i (< 6) of at least n floats, 64-byte aligned.
inline float* Scratch(int i, int64_t n) {
  thread_local std::vector<float> buf[6];
  if (static_cast<int64_t>(buf[i].size()) < n + 16) buf[i].resize(n + 16);
  return Align64(buf[i].data());
}

}  // namespace fp_jax

#endif  // FP_JAX_INFER_KERNEL_COMMON_H_
