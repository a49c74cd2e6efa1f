// fp_jax's training kernels for one half of a separable conv: (affine) -> ReLU -> depthwise
// -> pointwise, and its output's channel sums (an XLA FFI pair; built and registered by
// kernels.py, used by layers.sep_conv's custom VJP).
//
// Forward:  u = ReLU(x * a + b) (a, b [C]: the previous BN as an affine, or 1 and 0),
//           y = pointwise(depthwise_kxk(u, wd), wp), stride 1, SAME zero padding, and
//           sums = [sum y, sum y^2] over (B, H, W) (the next BN's statistics), NHWC f32:
//           x [B,H,W,C], wd [k,k,C] (k = 3 or 5), wp [C,D] -> y [B,H,W,D], sums [2,D].
// Backward: from x, a, b, wd, wp, y and the cotangents gy [B,H,W,D], gsums [2,D]:
//           gx [B,H,W,C], gab [2,C] (of a and b), gwd [k,k,C], gwp [C,D]. Each image's
//           terms of the sums over images are added in image order after all images are
//           done, so no result depends on the thread count.
//
// Why: in XLA one half is about fifteen memory-bound passes over [B,H,W,C] (ReLU + pad, the
// k*k shift-sum, three dots with [N, C]-rooted producers, the weight-gradient reductions,
// the ReLU mask, BN's statistics, its affine and their cotangents), each at a few GB/s when
// C is 8-16. Here one image is one chunk: its ReLU'd, zero-bordered slab and its cotangent
// slab stay in L1/L2 while every product is taken from them, and the images are spread
// over XLA's intra-op threads (kernel_common.h). The depthwise rows are depthwise.cc's
// register-blocked ones (row-major tap order, as layers._shift_sum), so results agree
// with XLA's to rounding.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "kernel_common.h"

namespace ffi = xla::ffi;

namespace {

using fp_jax::Row;

constexpr int64_t kMinParallelMacs = 1 << 22;   // as depthwise.cc: smaller calls run alone

struct Sep {
  const float* x;
  const float* a;       // [C]: u = ReLU(x * a + b)
  const float* b;       // [C]
  const float* wd;      // [k,k,C]
  const float* wd_flip; // wd rotated by 180 degrees: the transposed depthwise
  const float* wp;      // [C,D]
  const float* wp_t;    // [D,C]
  const float* gy;
  const float* y_in;    // the forward's y (backward: the sums' cotangent needs it)
  const float* gsums;   // [2, D]
  float* y;
  float* sums;          // per image [2, D] (forward); the caller adds them in order
  float* gab;           // per image [2, C] (backward)
  float* gx;
  float* gwd;
  float* gwp;
  int64_t B, H, W, C, D;
};

// slab [(H+2P), (W+2P), C] = ReLU(x_b * a + b) inside a zero border of P pixels.
template <int K>
void ReluSlab(const float* xb, const float* a, const float* bias, int64_t H, int64_t W,
              int64_t C, float* slab) {
  constexpr int P = K / 2;
  const int64_t Wp = W + 2 * P;
  std::memset(slab, 0, sizeof(float) * P * Wp * C);
  std::memset(slab + (P + H) * Wp * C, 0, sizeof(float) * P * Wp * C);
  for (int64_t h = 0; h < H; ++h) {
    float* d = slab + (h + P) * Wp * C;
    std::memset(d, 0, sizeof(float) * P * C);
    std::memset(d + (P + W) * C, 0, sizeof(float) * P * C);
    const float* s = xb + h * W * C;
    d += P * C;
    if (C % 8 == 0) {
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t w = 0; w < W; ++w, d += C, s += C)
        for (int64_t c = 0; c < C; c += 8)
          _mm256_storeu_ps(d + c, _mm256_max_ps(zero, _mm256_fmadd_ps(
              _mm256_loadu_ps(s + c), _mm256_loadu_ps(a + c), _mm256_loadu_ps(bias + c))));
      continue;
    }
    for (int64_t w = 0; w < W; ++w, d += C, s += C)
      for (int64_t c = 0; c < C; ++c) {
        const float v = s[c] * a[c] + bias[c];
        d[c] = v > 0.f ? v : 0.f;
      }
  }
}

