// fp_jax's CPU network executor: the whole folded network in one XLA FFI custom call (built
// and registered by kernels.py; the program comes from native.py, its instructions' code is
// network_ops.h).
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
//          k < kw only (field kKw: the input channels up to the last with a nonzero weight;
//          the rest are padding), w packed [ceil(N/16)][kw][16].
//   CONVK  a k x k SAME conv (the stem) as im2col rows + the same GEMM;
//          w [ceil(N/16)][k*k*Cin][16].
//   DW     out = depthwise_kxk([ReLU](in + bias)) at stride s from (oh, ow) (kernel_common.h's
//          register-blocked Row8, on a ring of k zero-bordered input rows); w [k*k, C].
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
// and fp_jax's own worker threads (worker_pool.h) take, each thread first the same share of
// rows in every op (its own caches then hold what the next op reads). The workers
// spin between ops (and sleep after ~0.2 ms without work), so handing out an op costs well
// under a microsecond. GEMMs run gemm.h's register-blocked micro-kernels, the depthwise
// kernel_common.h's Row8, both on AVX-512 where the CPU has it at full width (the call's
// `isa`, from native.vector_isa; both give the same bits). Every output element is computed
// by the same code in the same order whichever thread takes its chunk: the result is the
// same for any thread count (bitwise).
// A batch of at least 2 images per thread is split by images instead (each thread runs the
// whole program on its images, with its own arena).
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "network_ops.h"
#include "worker_pool.h"

namespace ffi = xla::ffi;

namespace {

using namespace fp_jax::network_ops;  // NOLINT: the executor's own instructions
using fp_jax::Pool;
using fp_jax::UsableCores;

constexpr int64_t kMaxTasks = (1 << 20) - 1;

struct Task {
  const Net* net;
  Frame f;
  const int32_t* in;
  int64_t rows_per_chunk, units;         // output rows (or pixel rows) per chunk, all rows
};

void RowChunk(const void* ctx, int64_t t) {
  const Task& k = *static_cast<const Task*>(ctx);
  const int64_t o0 = t * k.rows_per_chunk;
  RunRows(*k.net, k.f, k.in, o0, std::min(k.units, o0 + k.rows_per_chunk));
}

constexpr int kMaxWave = 64;             // instructions of one wave run together (more: apart)

// The instructions of one wave, each cut into chunks of rows, and the order the pool hands
// them out in: thread s owns the s-th n-th of every instruction's rows (chunk k of c goes
// to thread k * n / c), so a thread computes the same part of the image in every op.
struct Wave {
  Task task[kMaxWave];
  int64_t chunks[kMaxWave];
  int n;
  std::vector<int32_t> item_task, item_chunk;   // pool index -> (task, chunk)
  int64_t bounds[fp_jax::kPoolSlots + 1];       // thread s owns [bounds[s], bounds[s + 1])

  void Order(int threads) {
    item_task.clear();
    item_chunk.clear();
    for (int s = 0; s < threads; ++s) {
      bounds[s] = static_cast<int64_t>(item_task.size());
      for (int i = 0; i < n; ++i)
        for (int64_t k = fp_jax::OwnedStart(chunks[i], s, threads);
             k < fp_jax::OwnedStart(chunks[i], s + 1, threads); ++k) {
          item_task.push_back(i);
          item_chunk.push_back(static_cast<int32_t>(k));
        }
    }
    bounds[threads] = static_cast<int64_t>(item_task.size());
  }
};

void WaveChunk(const void* ctx, int64_t t) {
  const Wave& w = *static_cast<const Wave*>(ctx);
  RowChunk(&w.task[w.item_task[t]], w.item_chunk[t]);
}

// One image through the whole program. On n > 1 threads each wave's instructions are cut
// into chunks of rows (ops of at least min_chunk multiply-adds: up to 2 per thread), and
// the threads take the chunks of the whole wave from the pool, each its own rows first.
void RunImage(const Net& net, const Frame& f, float* logits, int n, int64_t min_chunk) {
  Pool& pool = Pool::Get();
  n = std::min(n, fp_jax::kPoolSlots);
  Wave wave;
  int64_t start = 0;
  for (int64_t e = 0; e < net.n_waves; ++e) {
    const int64_t end = net.waves[e];
    wave.n = 0;
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
      wave.chunks[wave.n] = (rows + per - 1) / per;
      ++wave.n;
    }
    if (wave.n == 1) {         // the pool's equal parts: chunk k of c is thread k * n / c's
      pool.Run(RowChunk, &wave.task[0], wave.chunks[0], n);
    } else if (wave.n > 1) {
      wave.Order(n);
      pool.Run(WaveChunk, &wave, wave.bounds[n], n, wave.bounds);
    }
    start = end;
  }
}

