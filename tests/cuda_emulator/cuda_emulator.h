// A CPU emulator of the CUDA features csrc/cuda/group_advantages_kernels.cuh uses, so that the
// tests run those kernels' own source on machines without a GPU. Every CUDA thread is a fiber
// (ucontext) on one OS thread; a fiber runs until it reaches a __syncthreads or a warp
// operation, where it waits for the rest of its block or warp while the others run. Several
// blocks are resident at once, scheduled in an order shuffled at every pass, so blocks overlap
// (the decoupled look-back sees tiles that have published only their own count, or nothing yet).
//
// It checks the kernels' logic: indexing, scans, the look-back protocol, every team shape and
// load width. It does not model the GPU's memory ordering, timing or resource limits; those
// need a GPU (benchmarks/gpu_check.sh). Include it before the kernels: it defines the CUDA
// keywords they use.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define BANDADV_SHARED(type, name) type& name = ::emu::shared<type>(__LINE__)
#define BANDADV_VECTOR(address, ...) (*::emu::aligned<__VA_ARGS__>(address))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

struct Barrier {
  int arrived = 0;
  int64_t generation = 0;
};

struct Block {
  unsigned index = 0;  // blockIdx.x
  Barrier barrier;
  std::vector<Barrier> warp_barriers;
  // One value per lane of each warp, in two buffers used by alternate warp operations: a lane
  // writes buffer b again only two operations later, after every lane has read it.
  std::vector<std::array<std::array<uint64_t, 32>, 2>> warp_slots;
  std::vector<int> warp_buffer;  // the buffer of each lane's next operation, per thread
  std::map<int, std::unique_ptr<unsigned char[]>> shared;  // one per BANDADV_SHARED declaration
};

// A fiber is entered once through its ucontext and switched with _setjmp/_longjmp after that,
// which saves no signal mask: no system call per switch (swapcontext makes two).
struct Fiber {
  ucontext_t context;
  jmp_buf resume;
  unsigned thread = 0;
  size_t block = 0;  // in Runtime::blocks
  bool started = false;
  bool done = false;
};

struct Runtime {
  unsigned block_dim = 0;
  std::vector<Block> blocks;  // resident now
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;  // unused after the first entry of each fiber
  jmp_buf scheduler_resume;
  std::function<void()> kernel;
  int64_t progress = 0;  // block barriers passed and fibers finished (not warp operations,
                         // which a warp spinning on another block's flag keeps doing)
  size_t max_threads = 12288;  // resident threads at most
  uint64_t seed = 0;
  int64_t warp_ops = 0;  // warp operations (shuffles, votes) executed, counted per warp
  int64_t block_barriers = 0;  // __syncthreads passed, counted per block
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

inline dim3 thread_idx() { return {runtime().current->thread, 1, 1}; }
inline dim3 block_idx() { return {runtime().blocks[runtime().current->block].index, 1, 1}; }
inline dim3 block_dim() { return {runtime().block_dim, 1, 1}; }

inline void yield() {
  Runtime& r = runtime();
  if (_setjmp(r.current->resume) == 0) _longjmp(r.scheduler_resume, 1);
}

// Runs fiber f until it yields or finishes.
inline void resume(Fiber& f) {
  Runtime& r = runtime();
  r.current = &f;
  if (_setjmp(r.scheduler_resume) != 0) return;
  if (!f.started) {
    f.started = true;
    swapcontext(&r.scheduler, &f.context);
  } else {
    _longjmp(f.resume, 1);
  }
}

// Returns once `count` fibers have arrived.
inline void wait(Barrier& b, int count, bool is_progress) {
  const int64_t generation = b.generation;
  if (++b.arrived == count) {
    b.arrived = 0;
    ++b.generation;
    if (is_progress) ++runtime().progress;
    return;
  }
  while (b.generation == generation) yield();
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8);
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Every lane of the warp deposits v; read(lane, slots) then gives this lane's result. All 32
// lanes must call it (the kernels pass a full mask everywhere).
template <typename T, typename Read>
auto warp_op(T v, Read read) {
  Runtime& r = runtime();
  Block& b = r.blocks[r.current->block];
  const unsigned lane = r.current->thread % 32, warp = r.current->thread / 32;
  int& buffer = b.warp_buffer[r.current->thread];
  auto& slots = b.warp_slots[warp][buffer];
  buffer ^= 1;
  slots[lane] = to_bits(v);
  if (lane == 0) ++r.warp_ops;
  wait(b.warp_barriers[warp], 32, false);
  return read(lane, slots);
}

// This block's storage for the shared declaration on `line`, uninitialised like CUDA's.
template <typename T>
T& shared(int line) {
  Runtime& r = runtime();
  auto& slot = r.blocks[r.current->block].shared[line];
  if (!slot) {
    slot.reset(new unsigned char[sizeof(T) + alignof(T)]);
    std::memset(slot.get(), 0xa5, sizeof(T) + alignof(T));
  }
  void* p = slot.get();
  size_t space = sizeof(T) + alignof(T);
  return *static_cast<T*>(std::align(alignof(T), sizeof(T), p, space));
}

// `address` as a T*, after checking it is aligned to T as a GPU's vector access must be: a
// misaligned one faults there. Aborts, since an exception cannot leave a fiber.
template <typename T, typename U>
T* aligned(U* address) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(T) != 0) {
    std::fprintf(stderr, "emulator: misaligned %zu-byte vector access at %p\n", sizeof(T),
                 static_cast<const void*>(address));
    std::abort();
  }
  return reinterpret_cast<T*>(address);
}