// out[q, :] = z[q, :] @ wp for q < n, D = 8 * DV: PB pixels' DV output vectors at a time
// (independent FMA chains), each weight vector loaded once per PB pixels.
template <int DV>
void PointwiseV(const float* z, int64_t n, int64_t C, const float* wp, float* out) {
  constexpr int PB = DV <= 2 ? 4 : 2;
  constexpr int64_t D = 8 * DV;
  int64_t q = 0;
  for (; q + PB <= n; q += PB) {
    __m256 acc[PB][DV];
    for (int b = 0; b < PB; ++b)
      for (int v = 0; v < DV; ++v) acc[b][v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      __m256 w[DV];
      for (int v = 0; v < DV; ++v) w[v] = _mm256_loadu_ps(wp + c * D + 8 * v);
      for (int b = 0; b < PB; ++b) {
        const __m256 zb = _mm256_broadcast_ss(z + (q + b) * C + c);
        for (int v = 0; v < DV; ++v) acc[b][v] = _mm256_fmadd_ps(zb, w[v], acc[b][v]);
      }
    }
    for (int b = 0; b < PB; ++b)
      for (int v = 0; v < DV; ++v) _mm256_storeu_ps(out + (q + b) * D + 8 * v, acc[b][v]);
  }
  for (; q < n; ++q) {
    __m256 acc[DV];
    for (int v = 0; v < DV; ++v) acc[v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m256 zb = _mm256_broadcast_ss(z + q * C + c);
      for (int v = 0; v < DV; ++v)
        acc[v] = _mm256_fmadd_ps(zb, _mm256_loadu_ps(wp + c * D + 8 * v), acc[v]);
    }
    for (int v = 0; v < DV; ++v) _mm256_storeu_ps(out + q * D + 8 * v, acc[v]);
  }
}

// out[q, :] = z[q, :] @ wp for q < n: z [n, C], wp [C, D], out [n, D].
void Pointwise(const float* z, int64_t n, int64_t C, int64_t D, const float* wp, float* out) {
  switch (D) {
    case 8: return PointwiseV<1>(z, n, C, wp, out);
    case 16: return PointwiseV<2>(z, n, C, wp, out);
    case 24: return PointwiseV<3>(z, n, C, wp, out);
    case 32: return PointwiseV<4>(z, n, C, wp, out);
    default: break;
  }
  for (int64_t q = 0; q < n; ++q) {
    float* __restrict o = out + q * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const float zc = z[q * C + c];
      const float* __restrict w = wp + c * D;
      for (int64_t d = 0; d < D; ++d) o[d] += zc * w[d];
    }
  }
}

std::vector<float>& Scratch(int i) {
  thread_local std::vector<float> buf[5];
  return buf[i];
}

float* Sized(int i, int64_t n) {
  auto& v = Scratch(i);
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// acc[c, :] += sum_q z[q, c] * g[q, :] for q < n: z [n, C], g [n, D], acc [C, D]. With D a
// multiple of 8, blocks of CB rows of acc stay in registers over the n pixels.
void OuterAdd(const float* z, const float* g, int64_t n, int64_t C, int64_t D, float* acc) {
  if (D % 8 != 0) {
    for (int64_t q = 0; q < n; ++q)
      for (int64_t c = 0; c < C; ++c) {
        const float zc = z[q * C + c];
        const float* __restrict gq = g + q * D;
        float* __restrict a = acc + c * D;
        for (int64_t d = 0; d < D; ++d) a[d] += zc * gq[d];
      }
    return;
  }
  constexpr int CB = 8;
  for (int64_t d = 0; d < D; d += 8)
    for (int64_t c0 = 0; c0 < C; c0 += CB) {
      const int64_t cb = std::min<int64_t>(CB, C - c0);
      __m256 a[CB];
      for (int i = 0; i < CB; ++i) a[i] = _mm256_setzero_ps();
      for (int64_t q = 0; q < n; ++q) {
        const __m256 gv = _mm256_loadu_ps(g + q * D + d);
        const float* zq = z + q * C + c0;
        for (int i = 0; i < CB; ++i)
          if (i < cb) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(zq + i), gv, a[i]);
      }
      for (int i = 0; i < cb; ++i) {
        float* o = acc + (c0 + i) * D + d;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a[i]));
      }
    }
}

