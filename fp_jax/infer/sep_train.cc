// fp_jax's training kernels for one half of a separable conv: (affine) -> ReLU -> depthwise
// -> pointwise, and its output's channel sums (an XLA FFI pair; built and registered by
// kernels.py, used by layers.sep_conv's custom VJP).
//
// Forward:  u = ReLU(x * a + b) (a, b [C]: the previous BN as an affine, or 1 and 0),
//           y = pointwise(depthwise_kxk(u, wd), wp), SAME zero padding, at stride s (1 or
//           2: output o is the stride-1 output at oh + s*o, layers.subsample's offsets, and
//           only those are computed), and sums = [sum y, sum y^2] over (B, Ho, Wo) (the
//           next BN's statistics), NHWC f32: x [B,H,W,C], wd [k,k,C] (k = 3 or 5),
//           wp [C,D] -> y [B,Ho,Wo,D], sums [2,D].
// Backward: from x, a, b, wd, wp, y and the cotangents gy [B,Ho,Wo,D], gsums [2,D]:
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
#include "sep_products.h"

namespace ffi = xla::ffi;

namespace {

using fp_jax::AffineBackward;
using fp_jax::Same4;
using fp_jax::Scratch;
using fp_jax::SumBlocks;
using fp_jax::Threads;
using fp_jax::ChannelSums;
using fp_jax::OuterAdd;
using fp_jax::Pointwise;
using fp_jax::InputSlab;
using fp_jax::Row;
using fp_jax::SumsCotangent;
using fp_jax::TapSums;

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
  int64_t stride, oh, ow, Ho, Wo;   // outputs o, q: the stride-1 ones at oh + S*o, ow + S*q
};

template <int K, int S>
void ForwardImage(const Sep& p, int64_t b) {
  constexpr int P = K / 2;
  const int64_t H = p.H, W = p.W, C = p.C, D = p.D, Wp = W + 2 * P, Ho = p.Ho, Wo = p.Wo;
  float* slab = Scratch(0, (H + 2 * P) * Wp * C);
  float* z = Scratch(1, Wo * C);
  InputSlab<K>(p.x + b * H * W * C, p.a, p.b, H, W, C, slab);
  float* yb = p.y + b * Ho * Wo * D;
  float* __restrict s1 = p.sums + b * 2 * D;
  float* __restrict s2 = s1 + D;
  std::fill(s1, s1 + 2 * D, 0.f);
  for (int64_t o = 0; o < Ho; ++o) {
    Row<K, S>(slab + (p.oh + S * o) * Wp * C, Wp, p.ow, Wo, C, p.wd, z);
    float* __restrict yr = yb + o * Wo * D;
    Pointwise(z, Wo, C, D, p.wp, yr);
    ChannelSums(yr, Wo, D, s1, s2);
  }
}

