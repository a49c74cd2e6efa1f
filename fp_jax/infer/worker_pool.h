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

constexpr int kPoolSlots = 64;        // threads one Run may use (the caller is slot 0)

// The first of c chunks thread s of n owns when each owns an equal contiguous part (chunk k
// is thread k * n / c's).
inline int64_t OwnedStart(int64_t c, int s, int n) { return (s * c + n - 1) / n; }

// Fork-join over chunks t in [0, total), each thread first taking the chunks it owns.
// Thread s (the caller s = 0, worker i s = i + 1) owns [bounds[s], bounds[s + 1]): it takes
// them from the front, then takes the other threads' remaining chunks from the back. A
// range is one atomic word (generation, hi, lo), claimed by CAS, so a late worker can never
// claim a chunk of a newer op, and the caller waits until every claimed chunk is done. It
// never waits for a worker that has not claimed one, so a descheduled worker costs nothing.
// Owning the same part of every op (network.cc: the same output rows) keeps the rows a
// thread writes in its own caches for the ops that read them: where the two cores share no
// cache (other L3s, e.g. Zen CCDs a VM's vCPUs may land on) a cache line handed between
// them costs 5-6x a shared-L3 one.
class Pool {
 public:
  using Fn = void (*)(const void*, int64_t);

  static Pool& Get() {
    static Pool* pool = new Pool();   // never destroyed: workers outlive static teardown
    return *pool;
  }

  // Runs fn(ctx, t) for t < total on the caller and up to n - 1 workers; bounds[0..n]
  // (0 = bounds[0] <= ... <= bounds[n] = total) says which chunks each thread owns, or
  // nullptr: n equal contiguous parts (OwnedStart).
  void Run(Fn fn, const void* ctx, int64_t total, int n, const int64_t* bounds = nullptr) {
    n = std::min(n, kPoolSlots);
    if (n <= 1 || total <= 1) {
      for (int64_t t = 0; t < total; ++t) fn(ctx, t);
      return;
    }
    Ensure(n - 1);
    std::lock_guard<std::mutex> one(run_mu_);   // one op at a time through the pool
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xFFFFFF;
    for (int s = 0; s < n; ++s) {
      const int64_t lo = bounds ? bounds[s] : OwnedStart(total, s, n);
      const int64_t hi = bounds ? bounds[s + 1] : OwnedStart(total, s + 1, n);
      range_[s].w.store(Pack(gen_, hi, lo), std::memory_order_relaxed);
    }
    slots_.store(n, std::memory_order_relaxed);
    word_.store(gen_, std::memory_order_seq_cst);   // publishes the ranges with it
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    Claim(gen_, 0);
    for (int spin = 0; done_.load(std::memory_order_acquire) != total; ++spin) {
      if (spin < kPoolSpins) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr uint64_t kLo = 1, kHi = uint64_t{1} << 20;
  static uint64_t Pack(uint64_t gen, int64_t hi, int64_t lo) {
    return (gen << 40) | (static_cast<uint64_t>(hi) << 20) | static_cast<uint64_t>(lo);
  }

  // Takes one chunk of generation g from range r (its front when front, else its back):
  // the chunk, or -1 when the range is empty or no longer g's.
  int64_t Take(uint64_t g, int r, bool front) {
    std::atomic<uint64_t>& a = range_[r].w;
    uint64_t w = a.load(std::memory_order_acquire);
    for (;;) {
      if ((w >> 40) != g) return -1;
      const int64_t hi = (w >> 20) & 0xFFFFF, lo = w & 0xFFFFF;
      if (lo >= hi) return -1;
      if (a.compare_exchange_weak(w, front ? w + kLo : w - kHi, std::memory_order_acq_rel))
        return front ? lo : hi - 1;
    }
  }

  // Runs chunks of generation g as thread slot s: its own, then the others' from the back.
  void Claim(uint64_t g, int s) {
    const int n = slots_.load(std::memory_order_relaxed);
    if (s >= n) return;
    for (int k = 0; k < n; ++k) {
      const int r = (s + k) % n;
      for (int64_t t; (t = Take(g, r, k == 0)) >= 0;) {
        fn_(ctx_, t);   // fn_, ctx_ are this generation's: the caller waits for this chunk
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
      if ((word_.load(std::memory_order_relaxed)) != g) return;
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
    uint64_t seen = word_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t g;
      for (int spin = 0; (g = word_.load(std::memory_order_acquire)) == seen; ++spin) {
        if (spin < kPoolSpins) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lock, [&] { return word_.load(std::memory_order_seq_cst) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        spin = 0;
      }
      seen = g;
      Claim(g, i + 1);
    }
  }

  struct alignas(64) Range {
    std::atomic<uint64_t> w{0};
  };
  Range range_[kPoolSlots];
  alignas(64) std::atomic<uint64_t> word_{0};   // the generation of the op being run
  alignas(64) std::atomic<int64_t> done_{0};
  std::atomic<int> slots_{0};
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
