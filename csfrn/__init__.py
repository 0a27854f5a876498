"""CSFRN: Consistent-Separable Feature Representation for Semantic Segmentation (AAAI 2021)."""
__version__ = "0.1.0"

# Registers torch.ops.csfrn.* (the extension) and their fake kernels on `import csfrn`, so that a .pt2 written by
# `csfrn export` (csfrn.deploy.export_program) loads with torch.export.load after `import csfrn`.
from . import ops  # noqa: E402,F401
