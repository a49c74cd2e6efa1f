// The GEMM of fp_jax's network executor (network.cc): out [M, N] = a [M, K] @ w + bias,
// w packed in panels of 16 columns, [ceil(N/16)][K][16] (the last zero-padded), and
// register-blocked micro-kernels on AVX2 / FMA or, where the CPU has it, AVX-512.
//
// Every output element is bias (or 0) followed by one FMA per k in k order, whichever
// kernel, row blocking or vector width computes it: both paths give the same bits.
#ifndef FP_JAX_INFER_GEMM_H_
#define FP_JAX_INFER_GEMM_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "sep_products.h"

namespace fp_jax {

#define FP_INLINE inline __attribute__((always_inline))

constexpr int kPanel = 16;      // columns per packed weight panel

// True when this CPU runs AVX-512F + VL (the wide GEMM).
inline bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return has;
}

// Column vector j (8 columns from 8 * j) of packed w: its k-th 8 floats at (result) + 16 k.
FP_INLINE const float* Vec8(const float* wp, int64_t K, int64_t j) {
  return wp + (j / 2) * kPanel * K + 8 * (j % 2);
}

// out[r, 8 j0 : 8 (j0 + NV)] for R rows = bias + sum_k a[r, k] * w[k, :] [+ res[r, :], added
// last] (AVX2, 8-column vectors); a rows lda apart, out rows ldo apart, res rows ldr apart,
// bias, out and res at column 8 j0; with Tail only the lanes `mask` selects of the last
// vector are loaded (bias, res) and stored.
template <int R, int NV, bool Tail>
FP_INLINE void Micro(const float* a, int64_t lda, int64_t K, const float* wp, int64_t j0,
                     const float* bias, float* out, int64_t ldo, __m256i mask,
                     const float* res, int64_t ldr) {
  const float* wv[NV];
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    wv[v] = Vec8(wp, K, j0 + v);
    const __m256 b = !bias ? _mm256_setzero_ps()
                     : (Tail && v == NV - 1) ? _mm256_maskload_ps(bias + 8 * v, mask)
                                             : _mm256_loadu_ps(bias + 8 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {   // 4 x 3: 12 FMAs on 3 weight loads and 4 broadcasts
    __m256 w[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(wv[v] + kPanel * k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
  if (res)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const float* q = res + r * ldr + 8 * v;
        acc[r][v] = _mm256_add_ps((Tail && v == NV - 1) ? _mm256_maskload_ps(q, mask)
                                                         : _mm256_loadu_ps(q), acc[r][v]);
      }
#pragma GCC unroll 16
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

// Rows [0, M) of a block of columns, R rows at a time, the last M % R in blocks of 8, 4,
// 2 and 1 rows (smaller than R): `micro(rows, m)` runs rows [m, m + rows).
template <int R, class F>
FP_INLINE void Rows(int64_t M, F micro) {
  int64_t m = 0;
  for (; m + R <= M; m += R) micro(std::integral_constant<int, R>{}, m);
  if constexpr (R > 8) if (M - m >= 8) { micro(std::integral_constant<int, 8>{}, m); m += 8; }
  if constexpr (R > 4) if (M - m >= 4) { micro(std::integral_constant<int, 4>{}, m); m += 4; }
  if constexpr (R > 2) if (M - m >= 2) { micro(std::integral_constant<int, 2>{}, m); m += 2; }
  if (M - m >= 1) micro(std::integral_constant<int, 1>{}, m);
}

template <int MR, int NV, bool Tail = false>
void Panel(const float* a, int64_t lda, int64_t M, int64_t K, const float* wp, int64_t j0,
           const float* bias, float* out, int64_t ldo, const float* res, int64_t ldr,
           __m256i mask = __m256i{}) {
  Rows<MR>(M, [&](auto r, int64_t m) {
    Micro<decltype(r)::value, NV, Tail>(a + m * lda, lda, K, wp, j0, bias, out + m * ldo, ldo,
                                       mask, res ? res + m * ldr : nullptr, ldr);
  });
}

// The AVX2 GEMM: 8-column vectors in blocks of 3 (4 rows), then 2 (6 rows) or 1 (8 rows),
// then a masked vector of the last N % 8 columns.
inline void Gemm8(const float* a, int64_t lda, int64_t M, int64_t K, int64_t N, const float* wp,
                  const float* bias, float* out, int64_t ldo, const float* res, int64_t ldr) {
  const int64_t nv = N / 8;
  const auto at = [&](int64_t j) { return bias ? bias + 8 * j : nullptr; };
  const auto rs = [&](int64_t j) { return res ? res + 8 * j : nullptr; };
  int64_t j = 0;
  for (; j + 3 <= nv; j += 3) Panel<4, 3>(a, lda, M, K, wp, j, at(j), out + 8 * j, ldo, rs(j), ldr);
  if (nv - j == 2)
    Panel<6, 2>(a, lda, M, K, wp, j, at(j), out + 8 * j, ldo, rs(j), ldr);
  else if (nv - j == 1)
    Panel<8, 1>(a, lda, M, K, wp, j, at(j), out + 8 * j, ldo, rs(j), ldr);
  if (N % 8)
    Panel<8, 1, true>(a, lda, M, K, wp, nv, at(nv), out + 8 * nv, ldo, rs(nv), ldr,
                      TailMask(N % 8));
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw")

// The AVX-512 micro-kernel: NZ 16-column vectors (packed panels p0 ..), R rows, res as in
// Micro; with Masked only the lanes m selects of the last vector are loaded (bias, res) and
// stored.
template <int R, int NZ, bool Masked>
FP_INLINE void Micro16(const float* a, int64_t lda, int64_t K, const float* wp,
                       const float* bias, float* out, int64_t ldo, __mmask16 m,
                       const float* res, int64_t ldr) {
  __m512 acc[R][NZ];
#pragma GCC unroll 8
  for (int v = 0; v < NZ; ++v) {
    const __m512 b = !bias ? _mm512_setzero_ps()
                     : (Masked && v == NZ - 1) ? _mm512_maskz_loadu_ps(m, bias + 16 * v)
                                               : _mm512_loadu_ps(bias + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {   // 6 x 4: 24 FMAs on 4 weight loads and 6 broadcasts
    __m512 w[NZ];
#pragma GCC unroll 8
    for (int v = 0; v < NZ; ++v) w[v] = _mm512_loadu_ps(wp + v * kPanel * K + kPanel * k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NZ; ++v) acc[r][v] = _mm512_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
  if (res)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NZ; ++v) {
        const float* q = res + r * ldr + 16 * v;
        acc[r][v] = _mm512_add_ps((Masked && v == NZ - 1) ? _mm512_maskz_loadu_ps(m, q)
                                                           : _mm512_loadu_ps(q), acc[r][v]);
      }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NZ; ++v) {
      if (Masked && v == NZ - 1) {
        _mm512_mask_storeu_ps(out + r * ldo + 16 * v, m, acc[r][v]);
      } else {
        _mm512_storeu_ps(out + r * ldo + 16 * v, acc[r][v]);
      }
    }
}

template <int MR, int NZ, bool Masked = false>
void Panel16(const float* a, int64_t lda, int64_t M, int64_t K, const float* wp,
             const float* bias, float* out, int64_t ldo, const float* res, int64_t ldr,
             __mmask16 mask = 0xffff) {
  Rows<MR>(M, [&](auto r, int64_t m) {
    Micro16<decltype(r)::value, NZ, Masked>(a + m * lda, lda, K, wp, bias, out + m * ldo, ldo,
                                           mask, res ? res + m * ldr : nullptr, ldr);
  });
}

// 8 columns or fewer (vector j of 8 columns) on AVX2 instructions with 12-row blocks
// (AVX-512 has 32 vector registers).
template <bool Tail>
void Panel8Wide(const float* a, int64_t lda, int64_t M, int64_t K, const float* wp, int64_t j,
                const float* bias, float* out, int64_t ldo, const float* res, int64_t ldr,
                __m256i mask) {
  Rows<12>(M, [&](auto r, int64_t m) {
    Micro<decltype(r)::value, 1, Tail>(a + m * lda, lda, K, wp, j, bias, out + m * ldo, ldo,
                                      mask, res ? res + m * ldr : nullptr, ldr);
  });
}

// The AVX-512 GEMM: 16-column vectors in blocks of 4 (6 rows), then 3 (8 rows), 2 or 1
// (12 rows); the last N % 16 columns as one masked 16-column vector (more than 8) or one
// 8-column vector (8 or fewer, masked below 8).
inline void Gemm16(const float* a, int64_t lda, int64_t M, int64_t K, int64_t N, const float* wp,
                   const float* bias, float* out, int64_t ldo, const float* res, int64_t ldr) {
  const int64_t nz = N / kPanel, rem = N % kPanel, P = kPanel * K;
  const auto at = [&](int64_t z) { return bias ? bias + kPanel * z : nullptr; };
  const auto rs = [&](int64_t z) { return res ? res + kPanel * z : nullptr; };
  int64_t z = 0;
  for (; z + 4 <= nz; z += 4)
    Panel16<6, 4>(a, lda, M, K, wp + z * P, at(z), out + kPanel * z, ldo, rs(z), ldr);
  switch (nz - z) {
    case 3: Panel16<8, 3>(a, lda, M, K, wp + z * P, at(z), out + kPanel * z, ldo, rs(z), ldr); break;
    case 2: Panel16<12, 2>(a, lda, M, K, wp + z * P, at(z), out + kPanel * z, ldo, rs(z), ldr); break;
    case 1: Panel16<12, 1>(a, lda, M, K, wp + z * P, at(z), out + kPanel * z, ldo, rs(z), ldr); break;
    default: break;
  }
  if (rem > 8) {
    Panel16<12, 1, true>(a, lda, M, K, wp + nz * P, at(nz), out + kPanel * nz, ldo, rs(nz), ldr,
                         static_cast<__mmask16>((1u << rem) - 1));
  } else if (rem == 8) {
    Panel8Wide<false>(a, lda, M, K, wp, 2 * nz, at(nz), out + kPanel * nz, ldo, rs(nz), ldr,
                      __m256i{});
  } else if (rem > 0) {
    Panel8Wide<true>(a, lda, M, K, wp, 2 * nz, at(nz), out + kPanel * nz, ldo, rs(nz), ldr,
                     TailMask(rem));
  }
}

#pragma GCC pop_options

// out [M, N] (rows ldo apart) = a [M, K] (rows lda apart) @ w + bias [+ res [M, N] (rows ldr
// apart; null: none), added to each finished sum], w packed [ceil(N/16)][K][16]; wide: the
// AVX-512 kernels (the caller checks HasAvx512()).
inline void Gemm(const float* a, int64_t lda, int64_t M, int64_t K, int64_t N, const float* wp,
                 const float* bias, float* out, int64_t ldo, bool wide,
                 const float* res = nullptr, int64_t ldr = 0) {
  if (wide) {
    Gemm16(a, lda, M, K, N, wp, bias, out, ldo, res, ldr);
  } else {
    Gemm8(a, lda, M, K, N, wp, bias, out, ldo, res, ldr);
  }
}

}  // namespace fp_jax

#endif  // FP_JAX_INFER_GEMM_H_
