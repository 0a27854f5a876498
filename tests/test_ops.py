"""Every csfrn op on its sample inputs (tests/op_samples.py), on every device (tests/conftest.py: the CPU kernels,
the CUDA kernels on a GPU, and the CUDA kernels emulated on the host): kernel against twin in float64 (forward,
gradients through autograd, the backward op with every output mask) and in lower precision, gradcheck, opcheck of
every forward and backward op, and no double backward.

The ops' own checks (the loop-based ground truth of deformable convolution, the CPU kernels' vector paths, the CUDA
launch plans, layouts beyond the samples', bad input, autocast ...) are in test_class_ops.py, test_deform_conv.py
and test_cuda_emu.py.
"""

import pytest
import torch

from conftest import DISPATCH_DEVICES, device_dtype_params
from op_samples import F64, OPS, check_autograd, check_ops, kernel, output_masks, toggle_mask

OP_NAMES = list(OPS)


def samples(op, device, dtype=F64, requires_grad=True):
    return list(OPS[op].sample_inputs(device, dtype, requires_grad))


@pytest.mark.parametrize("op", OP_NAMES)
def test_kernel_matches_twin(op, device):
    """float64: the outputs, and the gradients through autograd of what requires grad."""
    for sample in samples(op, device):
        check_autograd(sample, device)


@pytest.mark.parametrize("op", OP_NAMES)
def test_backward_op_every_output_mask(op, device):
    """float64: the forward op, and the backward op with every output mask (what is not asked for, and a missing
    mask's gradient, comes back empty); deform_conv2d's samples with their mask dropped or added too."""
    for base in samples(op, device, requires_grad=False):
        for sample in (base, toggle_mask(base)) if op == "deform_conv2d" else (base,):
            check_ops(sample, device, masks=output_masks(sample))


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.float16, torch.bfloat16]))
def test_lower_precision_matches_twin(op, device, dtype):
    """The kernel in dtype against the twin in float64 on the same (rounded) values: the ops (gradients: all,
    every other one, and the sample's), and autograd."""
    for sample in samples(op, device, dtype):
        count = len(sample.info.differentiable)
        masks = [[True] * count, [i % 2 == 0 for i in range(count)], sample.output_mask()]
        check_ops(sample, device, masks=[m for i, m in enumerate(masks) if m not in masks[:i]])
        check_autograd(sample, device)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("device", DISPATCH_DEVICES)
def test_gradcheck(op, device):
    """Every sample; fast mode (a random projection of the Jacobian) where the full one would take long."""
    for sample in samples(op, device):
        leaves = sample.leaves()
        names = list(leaves)

        def f(*tensors):
            return kernel(op, device)(*sample.replace(**dict(zip(names, tensors))).args)

        size = sum(t.numel() for t in leaves.values()) + sum(g.numel() for g in sample.grads)
        assert torch.autograd.gradcheck(f, list(leaves.values()), fast_mode=size > 800), sample


def test_every_op_has_samples():
    """Each op the extension registers (csrc/op_schemas.h) is a forward op here or its backward op, so that
    the opchecks below cover every one."""
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("csfrn::")}
    registered.discard("built_with_cuda")
    assert registered == set(OPS) | {info.backward for info in OPS.values()}


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("device", DISPATCH_DEVICES)
def test_opcheck(op, device):
    for sample in samples(op, device):
        torch.library.opcheck(getattr(torch.ops.csfrn, op).default, sample.args)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("device", DISPATCH_DEVICES)
def test_opcheck_backward(op, device):
    """The backward op on what the forward gives, with the sample's output mask (the backward ops have no
    derivative themselves: see test_no_double_backward)."""
    info = OPS[op]
    for sample in samples(op, device):
        plain = sample.detached()
        outputs = getattr(torch.ops.csfrn, op)(*plain.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        args = info.backward_args(plain.args, outputs, plain.grads, sample.output_mask())
        torch.library.opcheck(getattr(torch.ops.csfrn, info.backward).default, args)


@pytest.mark.parametrize("op", OP_NAMES)
def test_no_double_backward(op):
    """A second derivative through any backward op is an error, never a silent zero."""
    info = OPS[op]
    sample = samples(op, "cpu")[0]
    leaves = list(sample.leaves().values())
    outputs = kernel(op, "cpu")(*sample.args)
    loss = sum((outputs[i] * g).square().sum() for i, g in zip(info.grad_outputs, sample.grads))
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    with pytest.raises(
        NotImplementedError, match=f"csfrn::{info.backward}: double backward is not supported.*first derivatives only"
    ):
        torch.autograd.grad(sum(g.sum() for g in first), leaves, allow_unused=True)
