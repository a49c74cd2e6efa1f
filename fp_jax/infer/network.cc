// fp_jax's CPU network executor: the whole folded network in one XLA FFI custom call (built
// and registered by kernels.py; the program comes from native.py).
//
// y [B, classes] = the folded network (fused.forward's graph) on x [B,H,W,Cin], NHWC f32.
// `prog` (int32) is a list of instructions over buffers of one image's activations in an
// arena; `weights` (f32) holds every instruction's weights, packed by native.py:
//   prog = header [8] | buffers [n_buf, 4] (arena offset, H, W, C) | instructions [n, 16]
//          | waves [w] (the end of each wave: instructions that read nothing their own wave
//          writes, whose chunks the threads take from one pool; the arena keeps a wave's
//          buffers apart)
// Buffer 0 is the image (the call's input). The instructions (fields: kOp ...):
//   GEMM   out[p, coff + n] = bias[n] + sum_k u[k] * w[k, n] [+ in1[p, n] when kind 1: a
//          fused ADD], u = [ReLU](in at pixel (oh + s*i, ow + s*j)) or 0 outside (a 1x1
//          conv at stride s; the factorized reduction's shifted half starts at (1, 1));
//          w packed [ceil(N/16)][K][16].
//   CONVK  a k x k SAME conv (the stem) as im2col rows + the same GEMM; w [ceil(N/16)][k*k*Cin][16].
//   DW     out = depthwise_kxk([ReLU](in + bias)) at stride s from (oh, ow) (kernel_common.h's
//          register-blocked Row); w [k*k, C].
//   POOL   3x3 avg (padding excluded from the count) / max at stride s from (oh, ow).
//   ADD    out[p, coff + c] = a[p, c] + b[p, c].
//   COPY   out[p, coff + c] = a[p, c] (a concat part that other nodes also read).
//   CLASS  logits = mean_p ReLU(in[p]) @ w, w [C, classes].
// Every channel count is a multiple of 8 except the image's and the logits'.
//
// Why: at batch 1 XLA:CPU runs the network as ~650 thunks (GEMMs, fusions, the depthwise
// custom calls) one after another on one thread, ~1-2 us of bookkeeping each, and cannot
// split a small op over cores (waking a pool thread costs 15-25 us). Here one call runs
// every op; each op large enough is cut into chunks of output rows that the calling thread
// and fp_jax's own worker threads (worker_pool.h) take from a shared counter. The workers
// spin between ops (and sleep after ~0.2 ms without work), so handing out an op costs well
// under a microsecond. GEMMs run gemm.h's register-blocked micro-kernels, the depthwise
// kernel_common.h's Row8, both on AVX-512 where the CPU has it at full width (the call's
// `isa`, from native.vector_isa; both give the same bits). Every output element is computed
// by the same code in the same order whichever thread takes its chunk: the result is the
// same for any thread count (bitwise).
// A batch of at least 2 images per thread is split by images instead (each thread runs the
// whole program on its images, with its own arena).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "gemm.h"
#include "kernel_common.h"
#include "worker_pool.h"

namespace ffi = xla::ffi;

namespace {

using fp_jax::Gemm;
using fp_jax::Pool;
using fp_jax::Row8;
using fp_jax::Scratch;
using fp_jax::UsableCores;

enum Op : int32_t { kGemm = 1, kConvK = 2, kDw = 3, kPool = 4, kAdd = 5, kCopy = 6, kClass = 7 };
// instruction fields
enum Field {
  kOp = 0, kIn0 = 1, kIn1 = 2, kOut = 3, kW = 4, kB = 5, kRelu = 6, kK = 7, kStride = 8,
  kOh = 9, kOw = 10, kCoff = 11, kN = 12, kKind = 13, kFields = 16
};
constexpr int kHeader = 8;
constexpr int32_t kMagic = 0x66706e65;  // "fpne"
constexpr int64_t kMaxTasks = (1 << 20) - 1;


// ---------------------------------------------------------------- the program

struct Buf {
  int64_t off, H, W, C;
};

struct Net {
  const int32_t* prog;
  const float* wts;
  std::vector<Buf> bufs;
  int64_t n_instr, arena, classes;
  const int32_t* waves;  // [n_waves] ends
  int64_t n_waves;
  int64_t skip;         // bit op set: that op's instructions are skipped (bench/native_parts.py)
  bool wide;            // AVX-512: gemm.h's Gemm16, kernel_common.h's Row8Wide
  const int32_t* Instr(int64_t i) const {
    return prog + kHeader + 4 * static_cast<int64_t>(bufs.size()) + kFields * i;
  }
};

// Where one image's buffers live: the arena, and the image itself as buffer 0.
struct Frame {
  float* arena;
  const float* image;
  float* P(const Net& n, int64_t b) const {
    return b == 0 ? const_cast<float*>(image) : arena + n.bufs[b].off;
  }
};

constexpr int64_t kRowBlock = 24;        // GEMM rows a chunk gathers at a time (L1-sized)

struct Task {
  const Net* net;
  Frame f;
  const int32_t* in;
  int64_t rows_per_chunk, units;         // output rows (or pixel rows) per chunk, all rows
};

// y[p, c] += r[p, c] for pixels [p0, p1), c < N (a multiple of 8): a GEMM's fused ADD, the
// same bits as ADD's r + y.
void AddResidual(const float* r, int64_t N, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < N; c += 8)
      _mm256_storeu_ps(y + p * ldy + c, _mm256_add_ps(_mm256_loadu_ps(r + p * N + c),
                                                      _mm256_loadu_ps(y + p * ldy + c)));
}

