// bandadv_emulator::group_advantages, with the schema of bandadv::group_advantages: the CUDA
// kernels of csrc/cuda/group_advantages_kernels.cuh, with their own launch plan (plan_launch)
// and arguments (make_params), run on CPU tensors by the fiber emulator (cuda_emulator.h).
// What csrc/cuda/group_advantages.cu and group_advantages_cuda.cpp do around the kernels
// (scratch, memsets, the order of launches) is mirrored here; keep the two in step.
// tests/test_cuda_emulated.py builds this file and defines the op's schema before loading it.

// The emulator switches fibers with _longjmp between stacks, which glibc's fortified longjmp
// (_FORTIFY_SOURCE, on by default in some compilers) would take for stack corruption.
#undef _FORTIFY_SOURCE
#include <ATen/Dispatch.h>
#include <ATen/ops/from_blob.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <unistd.h>

#include <cmath>
#include <cstring>

#include "op_entry.h"

#include "cuda_emulator.h"  // before the kernels: it defines the CUDA keywords

// A failed device-side check (BANDADV_DEVICE_CHECK of the kernels): recorded by the emulated
// thread, raised as the op's error once the launch is over, as a GPU reports a device-side assert.
namespace bandadv::cuda {
inline const char*& failed_device_check() {
  static const char* message = nullptr;
  return message;
}
}  // namespace bandadv::cuda
#define BANDADV_DEVICE_CHECK(cond, msg) \
  if (!(cond)) bandadv::cuda::failed_device_check() = msg

#include "cuda/group_advantages_kernels.cuh"

namespace bandadv::cuda {
namespace {

// launch() of group_advantages.cu, with host scratch: as there, only the words scratch_layout
// names are zeroed; the rest starts as NaN.
template <int kVec, typename scalar_t, typename acc_t>
void emulate_launch(Params<scalar_t, acc_t> p, const LaunchPlan& plan) {
  p.num_tiles = plan.num_tiles;
  const ScratchLayout layout = scratch_layout(p);
  std::vector<double> words(layout.size, std::nan(""));
  std::fill(words.begin() + layout.zeroed_from, words.end(), 0.0);  // all-zero bits
  bind_scratch(p, words.data());
  const auto grid = static_cast<unsigned>(plan.num_tiles);
  if (plan.segments) {
    emu::launch(grid, kSegmentBlock, [&] { segment_kernel<kVec, scalar_t, acc_t>(p, plan.width); });
  } else {
    emu::launch(grid, plan.threads, [&] { block_kernel<kVec, scalar_t, acc_t>(p); });
  }
}

// launch_group_advantages() of group_advantages.cu.
void emulate(const Inputs& in, Outputs& out, const at::Tensor& batch_std, bool moments_only) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "group_advantages_emulated", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Params<scalar_t, acc_t> p = make_params<scalar_t, acc_t>(in, out, batch_std, moments_only);
    const LaunchPlan plan =
        plan_launch<scalar_t>(in.num_groups, in.group_size, in.num_samples, in.rewards.data_ptr());
    if (plan.vec > 1) {
      emulate_launch<kWideLoad<scalar_t>>(p, plan);
    } else {
      emulate_launch<1>(p, plan);
    }
  });
}

