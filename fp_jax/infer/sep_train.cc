// fp_jax's training kernels for a separable conv's ReLU -> depthwise -> pointwise (an XLA
// FFI pair; built and registered by kernels.py, used by layers.sep_conv's custom VJP).
//
// Forward:  y = pointwise(depthwise_kxk(ReLU(x), wd), wp), stride 1, SAME zero padding,
//           NHWC f32: x [B,H,W,C], wd [k,k,C] (k = 3 or 5), wp [C,D] -> y [B,H,W,D].
// Backward: from x, wd, wp and the cotangent gy [B,H,W,D]: gx [B,H,W,C], gwd [k,k,C] and
//           gwp [C,D]. Each image's weight-gradient terms are summed in image order after
//           all images are done, so the result does not depend on the thread count.
//
// Why: in XLA the unit's forward and backward are about ten memory-bound passes over
// [B,H,W,C] (ReLU + pad, the k*k shift-sum, three dots with [N, C]-rooted producers, the
// weight-gradient reductions, the ReLU mask), each at a few GB/s when C is 8-16. Here one
// image is one chunk: its ReLU'd, zero-bordered slab and its cotangent slab stay in L1/L2
// while every product is taken from them, and the images are spread over XLA's intra-op
// threads (kernel_common.h). The depthwise rows are depthwise.cc's register-blocked ones
// (row-major tap order, as layers._shift_sum), so results agree with XLA's to rounding.
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
  const float* wd;      // [k,k,C]
  const float* wd_flip; // wd rotated by 180 degrees: the transposed depthwise
  const float* wp;      // [C,D]
  const float* wp_t;    // [D,C]
  const float* gy;
  float* y;
  float* gx;
  float* gwd;
  float* gwp;
  int64_t B, H, W, C, D;
};

