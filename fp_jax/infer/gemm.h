// The GEMM of fp_jax's network executor (network.cc): out [M, N] = a [M, K] @ w + bias,
// w packed in panels of 8 columns, register-blocked micro-kernels on AVX2 / FMA.
#ifndef FP_JAX_INFER_GEMM_H_
#define FP_JAX_INFER_GEMM_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "sep_products.h"

namespace fp_jax {

#define FP_INLINE inline __attribute__((always_inline))

// out[r, 0:8*NV] for R rows = bias + sum_k a[r, k] * wp[v][k][:] for the panel's vectors v;
// a rows lda apart, out rows ldo apart; with Tail only the lanes `mask` selects of the last
// vector are loaded (bias) and stored. An element's k-order and FMA chain do not depend on
// R, so any row blocking gives the same bits.
template <int R, int NV, bool Tail>
FP_INLINE void Micro(const float* a, int64_t lda, int64_t K, const float* wp, int64_t kstride,
                     const float* bias, float* out, int64_t ldo, __m256i mask) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const __m256 b = !bias ? _mm256_setzero_ps()
                     : (Tail && v == NV - 1) ? _mm256_maskload_ps(bias + 8 * v, mask)
                                             : _mm256_loadu_ps(bias + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {   // 12 FMAs on 3 weight loads and 4 broadcasts (4 x 3)
    __m256 w[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(wp + v * kstride + 8 * k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (Tail && v == NV - 1) {
        _mm256_maskstore_ps(out + r * ldo + 8 * v, mask, acc[r][v]);
      } else {
        _mm256_storeu_ps(out + r * ldo + 8 * v, acc[r][v]);
      }
    }
}

// Rows [m, m + rows) with rows < MR: one at a time (the same FMA chain per element).
template <int NV, bool Tail>
void MicroRows(const float* a, int64_t lda, int64_t K, const float* wp, int64_t kstride,
               const float* bias, float* out, int64_t ldo, int rows, __m256i mask) {
  for (int r = 0; r < rows; ++r)
    Micro<1, NV, Tail>(a + r * lda, lda, K, wp, kstride, bias, out + r * ldo, ldo, mask);
}

template <int MR, int NV, bool Tail = false>
void Panel(const float* a, int64_t lda, int64_t M, int64_t K, const float* wp,
           const float* bias, float* out, int64_t ldo, __m256i mask = __m256i{}) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    Micro<MR, NV, Tail>(a + m * lda, lda, K, wp, 8 * K, bias, out + m * ldo, ldo, mask);
  if (m < M)
    MicroRows<NV, Tail>(a + m * lda, lda, K, wp, 8 * K, bias, out + m * ldo, ldo,
                        static_cast<int>(M - m), mask);
}

// out [M, N] (rows ldo apart) = a [M, K] (rows lda apart) @ w + bias; w packed [ceil(N/8)][K][8].
inline void Gemm(const float* a, int64_t lda, int64_t M, int64_t K, int64_t N, const float* wp,
          const float* bias, float* out, int64_t ldo) {
  const int64_t nv = N / 8;
  int64_t v = 0;
  for (; v + 3 <= nv; v += 3)
    Panel<4, 3>(a, lda, M, K, wp + v * 8 * K, bias ? bias + 8 * v : nullptr, out + 8 * v, ldo);
  if (nv - v == 2)
    Panel<6, 2>(a, lda, M, K, wp + v * 8 * K, bias ? bias + 8 * v : nullptr, out + 8 * v, ldo);
  else if (nv - v == 1)
    Panel<8, 1>(a, lda, M, K, wp + v * 8 * K, bias ? bias + 8 * v : nullptr, out + 8 * v, ldo);
  if (N % 8)     // a last panel of N % 8 columns (packed zero-padded to 8)
    Panel<8, 1, true>(a, lda, M, K, wp + nv * 8 * K, bias ? bias + 8 * nv : nullptr,
                      out + 8 * nv, ldo, fp_jax::TailMask(N % 8));
}

}  // namespace fp_jax

#endif  // FP_JAX_INFER_GEMM_H_
