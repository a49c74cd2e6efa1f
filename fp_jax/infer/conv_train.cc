// fp_jax's training kernels for a conv with its BN statistics: (affine) -> [ReLU] -> kxk conv,
// stride 1, SAME zero padding, and its output's channel sums (an XLA FFI pair; built and
// registered by kernels.py, used by layers.relu_conv_bn's and factorized_reduce's custom VJP).
//
// Forward:  u = [ReLU](x * a + b) (a, b [C]), y = conv_kxk(u, w), sums = [sum y, sum y^2]
//           over (B, H, W): x [B,H,W,C], w [k,k,C,D] (k = 1 or 3) -> y [B,H,W,D], sums [2,D].
//           x may also be J inputs [J,B,H,W,C'] (k = 1): their channels concatenated,
//           C = J*C' (the supernet cell's final conv over its 7 values, without a concat).
// Backward: from x, a, b, w, y and the cotangents gy [B,H,W,D], gsums [2,D]: gw [k,k,C,D]
//           and, with need_gx (k = 1 only), gx [B,H,W,C] and gab [2,C] (of a and b); without
//           it gx has no elements and gab is zero (the stem: its input is the data). Sums over
//           images add the images' terms in image order, whatever the thread count.
//
// Why: the networks' 1x1 convs (cell calibrations, factorized reductions) have 8-64 channels;
// in XLA each is a dot fed by an [N, C]-rooted ReLU fusion, BN's statistics and affine, and in
// the backward [C, N] transposes for the weight gradient and BN's reductions, each a
// memory-bound pass at a few GB/s. The stem's 3x3 conv from 1-3 channels runs at ~3 GFLOP/s in
// XLA:CPU. Here one image is one chunk: its input rows (as k*k*C patches for k = 3) stay in
// cache while the GEMM (sep_products.h's Pointwise), the channel sums and the weight gradient
// are taken from them.
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
using fp_jax::Scratch;
using fp_jax::SumBlocks;
using fp_jax::Threads;
using fp_jax::ChannelSums;
using fp_jax::InputSlab;
using fp_jax::OuterAdd;
using fp_jax::Pointwise;
using fp_jax::SumsCotangent;

struct Conv {
  const float* x;
  const float* a;       // [C]: u = [ReLU](x * a + b)
  const float* b;       // [C]
  const float* w;       // [k*k*C, D]
  const float* w_t;     // [D, C] (k = 1): the input gradient's GEMM
  const float* gy;
  const float* y_in;    // the forward's y (backward: the sums' cotangent needs it)
  const float* gsums;   // [2, D]
  float* y;
  float* sums;          // per image [2, D] (forward); the caller adds them in order
  float* gab;           // per image [2, C] (backward)
  float* gx;            // null without need_gx
  float* gw;            // per image [k*k*C, D]
  int64_t B, H, W, C, D;
  int64_t J, Cj;        // J inputs of Cj channels each (C = J * Cj), one plane of x apart
};

// The image's slab: each input's [ReLU](x * a + b) in its Cj of every pixel's C floats.
template <int K, bool Relu>
void Slab(const Conv& p, const float* x, int64_t b, float* slab) {
  const int64_t plane = p.B * p.H * p.W * p.Cj;
  for (int64_t j = 0; j < p.J; ++j)
    InputSlab<K, Relu>(x + j * plane + b * p.H * p.W * p.Cj, p.a + j * p.Cj, p.b + j * p.Cj,
                       p.H, p.W, p.Cj, slab + j * p.Cj, p.C);
}

// The k*k*C input features of output row h, pixel by pixel: [W, k*k*C] from the slab rows
// h..h+k-1 (tap order i, j, c: w's row order). k = 1 reads the slab row in place.
template <int K>
const float* Features(const float* slab, int64_t h, int64_t W, int64_t C, float* patch) {
  if constexpr (K == 1) {
    return slab + h * W * C;
  } else {
    const int64_t Wp = W + K - 1, KC = K * C;
    for (int64_t q = 0; q < W; ++q)
      for (int i = 0; i < K; ++i)
        std::memcpy(patch + (q * K + i) * KC, slab + ((h + i) * Wp + q) * C,
                    sizeof(float) * KC);
    return patch;
  }
}