// gwd[i, j, c] = sum_{h < H, w < W} xs[h+i, w+j, c] * gzs[h+P, w+P, c] for C a multiple of 8:
// per tap row i and channel vector, the K taps' sums in registers.
template <int K>
void TapSums(const float* xs, const float* gzs, int64_t H, int64_t W, int64_t C, float* gwd) {
  constexpr int P = K / 2;
  const int64_t Wp = W + 2 * P;
  for (int i = 0; i < K; ++i)
    for (int64_t c = 0; c < C; c += 8) {
      __m256 acc[K];
      for (int j = 0; j < K; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t h = 0; h < H; ++h) {
        const float* a = xs + (h + i) * Wp * C + c;
        const float* g = gzs + ((h + P) * Wp + P) * C + c;
        for (int64_t w = 0; w < W; ++w) {
          const __m256 gv = _mm256_loadu_ps(g + w * C);
          for (int j = 0; j < K; ++j)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + (w + j) * C), gv, acc[j]);
        }
      }
      for (int j = 0; j < K; ++j) _mm256_storeu_ps(gwd + (i * K + j) * C + c, acc[j]);
    }
}

// TapSums for any C: per tap, sums over rows kept per (w, c) in taps [K*K, W*C], then over w.
template <int K>
void TapSumsAny(const float* xs, const float* gzs, int64_t H, int64_t W, int64_t C,
                float* taps, float* gwd) {
  constexpr int P = K / 2;
  const int64_t Wp = W + 2 * P, WC = W * C;
  std::fill(taps, taps + K * K * WC, 0.f);
  for (int64_t h = 0; h < H; ++h) {
    const float* __restrict g = gzs + ((h + P) * Wp + P) * C;
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j) {
        const float* __restrict a = xs + ((h + i) * Wp + j) * C;
        float* __restrict t = taps + (i * K + j) * WC;
        for (int64_t m = 0; m < WC; ++m) t[m] += a[m] * g[m];
      }
  }
  for (int ij = 0; ij < K * K; ++ij) {
    float* __restrict o = gwd + ij * C;
    const float* t = taps + ij * WC;
    for (int64_t c = 0; c < C; ++c) o[c] = 0.f;
    for (int64_t q = 0; q < W; ++q)
      for (int64_t c = 0; c < C; ++c) o[c] += t[q * C + c];
  }
}

// s1[d] += sum_q y[q, d], s2[d] += sum_q y[q, d]^2 for q < n: y [n, D].
void ChannelSums(const float* y, int64_t n, int64_t D, float* s1, float* s2) {
  if (D % 8 == 0) {
    for (int64_t d = 0; d < D; d += 8) {
      __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
      for (int64_t q = 0; q < n; ++q) {
        const __m256 v = _mm256_loadu_ps(y + q * D + d);
        a1 = _mm256_add_ps(a1, v);
        a2 = _mm256_fmadd_ps(v, v, a2);
      }
      _mm256_storeu_ps(s1 + d, _mm256_add_ps(_mm256_loadu_ps(s1 + d), a1));
      _mm256_storeu_ps(s2 + d, _mm256_add_ps(_mm256_loadu_ps(s2 + d), a2));
    }
    return;
  }
  for (int64_t q = 0; q < n; ++q)
    for (int64_t d = 0; d < D; ++d) {
      const float v = y[q * D + d];
      s1[d] += v;
      s2[d] += v * v;
    }
}