// Output pixels [p0, p1) of a GEMM instruction.
void GemmRows(const Net& net, const Frame& f, const int32_t* in, int64_t p0, int64_t p1) {
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  const float* xp = f.P(net, in[kIn0]);
  float* yp = f.P(net, in[kOut]) + in[kCoff];
  const float* w = net.wts + in[kW];
  const float* bias = in[kB] >= 0 ? net.wts + in[kB] : nullptr;
  const int64_t K = x.C, N = in[kN], s = in[kStride], oh = in[kOh], ow = in[kOw];
  const bool relu = in[kRelu] != 0;
  const float* res = in[kKind] == 1 ? f.P(net, in[kIn1]) : nullptr;
  if (!relu && s == 1 && oh == 0 && ow == 0) {     // the rows as they are
    Gemm(xp + p0 * K, K, p1 - p0, K, N, w, bias, yp + p0 * y.C, y.C, net.wide);
    if (res) AddResidual(res, N, yp, y.C, p0, p1);
    return;
  }
  float* a = Scratch(0, kRowBlock * K);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t q0 = p0; q0 < p1; q0 += kRowBlock) {
    const int64_t q1 = std::min(p1, q0 + kRowBlock);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t h = oh + s * (q / y.W), wc = ow + s * (q % y.W);
      float* d = a + (q - q0) * K;
      if (h >= x.H || wc >= x.W) {
        std::memset(d, 0, sizeof(float) * K);
        continue;
      }
      const float* src = xp + (h * x.W + wc) * K;
      for (int64_t c = 0; c < K; c += 8) {
        const __m256 u = _mm256_loadu_ps(src + c);
        _mm256_storeu_ps(d + c, relu ? _mm256_max_ps(zero, u) : u);
      }
    }
    Gemm(a, K, q1 - q0, K, N, w, bias, yp + q0 * y.C, y.C, net.wide);
    if (res) AddResidual(res, N, yp, y.C, q0, q1);
  }
}

// Output pixels [p0, p1) of a k x k SAME conv (oh, ow: the top and left padding).
void ConvKRows(const Net& net, const Frame& f, const int32_t* in, int64_t p0, int64_t p1) {
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  const float* xp = f.P(net, in[kIn0]);
  float* yp = f.P(net, in[kOut]) + in[kCoff];
  const int64_t k = in[kK], s = in[kStride], pt = in[kOh], pl = in[kOw], C = x.C;
  const int64_t K = k * k * C, N = in[kN];
  float* a = Scratch(0, kRowBlock * K);
  for (int64_t q0 = p0; q0 < p1; q0 += kRowBlock) {
    const int64_t q1 = std::min(p1, q0 + kRowBlock);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t h0 = s * (q / y.W) - pt, w0 = s * (q % y.W) - pl;
      float* d = a + (q - q0) * K;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j, d += C) {
          const int64_t h = h0 + i, wc = w0 + j;
          if (h < 0 || h >= x.H || wc < 0 || wc >= x.W)
            std::memset(d, 0, sizeof(float) * C);
          else
            std::memcpy(d, xp + (h * x.W + wc) * C, sizeof(float) * C);
        }
    }
    Gemm(a, K, q1 - q0, K, N, net.wts + in[kW], in[kB] >= 0 ? net.wts + in[kB] : nullptr,
         yp + q0 * y.C, y.C, net.wide);
  }
}

