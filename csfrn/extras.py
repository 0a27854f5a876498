"""Optional dependencies, imported only where they are used: ``require("timm", "timm")`` returns the module, or
raises a one-line :class:`MissingExtraError` that names the extra to install."""

import importlib

from .errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional dependency that is not installed; the message names the extra that installs it."""


def require(module, extra, purpose=None):
    """``importlib.import_module(module)``, or a :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingExtraError(
            f"{module} is not installed{why}: install csfrn's '{extra}' extra, pip install -e .[{extra}] ({err})"
        ) from None