inline void trampoline() {
  Runtime& r = runtime();
  r.kernel();
  r.current->done = true;
  ++r.progress;
  _longjmp(r.scheduler_resume, 1);
}

// Runs kernel() as `grid` blocks of `threads` threads, as many blocks resident at once as
// max_threads allows, each replaced by the next block when it finishes (as a GPU would).
// Throws if no fiber makes progress for many passes: the kernel would hang on a GPU too.
inline void launch(unsigned grid, unsigned threads, std::function<void()> kernel) {
  Runtime& r = runtime();
  if (threads % 32 != 0) throw std::runtime_error("emulator: blockDim.x must be a multiple of 32");
  const size_t resident = std::max<size_t>(1, std::min<size_t>(grid, r.max_threads / threads));
  constexpr size_t kStack = 32 * 1024;
  std::unique_ptr<unsigned char[]> stacks(new unsigned char[resident * threads * kStack]);
  r.block_dim = threads;
  r.kernel = std::move(kernel);
  r.blocks.clear();
  r.blocks.resize(resident);
  r.fibers.assign(resident * threads, Fiber{});
  std::vector<bool> slot_busy(resident, false);
  std::mt19937_64 rng(r.seed);
  unsigned next_block = 0;
  auto start_block = [&](size_t slot) {
    Block& b = r.blocks[slot];
    b = Block{};
    b.index = next_block++;
    b.warp_barriers.assign(threads / 32, Barrier{});
    b.warp_slots.assign(threads / 32, {});
    b.warp_buffer.assign(threads, 0);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = r.fibers[slot * threads + t];
      f = Fiber{};
      f.thread = t;
      f.block = slot;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stacks.get() + (slot * threads + t) * kStack;
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = &r.scheduler;
      makecontext(&f.context, trampoline, 0);
    }
    slot_busy[slot] = true;
  };
  for (size_t slot = 0; slot < resident && next_block < grid; ++slot) start_block(slot);
  std::vector<size_t> order(resident);
  for (size_t i = 0; i < resident; ++i) order[i] = i;
  int64_t idle_passes = 0;
  while (std::any_of(slot_busy.begin(), slot_busy.end(), [](bool b) { return b; })) {
    const int64_t before = r.progress;
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t slot : order) {
      if (!slot_busy[slot]) continue;
      bool all_done = true;
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = r.fibers[slot * threads + t];
        if (f.done) continue;
        resume(f);
        all_done &= f.done;
      }
      if (all_done) {
        slot_busy[slot] = false;
        if (next_block < grid) start_block(slot);
      }
    }
    idle_passes = r.progress == before ? idle_passes + 1 : 0;
    if (idle_passes > 20000) throw std::runtime_error("emulator: the kernel hangs (no fiber progresses)");
  }
  r.current = nullptr;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())

inline void __syncthreads() {
  emu::Runtime& r = emu::runtime();
  if (r.current->thread == 0) ++r.block_barriers;
  emu::wait(r.blocks[r.current->block].barrier, static_cast<int>(r.block_dim), true);
}

inline void __threadfence() {}  // fibers on one OS thread see every write in program order

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  return emu::warp_op(v, [&](unsigned lane, const std::array<uint64_t, 32>& s) {
    const unsigned source = lane ^ static_cast<unsigned>(lane_mask);
    return source / width > lane / width ? v : emu::from_bits<T>(s[source]);  // no later segment
  });
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return emu::warp_op(v, [&](unsigned lane, const std::array<uint64_t, 32>& s) {
    return lane % width < delta ? v : emu::from_bits<T>(s[lane - delta]);
  });
}

template <typename T>
T __shfl_sync(unsigned, T v, int source_lane, int width = 32) {
  return emu::warp_op(v, [&](unsigned lane, const std::array<uint64_t, 32>& s) {
    return emu::from_bits<T>(s[lane / width * width + static_cast<unsigned>(source_lane) % width]);
  });
}

inline unsigned __ballot_sync(unsigned, int predicate) {
  return emu::warp_op(predicate != 0, [](unsigned, const std::array<uint64_t, 32>& s) {
    unsigned bits = 0;
    for (unsigned i = 0; i < 32; ++i) bits |= (s[i] != 0 ? 1u : 0u) << i;
    return bits;
  });
}

inline bool __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }

inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  return emu::warp_op(v, [](unsigned, const std::array<uint64_t, 32>& s) {
    unsigned m = 0;
    for (unsigned i = 0; i < 32; ++i) m = std::max(m, static_cast<unsigned>(s[i]));
    return m;
  });
}

// Single OS thread, switched only at barriers and warp operations: plain read-modify-writes are
// atomic here.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = v;
  return old;
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
