// Host emulation of the CUDA execution model, for tests only: csrc/cuda/*.cu compiled by the host compiler with
// CSFRN_CUDA_EMU (through cuda/launch.h) runs its kernels on the CPU, on CPU tensors, registered as csfrn_emu::*.
//
// - __global__ / __device__ / __host__ functions are host functions.
// - CSFRN_LAUNCH(grid, block, smem, stream, kernel)(args...) checks the configuration as a GPU does (no empty
//   grid or block, at most 1024 threads per block (64 along z), gridDim.y/z <= 65535, dynamic shared memory
//   <= 48 KiB) and throws a c10::Error naming the kernel when a GPU would refuse the launch. It then runs the
//   blocks one after another; the threads of a block run concurrently as fibers (ucontext) on this OS thread,
//   switching only at __syncthreads and the warp intrinsics (__syncwarp, __shfl*_sync, __ballot/any/all_sync).
//   blockIdx, threadIdx, blockDim and gridDim are thread-local variables set before each switch.
// - Strict where CUDA says "undefined": a barrier or warp op that not every thread (every lane of the mask)
//   reaches, masks that disagree, a shuffle from a lane outside the mask: all throw instead of hanging or
//   returning garbage.
// - atomicAdd & co. are plain read-modify-writes (fibers never switch inside one), so they are atomic here.
// - __shared__ is `static thread_local`: one copy per kernel instantiation, reused by every block (blocks run in
//   turn). Like on a GPU its contents at block start are undefined (here: the previous block's), so a kernel that
//   reads shared memory before writing it may pass here by luck. Dynamic shared memory (csfrn::dynamic_shared<T>)
//   is filled with 0xFF bytes (NaN for floats) before each block, so reading it unwritten shows.
// - Device guards, streams and the launch check are no-ops; at::cuda::getCurrentDeviceProperties() describes an
//   H100 (132 SMs). The shims live in unnamed namespaces, so they never collide with a CUDA build of libtorch.
// - Test hooks: set_grid_x_cap(c) runs at most c blocks along x (gridDim.x reads c), to drive grid-stride loops
//   past their first stride with small inputs (valid only for kernels written as grid-stride loops);
//   launch_count() is the number of kernel launches so far, so a test can count a launcher's launches.
// - Tensors are CPU tensors, so a launcher must take devices and options from its inputs (x.options()), never
//   name at::kCUDA itself.
// - Vector accesses (csfrn::load_vec / store_vec, common/cuda_helpers.cuh) check their alignment and throw where a
//   GPU would fault.
// What it cannot see: races between blocks, memory-model subtleties, timing, real device memory limits, and
// out-of-bounds accesses (raw pointers are not checked: a stray write corrupts the heap, as on a GPU it faults).
#pragma once

#ifdef __CUDACC__
#error "csrc/emu/cuda_emu.h is the host emulation of CUDA; nvcc compiles the real thing"
#endif

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- Keywords and built-in variables ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;
using cudaStream_t = void*;

