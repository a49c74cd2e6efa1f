// The per-image products of sep_train.cc and conv_train.cc (fp_jax's training kernels for a
// sep_conv half and for a conv),
// each on rows of NHWC pixels held in cache: the ReLU'd input slab, the pointwise GEMM,
// its weight gradient, the depthwise weight gradient, the channel sums and the backward
// through the ReLU and the input affine. All run on AVX2 vectors of 8 channels; a width
// that is not a multiple of 8 ends in one masked vector (loads and stores touch only the
// n < 8 channels that exist).
#ifndef FP_JAX_INFER_SEP_PRODUCTS_H_
#define FP_JAX_INFER_SEP_PRODUCTS_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fp_jax {

// Lanes < n set (n >= 8: all).
inline __m256i TailMask(int64_t n) {
  alignas(32) static const int32_t kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                 0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(kLanes + 8 - std::min<int64_t>(n, 8)));
}

// Loads / stores of a whole vector (F) or of the lanes mask m selects (a tail).
template <bool F>
inline __m256 Ld(const float* p, __m256i m) {
  if constexpr (F) return _mm256_loadu_ps(p);
  return _mm256_maskload_ps(p, m);
}

template <bool F>
inline void St(float* p, __m256i m, __m256 v) {
  if constexpr (F) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, m, v);
  }
}

template <bool F>
inline void AddSt(float* p, __m256i m, __m256 v) { St<F>(p, m, _mm256_add_ps(Ld<F>(p, m), v)); }

// fn(c, full, mask) for each vector of channels c, c+8, ... < n: `full` a std::true_type for
// whole vectors (plain loads and stores compiled in), std::false_type for the tail.
template <class Fn>
inline void ForVectors(int64_t n, Fn fn) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) fn(c, std::true_type{}, __m256i{});
  if (c < n) fn(c, std::false_type{}, TailMask(n - c));
}

// slab [(H+2P), (W+2P), L] = ReLU(x_b * a + b) (Relu false: x_b * a + b) inside a zero
// border of P pixels, x_b [H, W, C] filling the first C of each slab pixel's L >= C floats
// (L 0: C; K 1 with L = J*C packs J inputs' channels side by side, one call each).
template <int K, bool Relu = true>
inline void InputSlab(const float* xb, const float* a, const float* bias, int64_t H, int64_t W,
                     int64_t C, float* slab, int64_t L = 0) {
  constexpr int P = K / 2;
  if (L == 0) L = C;
  const int64_t Wp = W + 2 * P;
  const __m256 zero = _mm256_setzero_ps();
  std::memset(slab, 0, sizeof(float) * P * Wp * L);
  std::memset(slab + (P + H) * Wp * L, 0, sizeof(float) * P * Wp * L);
  for (int64_t h = 0; h < H; ++h) {
    float* d = slab + (h + P) * Wp * L;
    std::memset(d, 0, sizeof(float) * P * L);
    std::memset(d + (P + W) * L, 0, sizeof(float) * P * L);
    const float* s = xb + h * W * C;
    d += P * L;
    ForVectors(C, [&](int64_t c, auto full, __m256i m) {
      constexpr bool F = decltype(full)::value;
      const __m256 av = Ld<F>(a + c, m), bv = Ld<F>(bias + c, m);
      for (int64_t w = 0; w < W; ++w) {
        const __m256 u = _mm256_fmadd_ps(Ld<F>(s + w * C + c, m), av, bv);
        St<F>(d + w * L + c, m, Relu ? _mm256_max_ps(zero, u) : u);
      }
    });
  }
}

