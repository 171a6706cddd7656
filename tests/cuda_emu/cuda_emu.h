// A CPU emulator of the small part of CUDA that the fastmask kernels use, so that the CI
// (no GPU) can run the real kernels and bindings (csrc/) on real data against the
// PyTorch reference. Not a performance path and not a general emulator.
//
// Model: the blocks of a launch run one after another; the threads of a block are
// cooperative fibers (ucontext) on the calling thread, run round-robin, each until it
// finishes or waits: __syncthreads is a barrier over the block's fibers and
// __shfl_xor_sync an exchange through a per-warp slot array between two warp barriers.
// A barrier that can never complete (a thread left the kernel, or took another path,
// while others wait: undefined behaviour on a GPU) is reported as a launch failure
// instead of hanging. __shared__ variables become function statics (one block at a time).
//
// Included (by module.cpp) before the kernel sources, with FASTMASK_CPU_EMULATION defined.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

// The CUDA attributes mean nothing on the host (host_defines.h turns them into GCC
// attributes that warn); __shared__ becomes a function static.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

namespace fastmask_emu {

inline dim3 cur_thread_idx, cur_block_idx, cur_block_dim, cur_grid_dim;
inline cudaError_t last_error = cudaSuccess;

class Scheduler {
 public:
  static Scheduler& get() {
    static Scheduler s;
    return s;
  }

  // Runs body() as `threads` fibers; false if the block deadlocked in a barrier.
  bool run_block(int threads, const std::function<void()>& body) {
    while (static_cast<int>(fibers_.size()) < threads) fibers_.emplace_back(std::make_unique<Fiber>());
    body_ = &body;
    for (int i = 0; i < threads; ++i) {
      Fiber& f = *fibers_[i];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &main_;
      makecontext(&f.ctx, &Scheduler::trampoline, 0);
      f.done = false;
    }
    int alive = threads;
    while (alive > 0) {
      const long before = progress_;
      for (int i = 0; i < threads; ++i) {
        if (fibers_[i]->done) continue;
        current_ = i;
        cur_thread_idx = dim3(static_cast<unsigned>(i), 0, 0);
        swapcontext(&main_, &fibers_[i]->ctx);
        if (fibers_[i]->done) {
          --alive;
          ++progress_;
        }
      }
      if (alive > 0 && progress_ == before) return false;  // everyone left is waiting: deadlock
    }
    return true;
  }

  void yield() { swapcontext(&fibers_[current_]->ctx, &main_); }
  void made_progress() { ++progress_; }

 private:
  static constexpr size_t kStack = 256 * 1024;
  struct Fiber {
    ucontext_t ctx{};
    std::unique_ptr<char[]> stack{new char[kStack]};
    bool done = false;
  };

  static void trampoline() {
    Scheduler& s = get();
    (*s.body_)();
    s.fibers_[s.current_]->done = true;
  }  // returns to uc_link (the scheduler)

  ucontext_t main_{};
  std::vector<std::unique_ptr<Fiber>> fibers_;
  const std::function<void()>* body_ = nullptr;
  int current_ = 0;
  long progress_ = 0;
};

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    Scheduler& s = Scheduler::get();
    const long gen = generation_;
    s.made_progress();
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    while (generation_ == gen) s.yield();
  }

 private:
  int count_;
  int arrived_ = 0;
  long generation_ = 0;
};

struct Warp {
  explicit Warp(int n) : barrier(n) {}
  Barrier barrier;
  float slot[32] = {};
};

struct Block {
  explicit Block(int threads) : barrier(threads) {
    for (int w = 0; w * 32 < threads; ++w) {
      const int n = threads - w * 32 < 32 ? threads - w * 32 : 32;
      warps.emplace_back(std::make_unique<Warp>(n));
    }
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Block* cur_block = nullptr;

// Runs kernel(args...) over a 1-d grid of 1-d blocks.
template <typename Kernel>
struct Launcher {
  Kernel* kernel;
  dim3 grid, block;
  template <typename... Args>
  void operator()(Args... args) const {
    if (block.x < 1 || block.x > 1024 || grid.x < 1 || block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const std::function<void()> body = [&] { kernel(args...); };
    for (unsigned b = 0; b < grid.x; ++b) {
      Block ctx(static_cast<int>(block.x));
      cur_block = &ctx;
      cur_block_idx = dim3(b, 0, 0);
      cur_block_dim = block;
      cur_grid_dim = grid;
      if (!Scheduler::get().run_block(static_cast<int>(block.x), body)) {
        std::fprintf(stderr, "fastmask_emu: block %u of %u deadlocked in a barrier (divergent __syncthreads or "
                     "shuffle)\n", b, grid.x);
        last_error = cudaErrorLaunchFailure;
        return;
      }
    }
  }
};

template <typename Kernel>
Launcher<Kernel> launcher(dim3 grid, dim3 block, Kernel* kernel) {
  return Launcher<Kernel>{kernel, grid, block};
}

inline void syncthreads() { cur_block->barrier.wait(); }

inline float shfl_xor(float v, int lane_mask) {
  Warp& w = *cur_block->warps[cur_thread_idx.x / 32];
  const unsigned lane = cur_thread_idx.x % 32;
  w.barrier.wait();  // the previous exchange's reads are done
  w.slot[lane] = v;
  w.barrier.wait();
  return w.slot[lane ^ static_cast<unsigned>(lane_mask)];
}

inline cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

inline cudaError_t get_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

}  // namespace fastmask_emu

#define threadIdx (::fastmask_emu::cur_thread_idx)
#define blockIdx (::fastmask_emu::cur_block_idx)
#define blockDim (::fastmask_emu::cur_block_dim)
#define gridDim (::fastmask_emu::cur_grid_dim)
#define __syncthreads() ::fastmask_emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::fastmask_emu::shfl_xor((v), (lane_mask))
#define FASTMASK_LAUNCH(grid, block, stream, ...) ::fastmask_emu::launcher((grid), (block), &__VA_ARGS__)
#define cudaMemsetAsync ::fastmask_emu::memset_async
#define cudaGetLastError ::fastmask_emu::get_last_error
#define cudaGetErrorString(e) "emulated CUDA error"

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
#define cudaDeviceGetAttribute(value, attr, device) (*(value) = 2, cudaSuccess)