template <int K, bool Relu>
void ForwardImage(const Conv& p, int64_t b) {
  const int64_t H = p.H, W = p.W, C = p.C, D = p.D, KC = K * K * C;
  float* slab = Scratch(0, (H + K - 1) * (W + K - 1) * C);
  float* patch = Scratch(1, W * KC);
  Slab<K, Relu>(p, p.x, b, slab);
  float* yb = p.y + b * H * W * D;
  float* __restrict s1 = p.sums + b * 2 * D;
  std::fill(s1, s1 + 2 * D, 0.f);
  for (int64_t h = 0; h < H; ++h) {
    float* yr = yb + h * W * D;
    Pointwise(Features<K>(slab, h, W, C, patch), W, KC, D, p.w, yr);
    ChannelSums(yr, W, D, s1, s1 + D);
  }
}

template <int K, bool Relu>
void BackwardImage(const Conv& p, int64_t b) {
  const int64_t H = p.H, W = p.W, C = p.C, D = p.D, KC = K * K * C;
  float* slab = Scratch(0, (H + K - 1) * (W + K - 1) * C);
  float* patch = Scratch(1, W * KC);
  float* geff = Scratch(2, H * W * D);
  Slab<K, Relu>(p, p.x, b, slab);
  // y's whole cotangent: gy + gsums[0] + 2 y gsums[1] (the sums' share)
  SumsCotangent(p.gy + b * H * W * D, p.y_in + b * H * W * D, p.gsums, p.gsums + D, H * W, D,
                geff);
  float* gw = p.gw + b * KC * D;
  std::fill(gw, gw + KC * D, 0.f);
  for (int64_t h = 0; h < H; ++h)
    OuterAdd(Features<K>(slab, h, W, C, patch), geff + h * W * D, W, KC, D, gw);
  float* __restrict ga = p.gab + b * 2 * C;
  std::fill(ga, ga + 2 * C, 0.f);
  if (p.gx == nullptr) return;
  // k = 1: gu = geff @ w^T, then back through the ReLU and the affine, input by input
  float* gu = Scratch(3, W * C);
  const int64_t Cj = p.Cj, plane = p.B * H * W * Cj;
  for (int64_t h = 0; h < H; ++h) {
    Pointwise(geff + h * W * D, W, D, C, p.w_t, gu);
    for (int64_t j = 0; j < p.J; ++j) {
      const int64_t at = j * plane + (b * H + h) * W * Cj;
      AffineBackward<Relu>(gu + j * Cj, slab + h * W * C + j * Cj, p.x + at, p.a + j * Cj, W,
                           Cj, p.gx + at, ga + j * Cj, ga + C + j * Cj, C);
    }
  }
}

// x [B,H,W,C'] or [J,B,H,W,C'] (k 1), w [k,k,J*C',D], a and b [J*C']: p's sizes, or false.
bool Sizes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, int64_t na, int64_t nb,
           Conv& p) {
  if ((xd.size() != 4 && xd.size() != 5) || wd.size() != 4) return false;
  const size_t o = xd.size() - 4;
  p.J = o ? xd[0] : 1;
  p.B = xd[o], p.H = xd[o + 1], p.W = xd[o + 2], p.Cj = xd[o + 3];
  p.C = p.J * p.Cj, p.D = wd[3];
  return wd[0] == wd[1] && (wd[0] == 1 || (wd[0] == 3 && p.J == 1)) && wd[2] == p.C &&
         na == p.C && nb == p.C && p.J >= 1;
}

// o is [B, H, W, last].
bool Out(ffi::Span<const int64_t> o, const Conv& p, int64_t last) {
  return o.size() == 4 && o[0] == p.B && o[1] == p.H && o[2] == p.W && o[3] == last;
}

