"""Autograd pieces shared by the csfrn ops."""

import torch


def _raise_double_backward(name):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"csfrn::{name}: double backward is not supported: the csfrn ops support first "
            "derivatives only (gradients of gradients are not implemented)"
        )

    return backward


def forbid_double_backward(*names):
    """Gives each backward op ``csfrn::<name>`` an autograd formula that raises. Without one, a second
    derivative through a csfrn op (``create_graph=True``, then a gradient of the gradient) would silently come
    out as zero or None."""
    for name in names:
        torch.library.register_autograd(f"csfrn::{name}", _raise_double_backward(name))
