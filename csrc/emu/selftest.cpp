// Kernels that test the CUDA emulation itself (tests/test_cuda_emu.py::test_emulation_*): the launch limits, the
// barrier and shared memory, the warp intrinsics, and the misuse the emulation must report. Written as CUDA, like
// csrc/cuda/*.cu; registered as csfrn_emu::selftest_*.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/launch.h"

namespace csfrn {
namespace {

// Counts the threads that ran and checks the built-in variables of each.
__global__ void count_kernel(int64_t* count, int64_t* bad) {
  const bool ok = threadIdx.x < blockDim.x && threadIdx.y < blockDim.y && threadIdx.z < blockDim.z &&
                  blockIdx.x < gridDim.x && blockIdx.y < gridDim.y && blockIdx.z < gridDim.z;
  atomicAdd(reinterpret_cast<unsigned long long*>(count), 1ull);
  if (!ok) atomicAdd(reinterpret_cast<unsigned long long*>(bad), 1ull);
}

int64_t selftest_launch(int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz, int64_t smem) {
  int64_t count = 0, bad = 0;
  CSFRN_LAUNCH(dim3(gx, gy, gz), dim3(bx, by, bz), smem, at::cuda::getCurrentCUDAStream(), count_kernel)(&count, &bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(bad == 0, bad, " threads saw built-in variables out of range");
  return count;
}

// Per block: a shared-memory tree sum with __syncthreads (static shared memory), the same sum by warp shuffles
// (__shfl_down_sync, then one warp over the warp sums in dynamic shared memory), and a ballot of the positive
// values. out[block] = (tree sum, shuffle sum, positives by ballot); blockDim.x a power of two <= 1024.
template <typename T>
__global__ void block_sum_kernel(const T* x, int64_t n, T* out) {
  __shared__ T tree[1024];
  T* warp_sums = dynamic_shared<T>();
  const int t = threadIdx.x, lane = t % warpSize, warp = t / warpSize;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + t;
  const T v = i < n ? x[i] : T(0);
  tree[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (t < s) tree[t] += tree[t + s];
    __syncthreads();
  }
  T w = v;
  for (int d = 16; d > 0; d /= 2) w += __shfl_down_sync(0xffffffffu, w, d);
  const unsigned int positive = __ballot_sync(0xffffffffu, v > T(0));
  if (lane == 0) warp_sums[warp] = w;
  if (lane == 0) warp_sums[32 + warp] = T(__popc(positive));
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / warpSize;
    T s = lane < warps ? warp_sums[lane] : T(0), c = lane < warps ? warp_sums[32 + lane] : T(0);
    for (int d = 1; d < 32; d *= 2) {
      s += __shfl_xor_sync(0xffffffffu, s, d);
      c += __shfl_xor_sync(0xffffffffu, c, d);
    }
    if (lane == 0) {
      out[blockIdx.x * 3] = tree[0];
      out[blockIdx.x * 3 + 1] = s;
      out[blockIdx.x * 3 + 2] = c;
    }
  }
}

at::Tensor selftest_block_sum(const at::Tensor& x, int64_t threads) {
  const at::Tensor xc = x.contiguous();
  const int64_t blocks = std::max<int64_t>(1, (xc.numel() + threads - 1) / threads);
  at::Tensor out = at::zeros({blocks, 3}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "selftest_block_sum", [&] {
    CSFRN_LAUNCH(blocks, threads, 64 * sizeof(scalar_t), at::cuda::getCurrentCUDAStream(), block_sum_kernel<scalar_t>)(
        xc.const_data_ptr<scalar_t>(), xc.numel(), out.data_ptr<scalar_t>());
  });
  return out;
}

// Misuse the emulation must report: case 0, a thread leaves before a barrier the others wait at; 1, a shuffle
// whose mask leaves out the caller; 2, lanes meet with different masks; 3, a lane of the mask never arrives;
// 4, a shuffle reads a lane outside the mask.
__global__ void misuse_kernel(int64_t what, int* out) {
  const int t = threadIdx.x;
  switch (what) {
    case 0:
      if (t == 5) return;
      __syncthreads();
      break;
    case 1:
      out[t] = __shfl_sync(0x1u, t, 0);
      break;
    case 2:
      out[t] = __shfl_sync(t < 16 ? 0xffffffffu : 0xffff0000u, t, 0);
      break;
    case 3:
      if (t != 3) out[t] = __shfl_sync(0xffffffffu, t, 0);
      break;
    case 4:
      if (t < 16) out[t] = __shfl_sync(0xffffu, t, 20);
      break;
  }
}

void selftest_misuse(int64_t what) {
  int out[64] = {};
  CSFRN_LAUNCH(1, 64, 0, at::cuda::getCurrentCUDAStream(), misuse_kernel)(what, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(csfrn_emu, m) {
  m.def("selftest_launch(int gx, int gy, int gz, int bx, int by, int bz, int smem) -> int", &selftest_launch);
  m.def("selftest_block_sum(Tensor x, int threads) -> Tensor", &selftest_block_sum);
  m.def("selftest_misuse(int what) -> ()", &selftest_misuse);
}

}  // namespace csfrn
