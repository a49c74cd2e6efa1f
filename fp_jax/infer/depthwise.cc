// fp_jax's CPU depthwise kernel (an XLA FFI custom call; built and registered by kernels.py).
//
// y = depthwise_kxk(relu ? ReLU(x + b) : x + b, w) at stride S (1 or 2), SAME zero
// padding, NHWC f32: x [B,H,W,C], w [k,k,C] (k = 3 or 5), b [C],
// y [B,Ho,Wo,C] with y[o] = the stride-1 result at oh + S*o (rows) and ow + S*o
// (columns): the strided op computes only the outputs it keeps (layers.subsample's
// offsets, passed in by kernels.py).
//
// XLA:CPU emits the depthwise as a loop fusion that, for every 8-channel output
// vector, loads all k*k input and weight vectors again (~15 GMAC/s here, load-port
// bound), after a separate ReLU + pad pass. This kernel (1) copies the ReLU'd input
// (+ the preceding conv's bias b) into a zero-bordered scratch slab (bias, ReLU and
// pad folded in: no extra XLA pass), and (2) register-blocks kWB output pixels along
// W: per tap row it loads the kWB outputs' input vectors once and each weight vector
// once for kWB FMAs, about 0.4 loads per FMA instead of 2 (~30 GMAC/s). The sum order
// over taps is row-major (i, j) like fused.depthwise's 'shift', so results agree to
// float rounding.
//
// Threads: the output rows of all images are cut into chunks that the threads of
// XLA's intra-op pool (the FFI ThreadPool; `threads` caps how many take part; 0 = all,
// for calls of at least kMinParallelMacs) take from a shared counter, the calling
// thread too. Each chunk builds its own slab
// (its rows plus the k-1 halo rows) and computes its rows exactly as a single thread
// would, so the result does not depend on the thread count (bitwise). The caller waits
// only for chunks already taken by running threads, so a pool whose threads are all
// busy cannot deadlock it (a late task finds no chunk left and returns).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "kernel_common.h"

namespace ffi = xla::ffi;

namespace {

using fp_jax::kWB;
using fp_jax::Row;

constexpr int64_t kMinChunkMacs = 1 << 15;  // smaller chunks cost more to hand out than to run

struct Problem {
  const float* x;
  const float* wt;
  const float* bias;
  float* y;
  int64_t B, H, W, C, oh, ow, Ho, Wo;
  bool relu;
  int64_t rows_per_chunk, chunks_per_image;
};

// Output rows [o0, o1) of image b: slab of the stride-1 padded input rows they read.
template <int K, int S>
void Chunk(const Problem& p, int64_t t) {
  constexpr int P = K / 2;
  const int64_t b = t / p.chunks_per_image;
  const int64_t o0 = (t % p.chunks_per_image) * p.rows_per_chunk;
  const int64_t o1 = std::min(p.Ho, o0 + p.rows_per_chunk);
  const int64_t Wp = p.W + 2 * P, C = p.C;
  // padded row r (0 .. H+2P-1) holds input row r - P; output row o reads padded rows
  // oh + S*o .. oh + S*o + K-1
  const int64_t r0 = p.oh + S * o0, r1 = p.oh + S * (o1 - 1) + K;
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < (r1 - r0) * Wp * C) buf.resize((r1 - r0) * Wp * C);
  float* slab = buf.data();
  fp_jax::PaddedRows<P>(p.x + b * p.H * p.W * C, p.H, p.W, C, p.bias, p.relu, r0, r1, slab);
  float* yb = p.y + b * p.Ho * p.Wo * C;
  for (int64_t o = o0; o < o1; ++o)
    Row<K, S>(slab + (p.oh + S * o - r0) * Wp * C, Wp, p.ow, p.Wo, C, p.wt, yb + o * p.Wo * C);
}

using ChunkFn = void (*)(const Problem&, int64_t);

ChunkFn Pick(int64_t k, int64_t s) {
  if (k == 3) return s == 1 ? Chunk<3, 1> : Chunk<3, 2>;
  return s == 1 ? Chunk<5, 1> : Chunk<5, 2>;
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t relu,
                int64_t stride, int64_t oh, int64_t ow, int64_t threads) {
  auto d = x.dimensions();
  auto k = w.dimensions();
  auto o = y->dimensions();
  if (d.size() != 4 || k.size() != 3 || k[0] != k[1] || k[2] != d[3] ||
      b.dimensions().size() != 1 || b.dimensions()[0] != d[3] || o.size() != 4)
    return ffi::Error::InvalidArgument("depthwise: x [B,H,W,C], w [k,k,C], b [C]");
  if (k[0] != 3 && k[0] != 5) return ffi::Error::InvalidArgument("depthwise: k must be 3 or 5");
  if (stride != 1 && stride != 2)
    return ffi::Error::InvalidArgument("depthwise: stride must be 1 or 2");
  if (oh < 0 || ow < 0 || oh >= stride || ow >= stride || o[0] != d[0] || o[3] != d[3] ||
      o[1] != (d[1] - oh + stride - 1) / stride || o[2] != (d[2] - ow + stride - 1) / stride)
    return ffi::Error::InvalidArgument("depthwise: y [B, ceil((H-oh)/s), ceil((W-ow)/s), C]");
  Problem p{x.typed_data(), w.typed_data(), b.typed_data(), y->typed_data(),
            d[0], d[1], d[2], d[3], oh, ow, o[1], o[2], relu != 0, 0, 0};
  const int64_t row_macs = p.Wo * p.C * k[0] * k[0];
  const int64_t n = fp_jax::Threads(pool, threads, p.B * p.Ho * row_macs);
  // about 4 chunks per thread over all images, none smaller than kMinChunkMacs
  const int64_t want = n == 1 ? p.B : 4 * n;
  const int64_t per_image = std::max<int64_t>(1, (want + p.B - 1) / p.B);
  int64_t rows = std::max<int64_t>((p.Ho + per_image - 1) / per_image,
                                   (kMinChunkMacs + row_macs - 1) / row_macs);
  if (n == 1) rows = p.Ho;
  p.rows_per_chunk = std::max<int64_t>(1, std::min(rows, p.Ho));
  p.chunks_per_image = (p.Ho + p.rows_per_chunk - 1) / p.rows_per_chunk;
  const ChunkFn fn = Pick(k[0], stride);
  fp_jax::RunChunks(pool, p.B * p.chunks_per_image, n, [&p, fn](int64_t t) { fn(p, t); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxDepthwise, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("oh")
                                  .Attr<int64_t>("ow")
                                  .Attr<int64_t>("threads"));