// slab [(H+2P), (W+2P), C] = ReLU(x_b) inside a zero border of P pixels.
template <int K>
void ReluSlab(const float* xb, int64_t H, int64_t W, int64_t C, float* slab) {
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
    for (int64_t m = 0; m < W * C; ++m) d[m] = s[m] > 0.f ? s[m] : 0.f;
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
  thread_local std::vector<float> buf[4];
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

template <int K>
void ForwardImage(const Sep& p, int64_t b) {
  constexpr int P = K / 2;
  const int64_t H = p.H, W = p.W, C = p.C, D = p.D, Wp = W + 2 * P;
  float* slab = Sized(0, (H + 2 * P) * Wp * C);
  float* z = Sized(1, W * C);
  ReluSlab<K>(p.x + b * H * W * C, H, W, C, slab);
  float* yb = p.y + b * H * W * D;
  for (int64_t h = 0; h < H; ++h) {
    Row<K, 1>(slab + h * Wp * C, Wp, 0, W, C, p.wd, z);
    Pointwise(z, W, C, D, p.wp, yb + h * W * D);
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
  const float* xb = p.x + b * H * WC;
  const float* gyb = p.gy + b * H * W * D;
  ReluSlab<K>(xb, H, W, C, xs);
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
  // gx = (x > 0) * transposed depthwise of gz (the 180-degree-rotated kernel)
  float* gxb = p.gx + b * H * WC;
  for (int64_t h = 0; h < H; ++h) {
    Row<K, 1>(gzs + h * Wp * C, Wp, 0, W, C, p.wd_flip, row);
    const float* __restrict xr = xb + h * WC;
    float* __restrict o = gxb + h * WC;
    for (int64_t m = 0; m < WC; ++m) o[m] = xr[m] > 0.f ? row[m] : 0.f;
  }
}

int64_t Threads(ffi::ThreadPool& pool, int64_t threads, int64_t macs) {
  int64_t n = pool.num_threads();
  n = std::max<int64_t>(1, threads > 0 ? std::min(threads, std::max<int64_t>(n, 1)) : n);
  return threads == 0 && macs < kMinParallelMacs ? 1 : n;
}

bool Shapes(ffi::Span<const int64_t> d, ffi::Span<const int64_t> kd,
            ffi::Span<const int64_t> pd) {
  return d.size() == 4 && kd.size() == 3 && kd[0] == kd[1] && (kd[0] == 3 || kd[0] == 5) &&
         kd[2] == d[3] && pd.size() == 2 && pd[0] == d[3];
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wd,
                   ffi::Buffer<ffi::F32> wp, ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  auto d = x.dimensions();
  auto kd = wd.dimensions();
  auto pd = wp.dimensions();
  auto o = y->dimensions();
  if (!Shapes(d, kd, pd) || o.size() != 4 || o[0] != d[0] || o[1] != d[1] || o[2] != d[2] ||
      o[3] != pd[1])
    return ffi::Error::InvalidArgument(
        "sep_fwd: x [B,H,W,C], wd [k,k,C] (k 3 or 5), wp [C,D], y [B,H,W,D]");
  Sep p{x.typed_data(), wd.typed_data(), nullptr, wp.typed_data(), nullptr, nullptr,
        y->typed_data(), nullptr, nullptr, nullptr, d[0], d[1], d[2], d[3], pd[1]};
  const int64_t k = kd[0];
  const int64_t macs = p.B * p.H * p.W * p.C * (k * k + p.D);
  auto fn = k == 3 ? ForwardImage<3> : ForwardImage<5>;
  fp_jax::RunChunks(pool, p.B, Threads(pool, threads, macs), [&p, fn](int64_t b) { fn(p, b); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wd,
                    ffi::Buffer<ffi::F32> wp, ffi::Buffer<ffi::F32> gy,
                    ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gwd,
                    ffi::ResultBuffer<ffi::F32> gwp, int64_t threads) {
  auto d = x.dimensions();
  auto kd = wd.dimensions();
  auto pd = wp.dimensions();
  auto g = gy.dimensions();
  if (!Shapes(d, kd, pd) || g.size() != 4 || g[0] != d[0] || g[1] != d[1] || g[2] != d[2] ||
      g[3] != pd[1] || gx->dimensions().size() != 4 || gwd->element_count() != kd[0] * kd[0] * d[3] ||
      gwp->element_count() != d[3] * pd[1])
    return ffi::Error::InvalidArgument(
        "sep_bwd: x [B,H,W,C], wd [k,k,C], wp [C,D], gy [B,H,W,D] -> gx, gwd [k,k,C], gwp [C,D]");
  const int64_t k = kd[0], C = d[3], D = pd[1];
  std::vector<float> flip(k * k * C), wp_t(C * D);
  const float* w = wd.typed_data();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      std::memcpy(flip.data() + (i * k + j) * C, w + ((k - 1 - i) * k + (k - 1 - j)) * C,
                  sizeof(float) * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t e = 0; e < D; ++e) wp_t[e * C + c] = wp.typed_data()[c * D + e];
  const int64_t nd = k * k * C, np = C * D;   // one image's weight-gradient terms
  std::vector<float> terms(d[0] * (nd + np));
  Sep p{x.typed_data(), w, flip.data(), wp.typed_data(), wp_t.data(), gy.typed_data(),
        nullptr, gx->typed_data(), terms.data(), terms.data() + d[0] * nd,
        d[0], d[1], d[2], C, D};
  const int64_t macs = 3 * p.B * p.H * p.W * C * (k * k + D);
  auto fn = k == 3 ? BackwardImage<3> : BackwardImage<5>;
  fp_jax::RunChunks(pool, p.B, Threads(pool, threads, macs), [&p, fn](int64_t b) { fn(p, b); });
  float* od = gwd->typed_data();
  float* op = gwp->typed_data();
  std::copy(p.gwd, p.gwd + nd, od);
  std::copy(p.gwp, p.gwp + np, op);
  for (int64_t b = 1; b < p.B; ++b) {
    const float* td = p.gwd + b * nd;
    const float* tp = p.gwp + b * np;
    for (int64_t i = 0; i < nd; ++i) od[i] += td[i];
    for (int64_t i = 0; i < np; ++i) op[i] += tp[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxSepForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxSepBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
