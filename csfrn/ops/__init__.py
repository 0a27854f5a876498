"""csfrn's fused C++/CUDA ops (``torch.ops.csfrn.*``) as Python functions, and their reference twins.

    class_avg_pool(features, labels, num_classes, ignore_index=255, validate=True) -> (means, counts)
    check_labels(labels, num_classes, ignore_index=255)          (class_avg_pool's label check, alone)
    center_distance(embeddings, centers, margins, delta=10.0) -> phi
    deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None) -> out
    dual_deform_conv2d(x, y, offset, weight_x, weight_y, bias_x=None, bias_y=None, stride=1, padding=0,
                       dilation=1, mask=None) -> (out_x, out_y)

``use_reference()`` routes these functions to ``csfrn.ops.reference``.
"""

import torch

try:
    from .. import _C  # noqa: F401  (loads the shared library, which registers torch.ops.csfrn.*)
except ImportError as err:
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    raise ImportError(
        f"csfrn's compiled extension csfrn._C could not be loaded ({err}). It is built when the package is "
        f"installed: run `make setup` in {_root} (or `pip install --no-build-isolation -e .` there, with torch "
        f"already installed); after changing csrc/ or torch, run it again."
    ) from err
from . import reference  # noqa: F401
from ._switch import use_reference
from .class_ops import center_distance, check_labels, class_avg_pool
from .deform_conv import deform_conv2d, dual_deform_conv2d


def built_with_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(torch.ops.csfrn.built_with_cuda())


__all__ = [
    "built_with_cuda",
    "use_reference",
    "reference",
    "class_avg_pool",
    "check_labels",
    "center_distance",
    "deform_conv2d",
    "dual_deform_conv2d",
]
