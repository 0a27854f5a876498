"""The switch that routes the public csfrn.ops functions to their pure-PyTorch reference twins."""

from typing import Iterator

import contextlib

_reference_depth = 0


def reference_enabled() -> bool:
    return _reference_depth > 0


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Inside this block every public ``csfrn.ops`` function runs its reference twin from
    ``csfrn.ops.reference`` (plain PyTorch, slow, obviously correct). Used by benchmarks and for debugging."""
    global _reference_depth
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1
