// What a .cu file needs from CUDA beyond ATen, in one switch. Under nvcc: the CUDA headers, and CSFRN_LAUNCH is
// the <<<...>>> launch. Under the host compiler with CSFRN_CUDA_EMU (the test-only emulation, csrc/emu/): the
// same names from emu/cuda_emu.h, where a launch runs every block and thread on the CPU. A .cu file includes this
// instead of the CUDA headers, launches with
//     CSFRN_LAUNCH(grid, block, shared_bytes, stream, kernel<T...>)(args...);
// and registers its kernels with TORCH_LIBRARY_IMPL(CSFRN_CUDA_LIBRARY, CSFRN_CUDA_KEY, m) (csfrn / CUDA, or
// csfrn_emu / CPU under the emulation).
#pragma once

#ifdef CSFRN_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

// The kernel comes last so that template arguments with commas need no parentheses.
#define CSFRN_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define CSFRN_CUDA_LIBRARY csfrn
#define CSFRN_CUDA_KEY CUDA

namespace csfrn {
// The block's dynamic shared memory (the launch's shared_bytes), as T*.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char csfrn_dynamic_smem[];
  return reinterpret_cast<T*>(csfrn_dynamic_smem);
}
}  // namespace csfrn
#endif