template <int K, int S>
void BackwardImage(const Sep& p, int64_t b) {
  constexpr int P = K / 2;
  const int64_t H = p.H, W = p.W, C = p.C, D = p.D, Wp = W + 2 * P, WC = W * C;
  const int64_t Ho = p.Ho, Wo = p.Wo, oh = p.oh, ow = p.ow;
  float* xs = Scratch(0, (H + 2 * P) * Wp * C);
  float* gzs = Scratch(1, (H + 2 * P) * Wp * C);
  float* row = Scratch(2, WC);
  float* geff = Scratch(3, Ho * Wo * D);
  const float* xb = p.x + b * H * WC;
  InputSlab<K>(xb, p.a, p.b, H, W, C, xs);
  // y's whole cotangent: gy + gsums[0] + 2 y gsums[1] (the sums' share)
  SumsCotangent(p.gy + b * Ho * Wo * D, p.y_in + b * Ho * Wo * D, p.gsums, p.gsums + D,
                Ho * Wo, D, geff);
  // gz = gy @ wp^T (the depthwise output's cotangent), then placed at the stride-1 output
  // pixels it belongs to inside a zero border (the other pixels' cotangent is zero)
  std::memset(gzs, 0, sizeof(float) * (H + 2 * P) * Wp * C);
  const float* gz;      // [Ho, Wo] pixels, gz_row floats a row
  int64_t gz_row;
  if constexpr (S == 1) {
    for (int64_t h = 0; h < H; ++h)
      Pointwise(geff + h * W * D, W, D, C, p.wp_t, gzs + ((h + P) * Wp + P) * C);
    gz = gzs + (P * Wp + P) * C, gz_row = Wp * C;
  } else {
    float* gzc = Scratch(4, Ho * Wo * C);
    Pointwise(geff, Ho * Wo, D, C, p.wp_t, gzc);
    for (int64_t o = 0; o < Ho; ++o)
      for (int64_t q = 0; q < Wo; ++q)
        std::memcpy(gzs + ((oh + S * o + P) * Wp + ow + S * q + P) * C,
                    gzc + (o * Wo + q) * C, sizeof(float) * C);
    gz = gzc, gz_row = Wo * C;
  }
  // gwp_b = z^T gy with z (the depthwise output) recomputed row by row
  float* __restrict gwp = p.gwp + b * C * D;
  std::fill(gwp, gwp + C * D, 0.f);
  for (int64_t o = 0; o < Ho; ++o) {
    Row<K, S>(xs + (oh + S * o) * Wp * C, Wp, ow, Wo, C, p.wd, row);
    OuterAdd(row, geff + o * Wo * D, Wo, C, D, gwp);
  }
  // gwd_b[i, j, c] = sum_{o, q} xs[oh + S*o + i, ow + S*q + j, c] * gz[o, q, c]
  TapSums<K, S>(xs, Wp, gz, gz_row, Ho, Wo, oh, ow, C, p.gwd + b * K * K * C);
  // gu = transposed depthwise of gz (the 180-degree-rotated kernel over the stride-1 grid);
  // through the ReLU (u > 0) and the affine: gx = gu' a, ga = sum gu' x, gb = sum gu'
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

bool Shapes(ffi::Span<const int64_t> d, ffi::Span<const int64_t> kd,
            ffi::Span<const int64_t> pd, int64_t na, int64_t nb) {
  return d.size() == 4 && kd.size() == 3 && kd[0] == kd[1] && (kd[0] == 3 || kd[0] == 5) &&
         kd[2] == d[3] && pd.size() == 2 && pd[0] == d[3] && na == d[3] && nb == d[3];
}

// The output's [B, Ho, Wo, last] at stride S from offsets (oh, ow): Ho = ceil((H - oh) / S).
bool SameOut(ffi::Span<const int64_t> o, ffi::Span<const int64_t> d, int64_t last, int64_t s,
             int64_t oh, int64_t ow) {
  return o.size() == 4 && o[0] == d[0] && o[1] == (d[1] - oh + s - 1) / s &&
         o[2] == (d[2] - ow + s - 1) / s && o[3] == last;
}

bool Strided(int64_t s, int64_t oh, int64_t ow) {
  return (s == 1 || s == 2) && 0 <= oh && oh < s && 0 <= ow && ow < s;
}

template <template <int, int> class Fn>
auto Pick(int64_t k, int64_t s) {
  return k == 3 ? (s == 1 ? Fn<3, 1>::fn : Fn<3, 2>::fn) : (s == 1 ? Fn<5, 1>::fn : Fn<5, 2>::fn);
}

template <int K, int S>
struct Fwd { static constexpr auto fn = ForwardImage<K, S>; };
template <int K, int S>
struct Bwd { static constexpr auto fn = BackwardImage<K, S>; };

void SetStride(Sep& p, int64_t s, int64_t oh, int64_t ow) {
  p.stride = s, p.oh = oh, p.ow = ow;
  p.Ho = (p.H - oh + s - 1) / s, p.Wo = (p.W - ow + s - 1) / s;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                   ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wd,
                   ffi::Buffer<ffi::F32> wp, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> sums, int64_t stride, int64_t oh, int64_t ow,
                   int64_t threads) {
  auto d = x.dimensions();
  auto kd = wd.dimensions();
  auto pd = wp.dimensions();
  if (!Shapes(d, kd, pd, a.element_count(), b.element_count()) || !Strided(stride, oh, ow) ||
      !SameOut(y->dimensions(), d, pd[1], stride, oh, ow) || sums->element_count() != 2 * pd[1])
    return ffi::Error::InvalidArgument(
        "sep_fwd: x [B,H,W,C], a [C], b [C], wd [k,k,C] (k 3 or 5), wp [C,D], stride 1 or 2, "
        "offsets in [0, stride) -> y [B,ceil((H-oh)/s),ceil((W-ow)/s),D], sums [2,D]");
  std::vector<float> terms(d[0] * 2 * pd[1]);
  Sep p{};
  p.x = x.typed_data(), p.a = a.typed_data(), p.b = b.typed_data();
  p.wd = wd.typed_data(), p.wp = wp.typed_data(), p.y = y->typed_data();
  p.sums = terms.data();
  p.B = d[0], p.H = d[1], p.W = d[2], p.C = d[3], p.D = pd[1];
  SetStride(p, stride, oh, ow);
  const int64_t k = kd[0];
  const int64_t macs = p.B * p.Ho * p.Wo * p.C * (k * k + p.D);
  auto fn = Pick<Fwd>(k, stride);
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
                    int64_t stride, int64_t oh, int64_t ow, int64_t threads) {
  auto d = x.dimensions();
  auto kd = wd.dimensions();
  auto pd = wp.dimensions();
  if (!Shapes(d, kd, pd, a.element_count(), b.element_count()) || !Strided(stride, oh, ow) ||
      !SameOut(y.dimensions(), d, pd[1], stride, oh, ow) ||
      !SameOut(gy.dimensions(), d, pd[1], stride, oh, ow) ||
      gsums.element_count() != 2 * pd[1] || !Same4(gx->dimensions(), d, d[3]) ||
      gab->element_count() != 2 * d[3] || gwd->element_count() != kd[0] * kd[0] * d[3] ||
      gwp->element_count() != d[3] * pd[1])
    return ffi::Error::InvalidArgument(
        "sep_bwd: x [B,H,W,C], a, b [C], wd [k,k,C], wp [C,D], y, gy [B,Ho,Wo,D] (as sep_fwd), "
        "gsums [2,D] -> gx [B,H,W,C], gab [2,C], gwd [k,k,C], gwp [C,D]");
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
  SetStride(p, stride, oh, ow);
  const int64_t macs = 3 * p.B * p.H * p.W * C * (k * k + D);
  auto fn = Pick<Bwd>(k, stride);
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
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("oh")
                                  .Attr<int64_t>("ow")
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
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("oh")
                                  .Attr<int64_t>("ow")
                                  .Attr<int64_t>("threads"));
