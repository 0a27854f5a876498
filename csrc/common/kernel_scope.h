// What every launcher (CPU and CUDA) holds while it runs: its own ATen calls (matmuls, sums, casts) are part of
// the kernel, so they record no autograd history and autocast does not recast them. Without the second guard a
// backward run inside torch.autocast would hand half-precision matmul results to a float32 kernel (an error) or
// silently compute float32 gradients in half precision. Both guards exist with these names in torch 2.11 too.
#pragma once
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace csfrn {

struct KernelScope {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

}  // namespace csfrn