// Device-side min / max of CUDA (mixed integer widths allowed, as its overloads allow).
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  return T(b) < T(a) ? T(b) : T(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  return T(a) < T(b) ? T(b) : T(a);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- Atomics: the types CUDA has them for (and half / bfloat16, which ATen's gpuAtomicAdd covers) ----
namespace csfrn {
namespace emu {
template <typename T>
constexpr bool atomic_add_type =
    std::is_same_v<T, int> || std::is_same_v<T, unsigned int> || std::is_same_v<T, unsigned long long> ||
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, c10::Half> ||
    std::is_same_v<T, c10::BFloat16>;
template <typename T>
constexpr bool atomic_int_type =
    std::is_same_v<T, int> || std::is_same_v<T, unsigned int> || std::is_same_v<T, unsigned long long>;
}  // namespace emu
}  // namespace csfrn

template <typename T>
inline T atomicAdd(T* address, T val) {
  static_assert(csfrn::emu::atomic_add_type<T>, "CUDA has no atomicAdd for this type");
  const T old = *address;
  *address = static_cast<T>(old + val);
  return old;
}
template <typename T>
inline T atomicSub(T* address, T val) {
  static_assert(csfrn::emu::atomic_int_type<T>, "CUDA has atomicSub for int and unsigned int only");
  const T old = *address;
  *address = old - val;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T val) {
  static_assert(csfrn::emu::atomic_int_type<T>, "CUDA has atomicMax for integers only");
  const T old = *address;
  *address = std::max(old, val);
  return old;
}
template <typename T>
inline T atomicMin(T* address, T val) {
  static_assert(csfrn::emu::atomic_int_type<T>, "CUDA has atomicMin for integers only");
  const T old = *address;
  *address = std::min(old, val);
  return old;
}
template <typename T>
inline T atomicExch(T* address, T val) {
  const T old = *address;
  *address = val;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
  static_assert(csfrn::emu::atomic_int_type<T>, "CUDA has atomicCAS for integers only");
  const T old = *address;
  if (old == compare) *address = val;
  return old;
}

// ---- The launch and the fibers ----
namespace csfrn {
namespace emu {

constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;  // without cudaFuncSetAttribute (not emulated)
constexpr size_t kStackBytes = 256 * 1024;            // per emulated thread; untouched pages cost nothing

inline int64_t& grid_x_cap() {
  static int64_t cap = 0;  // 0: no cap
  return cap;
}
inline int64_t set_grid_x_cap(int64_t cap) {
  const int64_t old = grid_x_cap();
  grid_x_cap() = cap;
  return old;
}

// A vector access of `bytes` bytes (csfrn::load_vec / store_vec) must be aligned to them, as on a GPU.
inline void check_aligned(const void* p, size_t bytes, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % bytes == 0, "CUDA emulation: a ", bytes, "-byte vector ", what,
              " at the misaligned address ", p, " (a misaligned address error on a GPU)");
}

inline int64_t& launches() {
  static int64_t count = 0;
  return count;
}
inline int64_t launch_count() { return launches(); }

// One emulated GPU thread.
struct Fiber {
  enum State { kReady, kAtBarrier, kAtWarpOp, kDone };
  ucontext_t ctx;
  uint3 idx;
  State state = kReady;
  std::exception_ptr error;
  // The pending warp op: its mask, this lane's value and source lane; the result once the warp has met.
  unsigned int mask = 0;
  uint64_t value = 0, result = 0;
  int src = 0;
};

// The block being run (on this OS thread).
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  void (*body)(const void*) = nullptr;
  const void* body_arg = nullptr;
  const char* kernel = "";
  unsigned char* dynamic_smem = nullptr;
  // Per warp: the lanes that wait in the current warp op, its kind and mask.
  std::vector<unsigned int> warp_arrived, warp_mask;
  std::vector<int> warp_kind;
};

inline thread_local Block* tl_block = nullptr;

inline std::string hex(unsigned int mask) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", mask);
  return buf;
}

// Stacks of the emulated threads, mapped once per OS thread and reused by every block and launch.
inline char* stack_of(int i) {
  static thread_local std::vector<char*> stacks;
  while (static_cast<int>(stacks.size()) <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a thread stack");
    mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
    stacks.push_back(static_cast<char*>(p));
  }
  return stacks[i];
}

inline void fiber_main() {
  Block& b = *tl_block;
  Fiber& f = b.fibers[b.current];
  try {
    b.body(b.body_arg);
  } catch (...) {
    f.error = std::current_exception();
  }
  f.state = Fiber::kDone;  // uc_link returns to the scheduler
}

inline Block& current_block(const char* what) {
  TORCH_CHECK(tl_block != nullptr && tl_block->current >= 0, "CUDA emulation: ", what,
              " called outside a kernel launch");
  return *tl_block;
}

// Back to the scheduler until it resumes this thread.
inline void yield(Block& b) {
  Fiber& f = b.fibers[b.current];
  swapcontext(&f.ctx, &b.scheduler);
}

inline void syncthreads() {
  Block& b = current_block("__syncthreads");
  b.fibers[b.current].state = Fiber::kAtBarrier;
  yield(b);
}

enum WarpOp { kSyncWarp, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };

// Every lane of `mask` calls this with the same op and mask; returns the lane's result (see warp_op below).
inline uint64_t warp_meet(WarpOp op, unsigned int mask, uint64_t value, int src) {
  Block& b = current_block("a warp intrinsic");
  const int tid = b.current, warp = tid / warpSize, lane = tid % warpSize;
  const int warp_size = std::min<int>(warpSize, static_cast<int>(b.fibers.size()) - warp * warpSize);
  const unsigned int existing = warp_size == 32 ? 0xffffffffu : ((1u << warp_size) - 1);
  TORCH_CHECK((mask >> lane) & 1u, "CUDA emulation: kernel ", b.kernel, ": thread ", tid,
              " calls a warp intrinsic with a mask ", hex(mask), " that does not include its lane ", lane);
  TORCH_CHECK((mask & ~existing) == 0, "CUDA emulation: kernel ", b.kernel, ": warp intrinsic mask ", hex(mask),
              " names lanes that do not exist in warp ", warp, " (", warp_size, " threads)");
  Fiber& f = b.fibers[tid];
  f.mask = mask;
  f.value = value;
  f.src = src;
  unsigned int& arrived = b.warp_arrived[warp];
  if (arrived == 0) {
    b.warp_kind[warp] = op;
    b.warp_mask[warp] = mask;
  } else {
    TORCH_CHECK(b.warp_kind[warp] == op && b.warp_mask[warp] == mask, "CUDA emulation: kernel ", b.kernel,
                ": lanes of warp ", warp, " meet in different warp intrinsics or with different masks (",
                hex(b.warp_mask[warp]), " vs ", hex(mask), ")");
  }
  arrived |= 1u << lane;
  if (arrived != mask) {
    f.state = Fiber::kAtWarpOp;
    yield(b);  // the last lane to arrive computes every result and wakes us
    return f.result;
  }
  // Last to arrive: compute the results of every lane of the mask.
  uint64_t ballot = 0;
  for (int l = 0; l < warp_size; ++l) {
    if ((mask >> l) & 1u) ballot |= uint64_t(b.fibers[warp * warpSize + l].value != 0) << l;
  }
  for (int l = 0; l < warp_size; ++l) {
    if (!((mask >> l) & 1u)) continue;
    Fiber& g = b.fibers[warp * warpSize + l];
    switch (op) {
      case kSyncWarp:
        g.result = 0;
        break;
      case kBallot:
        g.result = ballot;
        break;
      case kAny:
        g.result = ballot != 0;
        break;
      case kAll:
        g.result = ballot == mask;
        break;
      default:
        TORCH_CHECK(g.src >= 0 && g.src < warp_size && ((mask >> g.src) & 1u), "CUDA emulation: kernel ", b.kernel,
                    ": lane ", l, " of warp ", warp, " reads lane ", g.src, " outside the mask ", hex(mask));
        g.result = b.fibers[warp * warpSize + g.src].value;
    }
    if (l != lane) g.state = Fiber::kReady;
  }
  arrived = 0;
  return f.result;
}

// Runs body(arg) as every thread of every block; throws where a GPU would refuse the launch.
inline void run_grid(dim3 grid, dim3 block, size_t smem, const char* kernel, void (*body)(const void*),
                     const void* arg) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  auto refuse = [&](const char* why) {
    TORCH_CHECK(false, "CUDA emulation: a GPU refuses the launch of ", kernel, " with grid (", grid.x, ", ", grid.y,
                ", ", grid.z, "), block (", block.x, ", ", block.y, ", ", block.z, "), ", smem,
                " bytes of dynamic shared memory: ", why, " (cudaErrorInvalidConfiguration / invalid argument)");
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) refuse("the grid is empty");
  if (threads == 0) refuse("the block is empty");
  if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    refuse("more than 1024 threads per block (or more than 1024 along x / y, 64 along z)");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    refuse("gridDim.x is at most 2^31 - 1, gridDim.y and gridDim.z at most 65535");
  if (smem > kMaxDynamicSharedBytes) refuse("more than 48 KiB of dynamic shared memory per block");
  ++launches();

  dim3 run = grid;
  if (grid_x_cap() > 0) run.x = static_cast<unsigned int>(std::min<int64_t>(run.x, grid_x_cap()));
  Block b;
  b.fibers.resize(threads);
  b.body = body;
  b.body_arg = arg;
  b.kernel = kernel;
  const int warps = static_cast<int>((threads + warpSize - 1) / warpSize);
  b.warp_arrived.assign(warps, 0);
  b.warp_mask.assign(warps, 0);
  b.warp_kind.assign(warps, 0);
  std::vector<unsigned char> shared(smem);
  b.dynamic_smem = shared.data();
  ucontext_t fresh;  // a thread's starting context, less its stack: one getcontext (a system call) per launch
  getcontext(&fresh);
  Block* const outer = tl_block;
  tl_block = &b;
  struct Restore {  // leave this OS thread as we found it, also when a thread throws
    Block* outer;
    ~Restore() {
      tl_block = outer;
      threadIdx = {0, 0, 0};
      blockIdx = {0, 0, 0};
    }
  } restore{outer};
  gridDim = run;
  blockDim = block;

  for (unsigned int bz = 0; bz < run.z; ++bz) {
    for (unsigned int by = 0; by < run.y; ++by) {
      for (unsigned int bx = 0; bx < run.x; ++bx) {
        blockIdx = {bx, by, bz};
        std::memset(shared.data(), 0xFF, smem);
        for (int64_t t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.idx = {static_cast<unsigned int>(t % block.x), static_cast<unsigned int>((t / block.x) % block.y),
                   static_cast<unsigned int>(t / (int64_t(block.x) * block.y))};
          f.state = Fiber::kReady;
          f.error = nullptr;
          f.ctx = fresh;
          f.ctx.uc_stack.ss_sp = stack_of(static_cast<int>(t));
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_main, 0);
        }
        std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0u);
        // Resume every ready thread in turn until all are done; release the barrier when all stand at it.
        for (;;) {
          bool ran = false;
          for (int64_t t = 0; t < threads; ++t) {
            Fiber& f = b.fibers[t];
            if (f.state != Fiber::kReady) continue;
            b.current = static_cast<int>(t);
            threadIdx = f.idx;
            swapcontext(&b.scheduler, &f.ctx);
            b.current = -1;
            ran = true;
            if (f.error) std::rethrow_exception(f.error);
          }
          if (ran) continue;
          int64_t done = 0, barrier = 0, warp = 0;
          for (const Fiber& f : b.fibers) {
            done += f.state == Fiber::kDone;
            barrier += f.state == Fiber::kAtBarrier;
            warp += f.state == Fiber::kAtWarpOp;
          }
          if (done == threads) break;
          TORCH_CHECK(warp == 0, "CUDA emulation: kernel ", kernel, ", block (", bx, ", ", by, ", ", bz, "): ", warp,
                      " thread(s) wait in a warp intrinsic for lanes of its mask that exited or wait at "
                      "__syncthreads (a deadlock or undefined behaviour on a GPU)");
          TORCH_CHECK(done == 0, "CUDA emulation: kernel ", kernel, ", block (", bx, ", ", by, ", ", bz, "): ", barrier,
                      " of ", threads, " threads wait at __syncthreads but ", done,
                      " exited without reaching it (undefined behaviour on a GPU)");
          for (Fiber& f : b.fibers) f.state = Fiber::kReady;
        }
      }
    }
  }
}