// ---------------------------------------------------------------- depthwise

template <int K, int S>
void DwRowsT(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
  constexpr int P = K / 2;
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  const float* xp = f.P(net, in[kIn0]);
  float* yp = f.P(net, in[kOut]);
  const float* bias = in[kB] >= 0 ? net.wts + in[kB] : nullptr;
  const bool relu = in[kRelu] != 0;
  const int64_t C = x.C, Wp = x.W + 2 * P, oh = in[kOh], ow = in[kOw];
  // padded row r holds input row r - P; output row o reads padded rows oh + S*o .. + K-1
  const int64_t r0 = oh + S * o0, r1 = oh + S * (o1 - 1) + K;
  float* slab = Scratch(1, (r1 - r0) * Wp * C);
  fp_jax::PaddedRows<P>(xp, x.H, x.W, C, bias, relu, r0, r1, slab);
  for (int64_t o = o0; o < o1; ++o)
    (net.wide ? fp_jax::Row8Wide<K, S> : Row8<K, S>)(slab + (oh + S * o - r0) * Wp * C, Wp, ow,
                                                      y.W, C, net.wts + in[kW], yp + o * y.W * C);
}

void DwRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
  const int k = in[kK], s = in[kStride];
  if (k == 3) {
    (s == 1 ? DwRowsT<3, 1> : DwRowsT<3, 2>)(net, f, in, o0, o1);
  } else {
    (s == 1 ? DwRowsT<5, 1> : DwRowsT<5, 2>)(net, f, in, o0, o1);
  }
}

// ---------------------------------------------------------------- pools, add, copy

// Output rows [o0, o1): per output row, the 3 window rows combined at every input column
// (padded by one column each side), then 3 of those columns; avg then scales by 1 / (the
// window's real pixels). The combination order is pools.py's (rows, then columns).
void PoolRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  const float* xp = f.P(net, in[kIn0]);
  float* yp = f.P(net, in[kOut]) + in[kCoff];
  const int64_t C = x.C, s = in[kStride], oh = in[kOh], ow = in[kOw];
  const bool avg = in[kKind] == 0;
  const __m256 pad = avg ? _mm256_setzero_ps()
                         : _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  float* col = Scratch(3, (x.W + 2) * C);
  for (int64_t c = 0; c < C; c += 8) {
    _mm256_storeu_ps(col + c, pad);
    _mm256_storeu_ps(col + (x.W + 1) * C + c, pad);
  }
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t h = oh + s * o;
    const float* r[3];
    int rows = 0;
    for (int i = 0; i < 3; ++i) {
      const int64_t hh = h + i - 1;
      r[i] = hh >= 0 && hh < x.H ? xp + hh * x.W * C : nullptr;
      rows += r[i] != nullptr;
    }
    for (int64_t w = 0; w < x.W; ++w)
      for (int64_t c = 0; c < C; c += 8) {
        __m256 v[3];
        for (int i = 0; i < 3; ++i) v[i] = r[i] ? _mm256_loadu_ps(r[i] + w * C + c) : pad;
        _mm256_storeu_ps(col + (w + 1) * C + c,
                         avg ? _mm256_add_ps(_mm256_add_ps(v[0], v[1]), v[2])
                             : _mm256_max_ps(_mm256_max_ps(v[0], v[1]), v[2]));
      }
    for (int64_t q = 0; q < y.W; ++q) {
      const int64_t wc = ow + s * q;            // input column; padded columns wc .. wc + 2
      const int cols = 1 + (wc > 0) + (wc + 1 < x.W);
      const __m256 inv = _mm256_set1_ps(1.0f / static_cast<float>(rows * cols));
      const float* cp = col + wc * C;
      float* d = yp + (o * y.W + q) * y.C;
      for (int64_t c = 0; c < C; c += 8) {
        const __m256 a = _mm256_loadu_ps(cp + c), b = _mm256_loadu_ps(cp + C + c),
                     e = _mm256_loadu_ps(cp + 2 * C + c);
        _mm256_storeu_ps(d + c, avg ? _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(a, b), e), inv)
                                    : _mm256_max_ps(_mm256_max_ps(a, b), e));
      }
    }
  }
}