// One row of n pixels back through u = ReLU(x * a + b): g = (u > 0) * gu; gx = g * a,
// ga += sum_q g * x, gb += sum_q g. gu, u, x, gx [n, C]; a, ga, gb [C].
void AffineBackward(const float* gu, const float* u, const float* x, const float* a,
                    int64_t n, int64_t C, float* gx, float* ga, float* gb) {
  if (C % 8 == 0) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 av = _mm256_loadu_ps(a + c);
      __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
      for (int64_t q = 0; q < n; ++q) {
        const int64_t m = q * C + c;
        const __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(u + m), zero, _CMP_GT_OQ);
        const __m256 g = _mm256_and_ps(keep, _mm256_loadu_ps(gu + m));
        _mm256_storeu_ps(gx + m, _mm256_mul_ps(g, av));
        sa = _mm256_fmadd_ps(g, _mm256_loadu_ps(x + m), sa);
        sb = _mm256_add_ps(sb, g);
      }
      _mm256_storeu_ps(ga + c, _mm256_add_ps(_mm256_loadu_ps(ga + c), sa));
      _mm256_storeu_ps(gb + c, _mm256_add_ps(_mm256_loadu_ps(gb + c), sb));
    }
    return;
  }
  for (int64_t q = 0; q < n; ++q)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t m = q * C + c;
      const float g = u[m] > 0.f ? gu[m] : 0.f;
      gx[m] = g * a[c];
      ga[c] += g * x[m];
      gb[c] += g;
    }
}

template <int K>
void ForwardImage(const Sep& p, int64_t b) {
  constexpr int P = K / 2;
  const int64_t H = p.H, W = p.W, C = p.C, D = p.D, Wp = W + 2 * P;
  float* slab = Sized(0, (H + 2 * P) * Wp * C);
  float* z = Sized(1, W * C);
  ReluSlab<K>(p.x + b * H * W * C, p.a, p.b, H, W, C, slab);
  float* yb = p.y + b * H * W * D;
  float* __restrict s1 = p.sums + b * 2 * D;
  float* __restrict s2 = s1 + D;
  std::fill(s1, s1 + 2 * D, 0.f);
  for (int64_t h = 0; h < H; ++h) {
    Row<K, 1>(slab + h * Wp * C, Wp, 0, W, C, p.wd, z);
    float* __restrict yr = yb + h * W * D;
    Pointwise(z, W, C, D, p.wp, yr);
    ChannelSums(yr, W, D, s1, s2);
  }
}

template <int K>
void BackwardImage(const Sep& p, int64_t b) {
  constexpr int P = K / 2;
  const int64_t H = p.H, W = p.W, C = p.C, D = p.D, Wp = W + 2 * P, WC = W * C;
  float* xs = Sized(0, (H + 2 * P) * Wp * C);
  float* gzs = Sized(1, (H + 2 * P) * Wp * C);
  float* row = Sized(2, WC);
  float* taps = Sized(3, K * K * WC);   // per tap: sums over rows, per (w, c)
  float* geff = Sized(4, H * W * D);
  const float* xb = p.x + b * H * WC;
  ReluSlab<K>(xb, p.a, p.b, H, W, C, xs);
  // y's whole cotangent: gy + gsums[0] + 2 y gsums[1] (the sums' share)
  {
    const float* __restrict gy = p.gy + b * H * W * D;
    const float* __restrict y = p.y_in + b * H * W * D;
    const float* __restrict g1 = p.gsums;
    const float* __restrict g2 = p.gsums + D;
    float* __restrict o = geff;
    if (D % 8 == 0) {
      const __m256 two = _mm256_set1_ps(2.f);
      for (int64_t q = 0; q < H * W; ++q, gy += D, y += D, o += D)
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(o + d, _mm256_add_ps(
              _mm256_add_ps(_mm256_loadu_ps(gy + d), _mm256_loadu_ps(g1 + d)),
              _mm256_mul_ps(_mm256_mul_ps(two, _mm256_loadu_ps(y + d)),
                            _mm256_loadu_ps(g2 + d))));
    } else {
      for (int64_t q = 0; q < H * W; ++q, gy += D, y += D, o += D)
        for (int64_t d = 0; d < D; ++d) o[d] = gy[d] + g1[d] + 2.f * y[d] * g2[d];
    }
  }
  const float* gyb = geff;
  // gz = gy @ wp^T inside a zero border (the depthwise output's cotangent)
  std::memset(gzs, 0, sizeof(float) * (H + 2 * P) * Wp * C);
  for (int64_t h = 0; h < H; ++h)
    Pointwise(gyb + h * W * D, W, D, C, p.wp_t, gzs + ((h + P) * Wp + P) * C);
  // gwp_b = z^T gy with z (the depthwise output) recomputed row by row
  float* __restrict gwp = p.gwp + b * C * D;
  std::fill(gwp, gwp + C * D, 0.f);
  for (int64_t h = 0; h < H; ++h) {
    Row<K, 1>(xs + h * Wp * C, Wp, 0, W, C, p.wd, row);
    OuterAdd(row, gyb + h * W * D, W, C, D, gwp);
  }
  // gwd_b[i, j, c] = sum_{h, w} xs[h+i, w+j, c] * gz[h, w, c]
  float* gwd = p.gwd + b * K * K * C;
  if (C % 8 == 0) {
    TapSums<K>(xs, gzs, H, W, C, gwd);
  } else {
    TapSumsAny<K>(xs, gzs, H, W, C, taps, gwd);
  }
  // gu = transposed depthwise of gz (the 180-degree-rotated kernel); through the ReLU
  // (u > 0) and the affine: gx = gu' a, ga = sum gu' x, gb = sum gu'
  float* gxb = p.gx + b * H * WC;
  float* __restrict ga = p.gab + b * 2 * C;
  float* __restrict gb = ga + C;
  std::fill(ga, ga + 2 * C, 0.f);
  for (int64_t h = 0; h < H; ++h) {
    Row<K, 1>(gzs + h * Wp * C, Wp, 0, W, C, p.wd_flip, row);
    const float* __restrict u = xs + ((h + P) * Wp + P) * C;
    const float* __restrict xr = xb + h * WC;
    float* __restrict o = gxb + h * WC;
    AffineBackward(row, u, xr, p.a, W, C, o, ga, gb);
  }
}

