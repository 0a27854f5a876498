"""CSFRN: Consistent-Separable Feature Representation for Semantic Segmentation (AAAI 2021)."""

import os
import sys

__version__ = "0.1.0"

# The command line (`python -m csfrn.<module>`, the `csfrn` script) imports the library verb by verb, so that
# `csfrn --help` does not pay for importing torch. Everywhere else `import csfrn` registers torch.ops.csfrn.*
# (the extension) and their fake kernels at once, so that a .pt2 written by `csfrn export`
# (csfrn.deploy.export_program) loads with torch.export.load after `import csfrn`.
COMMAND_LINE = sys.argv[:1] == ["-m"] or os.path.basename(sys.argv[0] if sys.argv else "") == "csfrn"
if not COMMAND_LINE:
    from . import ops  # noqa: E402,F401