// Pixel rows [o0, o1) of ADD (two inputs) or COPY (one).
void AddRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  const float* a = f.P(net, in[kIn0]);
  const float* b = in[kOp] == kAdd ? f.P(net, in[kIn1]) : nullptr;
  float* yp = f.P(net, in[kOut]) + in[kCoff];
  const int64_t C = x.C;
  for (int64_t p = o0 * y.W; p < o1 * y.W; ++p)
    for (int64_t c = 0; c < C; c += 8) {
      __m256 v = _mm256_loadu_ps(a + p * C + c);
      if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + p * C + c));
      _mm256_storeu_ps(yp + p * y.C + c, v);
    }
}

void Classify(const Net& net, const Frame& f, const int32_t* in, float* logits) {
  const Buf& x = net.bufs[in[kIn0]];
  const float* xp = f.P(net, in[kIn0]);
  const int64_t C = x.C, P = x.H * x.W;
  float* mean = Scratch(2, C);
  std::fill(mean, mean + C, 0.f);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < C; ++c) mean[c] += std::max(0.f, xp[p * C + c]);
  for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<float>(P);
  const float* w = net.wts + in[kW];
  for (int64_t n = 0; n < net.classes; ++n) logits[n] = 0.f;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t n = 0; n < net.classes; ++n) logits[n] += mean[c] * w[c * net.classes + n];
}

// ---------------------------------------------------------------- running it

// Output rows of instruction `in` and the multiply-adds (or element operations) of one.
void RowWork(const Net& net, const int32_t* in, int64_t* rows, int64_t* row_work) {
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  *rows = y.H;
  switch (in[kOp]) {
    case kGemm: *row_work = y.W * x.C * in[kN]; break;
    case kConvK: *row_work = y.W * in[kK] * in[kK] * x.C * in[kN]; break;
    case kDw: *row_work = y.W * x.C * in[kK] * in[kK]; break;
    case kPool: *row_work = y.W * x.C * 9; break;
    default: *row_work = y.W * x.C; break;
  }
}

void RunRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
  const Buf& y = net.bufs[in[kOut]];
  switch (in[kOp]) {
    case kGemm: GemmRows(net, f, in, o0 * y.W, o1 * y.W); break;
    case kConvK: ConvKRows(net, f, in, o0 * y.W, o1 * y.W); break;
    case kDw: DwRows(net, f, in, o0, o1); break;
    case kPool: PoolRows(net, f, in, o0, o1); break;
    default: AddRows(net, f, in, o0, o1); break;
  }
}

void RowChunk(const void* ctx, int64_t t) {
  const Task& k = *static_cast<const Task*>(ctx);
  const int64_t o0 = t * k.rows_per_chunk;
  RunRows(*k.net, k.f, k.in, o0, std::min(k.units, o0 + k.rows_per_chunk));
}

constexpr int kMaxWave = 64;             // instructions of one wave run together (more: apart)

// The instructions of one wave and the first chunk of each (chunk t belongs to the last
// instruction whose first chunk is <= t).
struct Wave {
  Task task[kMaxWave];
  int64_t first[kMaxWave + 1];
  int n;
};

void WaveChunk(const void* ctx, int64_t t) {
  const Wave& w = *static_cast<const Wave*>(ctx);
  int i = 0;
  while (w.first[i + 1] <= t) ++i;
  RowChunk(&w.task[i], t - w.first[i]);
}

// One image through the whole program. On n > 1 threads each wave's instructions are cut
// into chunks of rows (ops of at least min_chunk multiply-adds: up to 2 per thread), and
// the threads take the chunks of the whole wave from one counter.
void RunImage(const Net& net, const Frame& f, float* logits, int n, int64_t min_chunk) {
  Pool& pool = Pool::Get();
  Wave wave;
  int64_t start = 0;
  for (int64_t e = 0; e < net.n_waves; ++e) {
    const int64_t end = net.waves[e];
    wave.n = 0;
    wave.first[0] = 0;
    for (int64_t i = start; i < end; ++i) {
      const int32_t* in = net.Instr(i);
      if (net.skip >> in[kOp] & 1) continue;
      if (in[kOp] == kClass) {
        Classify(net, f, in, logits);
        continue;
      }
      int64_t rows, row_work;
      RowWork(net, in, &rows, &row_work);
      const int64_t chunks = n <= 1 ? 1 : std::min<int64_t>(
          std::min<int64_t>(rows, 2 * n), std::max<int64_t>(1, rows * row_work / min_chunk));
      if (n <= 1 || wave.n == kMaxWave) {
        RunRows(net, f, in, 0, rows);
        continue;
      }
      const int64_t per = (rows + chunks - 1) / chunks;
      wave.task[wave.n] = Task{&net, f, in, per, rows};
      wave.first[wave.n + 1] = wave.first[wave.n] + (rows + per - 1) / per;
      ++wave.n;
    }
    if (wave.n == 1) {
      pool.Run(RowChunk, &wave.task[0], wave.first[1], n);
    } else if (wave.n > 1) {
      pool.Run(WaveChunk, &wave, wave.first[wave.n], n);
    }
    start = end;
  }
}