int64_t Threads(ffi::ThreadPool& pool, int64_t threads, int64_t macs) {
  int64_t n = pool.num_threads();
  n = std::max<int64_t>(1, threads > 0 ? std::min(threads, std::max<int64_t>(n, 1)) : n);
  return threads == 0 && macs < kMinParallelMacs ? 1 : n;
}

bool Shapes(ffi::Span<const int64_t> d, ffi::Span<const int64_t> kd,
            ffi::Span<const int64_t> pd, int64_t na, int64_t nb) {
  return d.size() == 4 && kd.size() == 3 && kd[0] == kd[1] && (kd[0] == 3 || kd[0] == 5) &&
         kd[2] == d[3] && pd.size() == 2 && pd[0] == d[3] && na == d[3] && nb == d[3];
}

bool Same4(ffi::Span<const int64_t> o, ffi::Span<const int64_t> d, int64_t last) {
  return o.size() == 4 && o[0] == d[0] && o[1] == d[1] && o[2] == d[2] && o[3] == last;
}

// dst[i] = sum over n blocks of src[b * m + i], added in block order.
void SumBlocks(const float* src, int64_t n, int64_t m, float* dst) {
  std::copy(src, src + m, dst);
  for (int64_t b = 1; b < n; ++b)
    for (int64_t i = 0; i < m; ++i) dst[i] += src[b * m + i];
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                   ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wd,
                   ffi::Buffer<ffi::F32> wp, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> sums, int64_t threads) {
  auto d = x.dimensions();
  auto kd = wd.dimensions();
  auto pd = wp.dimensions();
  if (!Shapes(d, kd, pd, a.element_count(), b.element_count()) ||
      !Same4(y->dimensions(), d, pd[1]) || sums->element_count() != 2 * pd[1])
    return ffi::Error::InvalidArgument(
        "sep_fwd: x [B,H,W,C], a [C], b [C], wd [k,k,C] (k 3 or 5), wp [C,D] -> "
        "y [B,H,W,D], sums [2,D]");
  std::vector<float> terms(d[0] * 2 * pd[1]);
  Sep p{};
  p.x = x.typed_data(), p.a = a.typed_data(), p.b = b.typed_data();
  p.wd = wd.typed_data(), p.wp = wp.typed_data(), p.y = y->typed_data();
  p.sums = terms.data();
  p.B = d[0], p.H = d[1], p.W = d[2], p.C = d[3], p.D = pd[1];
  const int64_t k = kd[0];
  const int64_t macs = p.B * p.H * p.W * p.C * (k * k + p.D);
  auto fn = k == 3 ? ForwardImage<3> : ForwardImage<5>;
  fp_jax::RunChunks(pool, p.B, Threads(pool, threads, macs), [&p, fn](int64_t i) { fn(p, i); });
  SumBlocks(terms.data(), p.B, 2 * p.D, sums->typed_data());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                    ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wd,
                    ffi::Buffer<ffi::F32> wp, ffi::Buffer<ffi::F32> y,
                    ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> gsums,
                    ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gab,
                    ffi::ResultBuffer<ffi::F32> gwd, ffi::ResultBuffer<ffi::F32> gwp,
                    int64_t threads) {
  auto d = x.dimensions();
  auto kd = wd.dimensions();
  auto pd = wp.dimensions();
  if (!Shapes(d, kd, pd, a.element_count(), b.element_count()) ||
      !Same4(y.dimensions(), d, pd[1]) || !Same4(gy.dimensions(), d, pd[1]) ||
      gsums.element_count() != 2 * pd[1] || !Same4(gx->dimensions(), d, d[3]) ||
      gab->element_count() != 2 * d[3] || gwd->element_count() != kd[0] * kd[0] * d[3] ||
      gwp->element_count() != d[3] * pd[1])
    return ffi::Error::InvalidArgument(
        "sep_bwd: x [B,H,W,C], a, b [C], wd [k,k,C], wp [C,D], y, gy [B,H,W,D], gsums [2,D] "
        "-> gx [B,H,W,C], gab [2,C], gwd [k,k,C], gwp [C,D]");
  const int64_t k = kd[0], C = d[3], D = pd[1];
  std::vector<float> flip(k * k * C), wp_t(C * D);
  const float* w = wd.typed_data();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      std::memcpy(flip.data() + (i * k + j) * C, w + ((k - 1 - i) * k + (k - 1 - j)) * C,
                  sizeof(float) * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t e = 0; e < D; ++e) wp_t[e * C + c] = wp.typed_data()[c * D + e];
  const int64_t nd = k * k * C, np = C * D;   // one image's terms of the weight gradients
  std::vector<float> terms(d[0] * (nd + np + 2 * C));
  Sep p{};
  p.x = x.typed_data(), p.a = a.typed_data(), p.b = b.typed_data();
  p.wd = w, p.wd_flip = flip.data(), p.wp = wp.typed_data(), p.wp_t = wp_t.data();
  p.gy = gy.typed_data(), p.y_in = y.typed_data(), p.gsums = gsums.typed_data();
  p.gx = gx->typed_data();
  p.gwd = terms.data(), p.gwp = p.gwd + d[0] * nd, p.gab = p.gwp + d[0] * np;
  p.B = d[0], p.H = d[1], p.W = d[2], p.C = C, p.D = D;
  const int64_t macs = 3 * p.B * p.H * p.W * C * (k * k + D);
  auto fn = k == 3 ? BackwardImage<3> : BackwardImage<5>;
  fp_jax::RunChunks(pool, p.B, Threads(pool, threads, macs), [&p, fn](int64_t i) { fn(p, i); });
  SumBlocks(p.gwd, p.B, nd, gwd->typed_data());
  SumBlocks(p.gwp, p.B, np, gwp->typed_data());
  SumBlocks(p.gab, p.B, 2 * C, gab->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxSepForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // a
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wp
                                  .Ret<ffi::Buffer<ffi::F32>>()    // y
                                  .Ret<ffi::Buffer<ffi::F32>>()    // sums
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxSepBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // a
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wd
                                  .Arg<ffi::Buffer<ffi::F32>>()    // wp
                                  .Arg<ffi::Buffer<ffi::F32>>()    // y
                                  .Arg<ffi::Buffer<ffi::F32>>()    // gy
                                  .Arg<ffi::Buffer<ffi::F32>>()    // gsums
                                  .Ret<ffi::Buffer<ffi::F32>>()    // gx
                                  .Ret<ffi::Buffer<ffi::F32>>()    // gab
                                  .Ret<ffi::Buffer<ffi::F32>>()    // gwd
                                  .Ret<ffi::Buffer<ffi::F32>>()    // gwp
                                  .Attr<int64_t>("threads"));