// A launch: the kernel and its configuration; calling it with the arguments runs it, which converts them to the
// kernel's parameter types once, as a launch does, and hands every thread its own copy.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  const char* name;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    using Params = std::tuple<std::decay_t<P>...>;
    struct Call {
      void (*kernel)(P...);
      Params params;
    } call{kernel, Params(std::forward<A>(args)...)};
    run_grid(
        grid, block, smem, name,
        [](const void* c) {
          const Call& cl = *static_cast<const Call*>(c);
          std::apply(cl.kernel, cl.params);
        },
        &call);
  }
};

template <typename... P, typename Stream>
Launch<P...> make_launch(dim3 grid, dim3 block, size_t smem, const Stream& /*stream*/, const char* name,
                         void (*kernel)(P...)) {
  return {kernel, grid, block, smem, name};
}

}  // namespace emu

// The block's dynamic shared memory (the launch's shared_bytes), as T*.
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(emu::current_block("dynamic_shared").dynamic_smem);
}

}  // namespace csfrn

#define CSFRN_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::csfrn::emu::make_launch(grid, block, shared_bytes, stream, #__VA_ARGS__, __VA_ARGS__)
#define CSFRN_CUDA_LIBRARY csfrn_emu
#define CSFRN_CUDA_KEY CPU
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