// This thread's arena of at least `floats`, 64-byte aligned (native.py places every buffer
// at a multiple of 16 floats from its start).
float* Arena(int64_t floats) {
  thread_local std::vector<float> arena;
  if (static_cast<int64_t>(arena.size()) < floats + 16) arena.resize(floats + 16);
  return fp_jax::Align64(arena.data());
}

struct Batch {
  const Net* net;
  const float* x;
  float* y;
  int64_t image_floats, images, per_task;   // task t: images [t * per_task, + per_task)
};

void ImageChunk(const void* ctx, int64_t t) {
  const Batch& b = *static_cast<const Batch*>(ctx);
  Frame f{Arena(b.net->arena), nullptr};
  for (int64_t i = t * b.per_task; i < std::min(b.images, (t + 1) * b.per_task); ++i) {
    f.image = b.x + i * b.image_floats;
    RunImage(*b.net, f, b.y + i * b.net->classes, 1, 1);
  }
}

ffi::Error Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> prog, ffi::Buffer<ffi::F32> wts,
                ffi::ResultBuffer<ffi::F32> y, int64_t threads, int64_t min_chunk, int64_t skip,
                int64_t isa) {
  const int32_t* p = prog.typed_data();
  const int64_t plen = static_cast<int64_t>(prog.element_count());
  if (plen < kHeader || p[0] != kMagic || p[1] != 3)
    return ffi::Error::InvalidArgument("network: not a native.py program (version 3)");
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
  const int n = threads > 0 ? static_cast<int>(std::min<int64_t>(threads, fp_jax::kPoolSlots))
                            : UsableCores();
  min_chunk = std::max<int64_t>(1, min_chunk);
  if (n > 1 && B >= 2 * n) {                          // whole images per thread
    const int64_t per = (B + kMaxTasks - 1) / kMaxTasks;   // more images than tasks: runs
    Batch batch{&net, x.typed_data(), y->typed_data(), img.H * img.W * img.C, B, per};
    Pool::Get().Run(ImageChunk, &batch, (B + per - 1) / per, n);
    return ffi::Error::Success();
  }
  for (int64_t b = 0; b < B; ++b) {
    Frame f{Arena(net.arena), x.typed_data() + b * img.H * img.W * img.C};
    RunImage(net, f, y->typed_data() + b * net.classes, n, min_chunk);
  }
  return ffi::Error::Success();
}

bool PinTo(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

}  // namespace

// Nanoseconds per round trip of one cache line between CPUs a and b (two threads pinned to
// them pass a flag back and forth `iters` times after as many warm-up trips), or -1 when a
// thread cannot run on its CPU. Tens of ns: the CPUs share a cache (one L3); hundreds:
// they do not (other Zen CCDs or sockets), where the pool's owned rows matter most.
extern "C" double FpJaxCoreRoundTripNs(int a, int b, int64_t iters) {
  static std::mutex one;                  // one measurement at a time
  std::lock_guard<std::mutex> lock(one);
  alignas(64) static std::atomic<int> flag;
  std::atomic<int> ok{1};
  double ns = -1;
  flag.store(0);
  std::thread pong([&] {
    if (!PinTo(b)) ok.store(0);
    for (int64_t i = 0; i < 2 * iters && ok.load(std::memory_order_relaxed); ++i) {
      while (flag.load(std::memory_order_acquire) != 1)
        if (!ok.load(std::memory_order_relaxed)) return;
      flag.store(0, std::memory_order_release);
    }
  });
  std::thread ping([&] {
    if (!PinTo(a)) ok.store(0);
    std::chrono::steady_clock::time_point t0;
    for (int64_t i = 0; i < 2 * iters && ok.load(std::memory_order_relaxed); ++i) {
      if (i == iters) t0 = std::chrono::steady_clock::now();
      flag.store(1, std::memory_order_release);
      while (flag.load(std::memory_order_acquire) != 0)
        if (!ok.load(std::memory_order_relaxed)) return;
    }
    if (ok.load()) ns = std::chrono::duration<double, std::nano>(
                             std::chrono::steady_clock::now() - t0).count() / iters;
  });
  ping.join();
  pong.join();
  return ok.load() ? ns : -1;
}

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
