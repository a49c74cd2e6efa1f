// The worker threads of fp_jax's network executor (network.cc): a fork-join pool whose
// workers spin between ops, so that handing out one op's chunks costs well under a
// microsecond (waking a sleeping thread costs 15-25 us on the CPUs measured).
#ifndef FP_JAX_INFER_WORKER_POOL_H_
#define FP_JAX_INFER_WORKER_POOL_H_

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fp_jax {

constexpr int kPoolSpins = 1 << 13;   // pause loops (~0.2 ms) before an idle worker sleeps

// Fork-join over chunks t in [0, total): the caller publishes (fn, ctx, total) in one atomic
// word with a generation, the workers and the caller claim chunks with a CAS on that word
// (generation, total and next index packed together, so a late worker can never claim a
// chunk of a newer op), and the caller waits until every claimed chunk is done. It never
// waits for a worker that has not claimed one, so a descheduled worker costs nothing.
class Pool {
 public:
  using Fn = void (*)(const void*, int64_t);

  static Pool& Get() {
    static Pool* pool = new Pool();   // never destroyed: workers outlive static teardown
    return *pool;
  }

  // Runs fn(ctx, t) for t < total on the caller and up to n - 1 workers.
  void Run(Fn fn, const void* ctx, int64_t total, int n) {
    if (n <= 1 || total <= 1) {
      for (int64_t t = 0; t < total; ++t) fn(ctx, t);
      return;
    }
    Ensure(n - 1);
    std::lock_guard<std::mutex> one(run_mu_);   // one op at a time through the pool
    fn_ = fn;
    ctx_ = ctx;
    active_ = n - 1;
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xFFFFFF;
    word_.store(Pack(gen_, total, 0), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    Claim(gen_, -1);
    for (int spin = 0; done_.load(std::memory_order_acquire) != total; ++spin) {
      if (spin < kPoolSpins) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static uint64_t Pack(uint64_t gen, int64_t total, int64_t next) {
    return (gen << 40) | (static_cast<uint64_t>(total) << 20) | static_cast<uint64_t>(next);
  }

  // Claims and runs chunks of generation g while any is left; worker index i (-1: caller).
  void Claim(uint64_t g, int i) {
    uint64_t w = word_.load(std::memory_order_acquire);
    for (;;) {
      if ((w >> 40) != g) return;
      const int64_t total = (w >> 20) & 0xFFFFF, next = w & 0xFFFFF;
      if (next >= total) return;
      if (i >= 0 && i >= active_.load(std::memory_order_relaxed)) return;
      if (!word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) continue;
      fn_(ctx_, next);   // fn_, ctx_ are this generation's: the caller waits for this chunk
      done_.fetch_add(1, std::memory_order_acq_rel);
      w = word_.load(std::memory_order_acquire);
    }
  }

  void Ensure(int workers) {
    std::lock_guard<std::mutex> lock(start_mu_);
    while (static_cast<int>(threads_.size()) < workers) {
      const int i = static_cast<int>(threads_.size());
      threads_.emplace_back([this, i] { Work(i); });
      threads_.back().detach();
    }
  }

  void Work(int i) {
    uint64_t seen = word_.load(std::memory_order_acquire) >> 40;
    for (;;) {
      uint64_t g;
      for (int spin = 0; (g = word_.load(std::memory_order_acquire) >> 40) == seen; ++spin) {
        if (spin < kPoolSpins) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lock, [&] { return (word_.load(std::memory_order_seq_cst) >> 40) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        spin = 0;
      }
      seen = g;
      Claim(g, i);
    }
  }

  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> active_{0};
  std::atomic<int> sleepers_{0};
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
  uint64_t gen_ = 0;
  std::mutex run_mu_, start_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
};

inline int UsableCores() {  // cores this thread may run on
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

}  // namespace fp_jax

#endif  // FP_JAX_INFER_WORKER_POOL_H_