float* Arena(int64_t floats) {
  thread_local std::vector<float> arena;
  if (static_cast<int64_t>(arena.size()) < floats) arena.resize(floats);
  return arena.data();
}

struct Batch {
  const Net* net;
  const float* x;
  float* y;
  int64_t image_floats;
};

void ImageChunk(const void* ctx, int64_t t) {
  const Batch& b = *static_cast<const Batch*>(ctx);
  Frame f{Arena(b.net->arena), b.x + t * b.image_floats};
  RunImage(*b.net, f, b.y + t * b.net->classes, 1, 1);
}

ffi::Error Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> prog, ffi::Buffer<ffi::F32> wts,
                ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t min_chunk, int64_t skip,
                int64_t isa) {
  const int32_t* p = prog.typed_data();
  const int64_t plen = static_cast<int64_t>(prog.element_count());
  if (plen < kHeader || p[0] != kMagic || p[1] != 2)
    return ffi::Error::InvalidArgument("network: not a native.py program (version 2)");
  if (isa < 1 || isa > 2 || (isa == 2 && !fp_jax::HasAvx512()))
    return ffi::Error::InvalidArgument(
        "network: isa 1 (AVX2) or 2 (AVX-512, where the CPU has it; native.vector_isa)");
  const int64_t nb = p[2];
  Net net{p, wts.typed_data(), {}, p[3], p[4], p[6],
          p + kHeader + 4 * nb + kFields * static_cast<int64_t>(p[3]), p[5], skip, isa == 2};
  if (plen != kHeader + 4 * nb + kFields * net.n_instr + net.n_waves || nb < 1 ||
      net.n_waves < 1 || net.waves[net.n_waves - 1] != net.n_instr)
    return ffi::Error::InvalidArgument("network: program length does not match its header");
  for (int64_t e = 0; e < net.n_waves; ++e)
    if (net.waves[e] <= (e ? net.waves[e - 1] : 0))
      return ffi::Error::InvalidArgument("network: wave ends must increase");
  for (int64_t b = 0; b < nb; ++b) {
    const int32_t* r = p + kHeader + 4 * b;
    net.bufs.push_back(Buf{r[0], r[1], r[2], r[3]});
  }
  auto d = x.dimensions();
  auto o = y->dimensions();
  const Buf& img = net.bufs[0];
  if (d.size() != 4 || d[1] != img.H || d[2] != img.W || d[3] != img.C || o.size() != 2 ||
      o[0] != d[0] || o[1] != net.classes)
    return ffi::Error::InvalidArgument("network: x [B,H,W,C] of the program's image, y [B,classes]");
  const int64_t B = d[0];
  // threads > 0 is taken as given (more than the usable cores only oversubscribes them)
  const int n = threads > 0 ? static_cast<int>(std::min<int64_t>(threads, 64)) : UsableCores();
  min_chunk = std::max<int64_t>(1, min_chunk);
  if (n > 1 && B >= 2 * n) {                          // whole images per thread
    Batch batch{&net, x.typed_data(), y->typed_data(), img.H * img.W * img.C};
    Pool::Get().Run(ImageChunk, &batch, std::min<int64_t>(B, kMaxTasks), n);
    return ffi::Error::Success();
  }
  for (int64_t b = 0; b < B; ++b) {
    Frame f{Arena(net.arena), x.typed_data() + b * img.H * img.W * img.C};
    RunImage(net, f, y->typed_data() + b * net.classes, n, min_chunk);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FpJaxNetwork, Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("min_chunk")
                                  .Attr<int64_t>("skip")
                                  .Attr<int64_t>("isa"));