template <class Fn>
void Run(ffi::ThreadPool& pool, const Conv& p, int64_t k, bool relu, int64_t threads,
         int64_t macs, Fn fns) {
  auto fn = fns(k, relu);
  fp_jax::RunChunks(pool, p.B, Threads(pool, threads, macs), [&p, fn](int64_t i) { fn(p, i); });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                   ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> sums,
                   int64_t relu, int64_t threads) {
  Conv p{};
  auto wd = w.dimensions();
  if (!Sizes(x.dimensions(), wd, a.element_count(), b.element_count(), p) ||
      !Out(y->dimensions(), p, p.D) || sums->element_count() != 2 * p.D)
    return ffi::Error::InvalidArgument(
        "conv_fwd: x [B,H,W,C] or [J,B,H,W,C/J] (k 1), a [C], b [C], w [k,k,C,D] (k 1 or 3) "
        "-> y [B,H,W,D], sums [2,D]");
  const int64_t k = wd[0];
  std::vector<float> terms(p.B * 2 * p.D);
  p.x = x.typed_data(), p.a = a.typed_data(), p.b = b.typed_data(), p.w = w.typed_data();
  p.y = y->typed_data(), p.sums = terms.data();
  Run(pool, p, k, relu != 0, threads, p.B * p.H * p.W * k * k * p.C * p.D,
      [](int64_t k, bool r) {
        return k == 1 ? (r ? ForwardImage<1, true> : ForwardImage<1, false>)
                      : (r ? ForwardImage<3, true> : ForwardImage<3, false>);
      });
  SumBlocks(terms.data(), p.B, 2 * p.D, sums->typed_data());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                    ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> w,
                    ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> gy,
                    ffi::Buffer<ffi::F32> gsums, ffi::ResultBuffer<ffi::F32> gx,
                    ffi::ResultBuffer<ffi::F32> gab, ffi::ResultBuffer<ffi::F32> gw,
                    int64_t relu, int64_t need_gx, int64_t threads) {
  Conv p{};
  auto wd = w.dimensions();
  const bool with_gx = need_gx != 0;
  auto same = [](ffi::Span<const int64_t> u, ffi::Span<const int64_t> v) {
    return u.size() == v.size() && std::equal(u.begin(), u.end(), v.begin());
  };
  if (!Sizes(x.dimensions(), wd, a.element_count(), b.element_count(), p) ||
      !Out(y.dimensions(), p, p.D) || !Out(gy.dimensions(), p, p.D) ||
      gsums.element_count() != 2 * p.D || (with_gx && wd[0] != 1) ||
      (with_gx ? !same(gx->dimensions(), x.dimensions()) : gx->element_count() != 0) ||
      gab->element_count() != 2 * p.C || gw->element_count() != wd[0] * wd[1] * p.C * p.D)
    return ffi::Error::InvalidArgument(
        "conv_bwd: x [B,H,W,C] or [J,B,H,W,C/J], a, b [C], w [k,k,C,D], y, gy [B,H,W,D], "
        "gsums [2,D] -> gx as x (need_gx, k 1 only; else no elements), gab [2,C], "
        "gw [k,k,C,D]");
  const int64_t k = wd[0], C = p.C, D = p.D, nw = k * k * C * D;
  std::vector<float> w_t(with_gx ? C * D : 0);
  if (with_gx)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t e = 0; e < D; ++e) w_t[e * C + c] = w.typed_data()[c * D + e];
  std::vector<float> terms(p.B * (nw + 2 * C));
  p.x = x.typed_data(), p.a = a.typed_data(), p.b = b.typed_data(), p.w = w.typed_data();
  p.w_t = w_t.data(), p.gy = gy.typed_data(), p.y_in = y.typed_data();
  p.gsums = gsums.typed_data(), p.gx = with_gx ? gx->typed_data() : nullptr;
  p.gw = terms.data(), p.gab = p.gw + p.B * nw;
  Run(pool, p, k, relu != 0, threads, (with_gx ? 2 : 1) * p.B * p.H * p.W * k * k * C * D,
      [](int64_t k, bool r) {
        return k == 1 ? (r ? BackwardImage<1, true> : BackwardImage<1, false>)
                      : (r ? BackwardImage<3, true> : BackwardImage<3, false>);
      });
  SumBlocks(p.gw, p.B, nw, gw->typed_data());
  SumBlocks(p.gab, p.B, 2 * C, gab->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // a
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w
                                  .Ret<ffi::Buffer<ffi::F32>>()    // y
                                  .Ret<ffi::Buffer<ffi::F32>>()    // sums
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxConvBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // a
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w
                                  .Arg<ffi::Buffer<ffi::F32>>()    // y
                                  .Arg<ffi::Buffer<ffi::F32>>()    // gy
                                  .Arg<ffi::Buffer<ffi::F32>>()    // gsums
                                  .Ret<ffi::Buffer<ffi::F32>>()    // gx
                                  .Ret<ffi::Buffer<ffi::F32>>()    // gab
                                  .Ret<ffi::Buffer<ffi::F32>>()    // gw
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("need_gx")
                                  .Attr<int64_t>("threads"));