// out[q, d0 + :cols] = z[q, :] @ wp[:, d0 + :cols] for q < n, cols <= 8 * DV (F: cols ==
// 8 * DV); wp and out have D columns. PB pixels' DV output vectors at a time (independent
// FMA chains), each weight vector loaded once per PB pixels.
template <int DV, bool F>
inline void PointwiseBlock(const float* z, int64_t n, int64_t C, const float* wp, int64_t D,
                           int64_t cols, float* out) {
  constexpr int PB = DV <= 2 ? 4 : 2;
  const __m256i m = TailMask(cols - 8 * (DV - 1));     // the last vector's lanes
  int64_t q = 0;
  for (; q + PB <= n; q += PB) {
    __m256 acc[PB][DV];
    for (int b = 0; b < PB; ++b)
      for (int v = 0; v < DV; ++v) acc[b][v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      __m256 w[DV];
      for (int v = 0; v < DV - 1; ++v) w[v] = _mm256_loadu_ps(wp + c * D + 8 * v);
      w[DV - 1] = Ld<F>(wp + c * D + 8 * (DV - 1), m);
      for (int b = 0; b < PB; ++b) {
        const __m256 zb = _mm256_broadcast_ss(z + (q + b) * C + c);
        for (int v = 0; v < DV; ++v) acc[b][v] = _mm256_fmadd_ps(zb, w[v], acc[b][v]);
      }
    }
    for (int b = 0; b < PB; ++b) {
      for (int v = 0; v < DV - 1; ++v) _mm256_storeu_ps(out + (q + b) * D + 8 * v, acc[b][v]);
      St<F>(out + (q + b) * D + 8 * (DV - 1), m, acc[b][DV - 1]);
    }
  }
  for (; q < n; ++q) {
    __m256 acc[DV];
    for (int v = 0; v < DV; ++v) acc[v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m256 zb = _mm256_broadcast_ss(z + q * C + c);
      for (int v = 0; v < DV - 1; ++v)
        acc[v] = _mm256_fmadd_ps(zb, _mm256_loadu_ps(wp + c * D + 8 * v), acc[v]);
      acc[DV - 1] = _mm256_fmadd_ps(zb, Ld<F>(wp + c * D + 8 * (DV - 1), m), acc[DV - 1]);
    }
    for (int v = 0; v < DV - 1; ++v) _mm256_storeu_ps(out + q * D + 8 * v, acc[v]);
    St<F>(out + q * D + 8 * (DV - 1), m, acc[DV - 1]);
  }
}

template <int DV>
inline void PointwiseCols(const float* z, int64_t n, int64_t C, const float* wp, int64_t D,
                          int64_t cols, float* out) {
  if (cols == 8 * DV) {
    PointwiseBlock<DV, true>(z, n, C, wp, D, cols, out);
  } else {
    PointwiseBlock<DV, false>(z, n, C, wp, D, cols, out);
  }
}

// out[q, :] = z[q, :] @ wp for q < n: z [n, C], wp [C, D], out [n, D], in column blocks of
// up to 32.
inline void Pointwise(const float* z, int64_t n, int64_t C, int64_t D, const float* wp,
                      float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const int64_t cols = std::min<int64_t>(32, D - d0);
    switch ((cols + 7) / 8) {
      case 1: PointwiseCols<1>(z, n, C, wp + d0, D, cols, out + d0); break;
      case 2: PointwiseCols<2>(z, n, C, wp + d0, D, cols, out + d0); break;
      case 3: PointwiseCols<3>(z, n, C, wp + d0, D, cols, out + d0); break;
      default: PointwiseCols<4>(z, n, C, wp + d0, D, cols, out + d0); break;
    }
  }
}

// acc[c, :] += sum_q z[q, c] * g[q, :] for q < n: z [n, C], g [n, D], acc [C, D]; blocks of
// 8 rows of acc stay in registers over the n pixels.
inline void OuterAdd(const float* z, const float* g, int64_t n, int64_t C, int64_t D,
                     float* acc) {
  constexpr int CB = 8;
  ForVectors(D, [&](int64_t d, auto full, __m256i m) {
    constexpr bool F = decltype(full)::value;
    for (int64_t c0 = 0; c0 < C; c0 += CB) {
      const int64_t cb = std::min<int64_t>(CB, C - c0);
      __m256 a[CB];
      for (int i = 0; i < CB; ++i) a[i] = _mm256_setzero_ps();
      for (int64_t q = 0; q < n; ++q) {
        const __m256 gv = Ld<F>(g + q * D + d, m);
        const float* zq = z + q * C + c0;
        for (int i = 0; i < CB; ++i)
          if (i < cb) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(zq + i), gv, a[i]);
      }
      for (int i = 0; i < cb; ++i) AddSt<F>(acc + (c0 + i) * D + d, m, a[i]);
    }
  });
}

