// Launch sizes and the grid-stride loop of the CUDA kernels (csrc/cuda/*.cu), one definition for all of them.
// Included after cuda/launch.h, so it serves nvcc and the host emulation (csrc/emu/) alike.
#pragma once
#include <algorithm>
#include <cstdint>

namespace csfrn {

// Threads per block of the kernels' launches.
constexpr int kThreads = 256;
// At most this many blocks per launch: the grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Blocks for n items at `threads` per block, at least one, capped at kMaxBlocks.
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks)));
}

}  // namespace csfrn

// for (i over [0, n)) by every thread of the grid, in 64-bit indices: a launch of blocks_for(n) blocks covers
// any n.
#define CSFRN_KERNEL_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)