inline void __syncthreads() { csfrn::emu::syncthreads(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { csfrn::emu::warp_meet(csfrn::emu::kSyncWarp, mask, 0, 0); }
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
  return static_cast<unsigned int>(csfrn::emu::warp_meet(csfrn::emu::kBallot, mask, pred != 0, 0));
}
inline int __any_sync(unsigned int mask, int pred) {
  return static_cast<int>(csfrn::emu::warp_meet(csfrn::emu::kAny, mask, pred != 0, 0));
}
inline int __all_sync(unsigned int mask, int pred) {
  return static_cast<int>(csfrn::emu::warp_meet(csfrn::emu::kAll, mask, pred != 0, 0));
}
inline unsigned int __activemask() {
  const csfrn::emu::Block& b = csfrn::emu::current_block("__activemask");
  const int warp = b.current / warpSize;
  unsigned int m = 0;
  for (int l = 0; l < warpSize && warp * warpSize + l < static_cast<int>(b.fibers.size()); ++l) {
    if (b.fibers[warp * warpSize + l].state != csfrn::emu::Fiber::kDone) m |= 1u << l;
  }
  return m;
}

namespace csfrn {
namespace emu {
// A shuffle: lane reads `src` of its segment of `width` lanes (its own value when src falls outside).
template <typename T>
inline T shuffle(unsigned int mask, T var, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_meet(kShfl, mask, bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
inline int lane_id() { return current_block("a shuffle").current % warpSize; }
}  // namespace emu
}  // namespace csfrn

template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
  const int lane = csfrn::emu::lane_id(), base = lane - lane % width;
  return csfrn::emu::shuffle(mask, var, base + ((src_lane % width) + width) % width);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  const int lane = csfrn::emu::lane_id();
  return csfrn::emu::shuffle(mask, var,
                             lane % width >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  const int lane = csfrn::emu::lane_id();
  return csfrn::emu::shuffle(mask, var,
                             lane % width + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane);
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {
  const int lane = csfrn::emu::lane_id(), src = lane ^ lane_mask;
  return csfrn::emu::shuffle(mask, var, src / width == lane / width ? src : lane);
}

// ---- ATen / c10 CUDA shims (unnamed namespaces: internal linkage, no clash with libtorch_cuda's symbols) ----
namespace at {
namespace cuda {
namespace {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }
// The fields of cudaDeviceProp a launcher may size its grid by, with an H100's values.
struct DeviceProp {
  int multiProcessorCount = 132;
  int maxThreadsPerBlock = 1024;
  int maxThreadsPerMultiProcessor = 2048;
  int warpSize = 32;
  size_t sharedMemPerBlock = 48 * 1024;
  size_t sharedMemPerBlockOptin = 227 * 1024;
  size_t sharedMemPerMultiprocessor = 228 * 1024;
  int maxGridSize[3] = {2147483647, 65535, 65535};
};
inline const DeviceProp* getCurrentDeviceProperties() {
  static const DeviceProp prop;
  return &prop;
}
}  // namespace
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
namespace {
// Tensors are on the CPU here; a guard only checks that.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "CUDA emulation: expected a CPU tensor, got one on ", device);
  }
  explicit CUDAGuard(c10::DeviceIndex) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
  OptionalCUDAGuard(const OptionalCUDAGuard&) = delete;
  OptionalCUDAGuard& operator=(const OptionalCUDAGuard&) = delete;
};
}  // namespace
}  // namespace cuda
}  // namespace c10