// gwd[i, j, c] = sum_{o < Ho, q < Wo} xs[oh + S*o + i, ow + S*q + j, c] * gz[o, q, c]: the
// depthwise weight gradient at stride S (xs the zero-bordered input slab, Wp pixels a row;
// gz the output's cotangent, gz_row floats a row). Per tap row i and channel vector, the K
// taps' sums in registers.
template <int K, int S>
inline void TapSums(const float* xs, int64_t Wp, const float* gz, int64_t gz_row, int64_t Ho,
                    int64_t Wo, int64_t oh, int64_t ow, int64_t C, float* gwd) {
  for (int i = 0; i < K; ++i)
    ForVectors(C, [&](int64_t c, auto full, __m256i m) {
      constexpr bool F = decltype(full)::value;
      __m256 acc[K];
      for (int j = 0; j < K; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t o = 0; o < Ho; ++o) {
        const float* a = xs + ((oh + S * o + i) * Wp + ow) * C + c;
        const float* g = gz + o * gz_row + c;
        for (int64_t q = 0; q < Wo; ++q) {
          const __m256 gv = Ld<F>(g + q * C, m);
          for (int j = 0; j < K; ++j)
            acc[j] = _mm256_fmadd_ps(Ld<F>(a + (S * q + j) * C, m), gv, acc[j]);
        }
      }
      for (int j = 0; j < K; ++j) St<F>(gwd + (i * K + j) * C + c, m, acc[j]);
    });
}

// s1[d] += sum_q y[q, d], s2[d] += sum_q y[q, d]^2 for q < n: y [n, D].
inline void ChannelSums(const float* y, int64_t n, int64_t D, float* s1, float* s2) {
  ForVectors(D, [&](int64_t d, auto full, __m256i m) {
    constexpr bool F = decltype(full)::value;
    __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
    for (int64_t q = 0; q < n; ++q) {
      const __m256 v = Ld<F>(y + q * D + d, m);
      a1 = _mm256_add_ps(a1, v);
      a2 = _mm256_fmadd_ps(v, v, a2);
    }
    AddSt<F>(s1 + d, m, a1);
    AddSt<F>(s2 + d, m, a2);
  });
}

// out[q, d] = gy[q, d] + g1[d] + 2 y[q, d] g2[d] for q < n: y's whole cotangent when its
// channel sums [sum y, sum y^2] have the cotangents g1, g2 [D].
inline void SumsCotangent(const float* gy, const float* y, const float* g1, const float* g2,
                          int64_t n, int64_t D, float* out) {
  const __m256 two = _mm256_set1_ps(2.f);
  ForVectors(D, [&](int64_t d, auto full, __m256i m) {
    constexpr bool F = decltype(full)::value;
    const __m256 c1 = Ld<F>(g1 + d, m), c2 = _mm256_mul_ps(two, Ld<F>(g2 + d, m));
    for (int64_t q = 0; q < n; ++q)
      St<F>(out + q * D + d, m, _mm256_fmadd_ps(Ld<F>(y + q * D + d, m), c2,
                                                _mm256_add_ps(Ld<F>(gy + q * D + d, m), c1)));
  });
}

// One row of n pixels back through u = ReLU(x * a + b) (Relu false: u = x * a + b):
// g = (u > 0) * gu (Relu false: gu); gx = g * a, ga += sum_q g * x, gb += sum_q g.
// gu, u [n] pixels of L floats (L 0: C; their first C are read), x, gx [n, C]; a, ga, gb [C];
// u is not read when Relu is false.
template <bool Relu = true>
inline void AffineBackward(const float* gu, const float* u, const float* x, const float* a,
                           int64_t n, int64_t C, float* gx, float* ga, float* gb,
                           int64_t L = 0) {
  if (L == 0) L = C;
  const __m256 zero = _mm256_setzero_ps();
  ForVectors(C, [&](int64_t c, auto full, __m256i m) {
    constexpr bool F = decltype(full)::value;
    const __m256 av = Ld<F>(a + c, m);
    __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
    for (int64_t q = 0; q < n; ++q) {
      const int64_t i = q * C + c, l = q * L + c;
      __m256 g = Ld<F>(gu + l, m);
      if constexpr (Relu) g = _mm256_and_ps(_mm256_cmp_ps(Ld<F>(u + l, m), zero, _CMP_GT_OQ), g);
      St<F>(gx + i, m, _mm256_mul_ps(g, av));
      sa = _mm256_fmadd_ps(g, Ld<F>(x + i, m), sa);
      sb = _mm256_add_ps(sb, g);
    }
    AddSt<F>(ga + c, m, sa);
    AddSt<F>(gb + c, m, sb);
  });
}

}  // namespace fp_jax

#endif  // FP_JAX_INFER_SEP_PRODUCTS_H_
