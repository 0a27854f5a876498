// Launch sizes and the grid-stride loop of the CUDA kernels (csrc/cuda/*.cu), one definition for all of them.
// Included after cuda/launch.h, so it serves nvcc and the host emulation (csrc/emu/) alike.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace csfrn {

// Threads per block of the kernels' launches.
constexpr int kThreads = 256;
// At most this many blocks per launch: the grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Blocks for n items at `threads` per block, at least one, capped at kMaxBlocks.
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks)));
}

// V consecutive elements moved as one aligned access: 16 bytes of them compile to one LDG.128 / STG.128 (what
// ATen's aligned_vector does). The address must be a multiple of sizeof(Vec): launchers check it before they pick
// V > 1 (the emulation checks every access: a GPU faults on a misaligned one).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// The widest vector of T a lane moves: 16 bytes (8 float16 / bfloat16, 4 float32, 2 float64).
template <typename T>
constexpr int kVecElements = 16 / static_cast<int>(sizeof(T));

template <int V, typename T>
__device__ __forceinline__ Vec<std::remove_const_t<T>, V> load_vec(T* p) {
#ifdef CSFRN_CUDA_EMU
  emu::check_aligned(p, sizeof(T) * V, "load");
#endif
  return *reinterpret_cast<const Vec<std::remove_const_t<T>, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& x) {
#ifdef CSFRN_CUDA_EMU
  emu::check_aligned(p, sizeof(T) * V, "store");
#endif
  *reinterpret_cast<Vec<T, V>*>(p) = x;
}

// Whether p may be the address of a 16-byte vector.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace csfrn

// for (i over [0, n)) by every thread of the grid, in 64-bit indices: a launch of blocks_for(n) blocks covers
// any n.
#define CSFRN_KERNEL_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)
