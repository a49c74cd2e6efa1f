// The instructions of fp_jax's network executor (network.cc): the program's layout (the
// fields native.py writes), where an image's buffers live, and each op over a range of its
// output rows. network.cc's header says what each op computes.
#ifndef FP_JAX_INFER_NETWORK_OPS_H_
#define FP_JAX_INFER_NETWORK_OPS_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.h"
#include "kernel_common.h"

namespace fp_jax {
namespace network_ops {

enum Op : int32_t { kGemm = 1, kConvK = 2, kDw = 3, kPool = 4, kAdd = 5, kCopy = 6, kClass = 7 };
// instruction fields
enum Field {
  kOp = 0, kIn0 = 1, kIn1 = 2, kOut = 3, kW = 4, kB = 5, kRelu = 6, kK = 7, kStride = 8,
  kOh = 9, kOw = 10, kCoff = 11, kN = 12, kKind = 13, kKw = 14, kFields = 16
};
constexpr int kHeader = 8;
constexpr int32_t kMagic = 0x66706e65;  // "fpne"


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

// Output pixels [p0, p1) of a GEMM instruction.
inline void GemmRows(const Net& net, const Frame& f, const int32_t* in, int64_t p0, int64_t p1) {
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  const float* xp = f.P(net, in[kIn0]);
  float* yp = f.P(net, in[kOut]) + in[kCoff];
  const float* w = net.wts + in[kW];
  const float* bias = in[kB] >= 0 ? net.wts + in[kB] : nullptr;
  // K: the input's channels; Kw: the first Kw of them, the ones with weights (native.py)
  const int64_t K = x.C, Kw = in[kKw], N = in[kN], s = in[kStride], oh = in[kOh], ow = in[kOw];
  const bool relu = in[kRelu] != 0;
  // a fused ADD: res [pixels, N] added to each finished sum (res + y: ADD's bits)
  const float* res = in[kKind] == 1 ? f.P(net, in[kIn1]) : nullptr;
  const auto at = [&](int64_t p) { return res ? res + p * N : nullptr; };
  if (!relu && s == 1 && oh == 0 && ow == 0) {     // the rows as they are
    Gemm(xp + p0 * K, K, p1 - p0, Kw, N, w, bias, yp + p0 * y.C, y.C, net.wide, at(p0), N);
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
    Gemm(a, K, q1 - q0, Kw, N, w, bias, yp + q0 * y.C, y.C, net.wide, at(q0), N);
  }
}

// Output pixels [p0, p1) of a k x k SAME conv (oh, ow: the top and left padding).
inline void ConvKRows(const Net& net, const Frame& f, const int32_t* in, int64_t p0, int64_t p1) {
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
inline void DwRowsT(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
  constexpr int P = K / 2;
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  const float* xp = f.P(net, in[kIn0]);
  float* yp = f.P(net, in[kOut]);
  const float* bias = in[kB] >= 0 ? net.wts + in[kB] : nullptr;
  const bool relu = in[kRelu] != 0;
  const int64_t C = x.C, Wp = x.W + 2 * P, oh = in[kOh], ow = in[kOw];
  // padded row r holds input row r - P; output row o reads padded rows oh + S*o .. + K-1,
  // kept in a ring of K rows (slot r % K) that stays in L1: each row is padded once
  float* ring = Scratch(1, K * Wp * C);
  for (int64_t o = o0, next = oh + S * o0; o < o1; ++o) {
    const int64_t top = oh + S * o;
    for (; next < top + K; ++next)
      fp_jax::PaddedRows<P>(xp, x.H, x.W, C, bias, relu, next, next + 1, ring + next % K * Wp * C);
    const float* xr[K];
    for (int i = 0; i < K; ++i) xr[i] = ring + (top + i) % K * Wp * C;
    (net.wide ? fp_jax::Row8Wide<K, S> : Row8<K, S>)(xr, ow, y.W, C, net.wts + in[kW],
                                                      yp + o * y.W * C);
  }
}

inline void DwRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
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
inline void PoolRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
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
inline void AddRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
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

inline void Classify(const Net& net, const Frame& f, const int32_t* in, float* logits) {
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
inline void RowWork(const Net& net, const int32_t* in, int64_t* rows, int64_t* row_work) {
  const Buf& x = net.bufs[in[kIn0]];
  const Buf& y = net.bufs[in[kOut]];
  *rows = y.H;
  switch (in[kOp]) {
    case kGemm: *row_work = y.W * in[kKw] * in[kN]; break;
    case kConvK: *row_work = y.W * in[kK] * in[kK] * x.C * in[kN]; break;
    case kDw: *row_work = y.W * x.C * in[kK] * in[kK]; break;
    case kPool: *row_work = y.W * x.C * 9; break;
    default: *row_work = y.W * x.C; break;
  }
}

inline void RunRows(const Net& net, const Frame& f, const int32_t* in, int64_t o0, int64_t o1) {
  const Buf& y = net.bufs[in[kOut]];
  switch (in[kOp]) {
    case kGemm: GemmRows(net, f, in, o0 * y.W, o1 * y.W); break;
    case kConvK: ConvKRows(net, f, in, o0 * y.W, o1 * y.W); break;
    case kDw: DwRows(net, f, in, o0, o1); break;
    case kPool: PoolRows(net, f, in, o0, o1); break;
    default: AddRows(net, f, in, o0, o1); break;
  }
}
}  // namespace network_ops
}  // namespace fp_jax

#endif  // FP_JAX_INFER_NETWORK_OPS_H_