// A copy of a tensor whose last byte lies just before a page that may not be touched (less up
// to 15 bytes that keep its address modulo 16, which decides vector loads): a kernel that reads
// or writes past the end crashes the test instead of passing unnoticed.
class Guarded {
 public:
  explicit Guarded(at::Tensor& t) : original_(t) {
    if (!t.defined() || t.nbytes() == 0) return;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = t.nbytes(), offset = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16;
    const size_t span = (bytes + offset + 15) / 16 * 16;
    length_ = (span + page - 1) / page * page + page;
    void* base = mmap(nullptr, length_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "emulator: mmap failed");
    base_ = static_cast<unsigned char*>(base);
    unsigned char* guard = base_ + length_ - page;
    TORCH_CHECK(mprotect(guard, page, PROT_NONE) == 0, "emulator: mprotect failed");
    unsigned char* data = guard - span + offset;
    std::memcpy(data, t.data_ptr(), bytes);
    t = at::from_blob(data, t.sizes(), t.strides(), t.options());
  }
  ~Guarded() {
    if (base_) munmap(base_, length_);
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  // Copies the guarded data back into the tensor it was made from.
  void copy_back(at::Tensor& guarded) const {
    if (base_) std::memcpy(original_.data_ptr(), guarded.data_ptr(), original_.nbytes());
  }

 private:
  at::Tensor original_;
  unsigned char* base_ = nullptr;
  size_t length_ = 0;
};

// Runs the launches of one call on guarded copies of every tensor the kernels touch.
void emulate_guarded(const Inputs& in, Outputs& out, at::Tensor& batch_std) {
  Inputs gin = in;
  Outputs gout = out;
  std::vector<std::unique_ptr<Guarded>> inputs, outputs;
  for (at::Tensor* t : {&gin.rewards, &gin.offsets, &gin.success, &gin.valid, &gin.prior}) {
    inputs.push_back(std::make_unique<Guarded>(*t));
  }
  std::vector<at::Tensor*> touched = {&batch_std};
  for (at::Tensor* t : output_slots(gout)) touched.push_back(t);
  for (at::Tensor* t : touched) outputs.push_back(std::make_unique<Guarded>(*t));
  failed_device_check() = nullptr;
  if (in.options.scale == Scale::kBatch) emulate(gin, gout, batch_std, /*moments_only=*/true);
  emulate(gin, gout, batch_std, /*moments_only=*/false);
  TORCH_CHECK_VALUE(failed_device_check() == nullptr, "device-side assert: ", failed_device_check());
  for (size_t i = 0; i < touched.size(); ++i) outputs[i]->copy_back(*touched[i]);
}

// CudaBackend::run() of group_advantages_cuda.cpp, on outputs first filled with values no
// kernel writes, so that an output the kernels leave unwritten shows.
struct EmulatedBackend {
  static void run(const Inputs& in, Outputs& out) {
    for (at::Tensor* t : {&out.advantages, &out.group_stats}) t->fill_(std::nan(""));
    for (at::Tensor* t : {&out.reason, &out.count, &out.num_kept, &out.kept_index}) t->fill_(-77);
    out.sample_mask.fill_(true);
    out.group_mask.fill_(true);
    if (in.return_index && in.num_samples > 0) out.kept_index.fill_(-1);  // the memset to 0xff
    if (in.num_groups == 0) {
      out.num_kept.zero_();
      return;
    }
    at::Tensor batch_std;
    if (in.options.scale == Scale::kBatch) {
      batch_std = at::empty({1}, in.rewards.options().dtype(in.acc_dtype)).fill_(std::nan(""));
    }
    emulate_guarded(in, out, batch_std);
  }
};

// Resident threads at most (so blocks at once) and the seed of the scheduling order.
void configure(int64_t max_threads, int64_t seed) {
  emu::runtime().max_threads = static_cast<size_t>(max_threads);
  emu::runtime().seed = static_cast<uint64_t>(seed);
}

// Warp operations and block barriers executed since the last call (counted once per warp and
// per block): what the kernels' reductions and scans cost, independent of any GPU's timing.
std::vector<int64_t> counters() {
  emu::Runtime& r = emu::runtime();
  std::vector<int64_t> out = {r.warp_ops, r.block_barriers};
  r.warp_ops = r.block_barriers = 0;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bandadv_emulator, CPU, m) { register_kernels<EmulatedBackend>(m); }

// No tensor arguments, so no backend key to dispatch on.
TORCH_LIBRARY_IMPL(bandadv_emulator, CompositeExplicitAutograd, m) {
  m.impl("configure", &configure);
  m.impl("counters", &counters);
}

}  // namespace bandadv::cuda
