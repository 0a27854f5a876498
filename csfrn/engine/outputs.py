"""Outputs checked before any work: a folder where a folder is meant, writable, and never replaced silently.

One policy for every verb that writes: outputs that exist are refused unless ``--overwrite``, which removes the
old ones the verb would have written (:func:`refuse_or_remove`).
"""

import os
import shutil
import tempfile

from ..errors import OutputExistsError, OutputNotWritableError


def _existing_ancestor(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _probe(folder, flag, path):
    """Write (and drop) a nameless temp file in ``folder``: permissions alone do not tell (root, read-only
    mounts)."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise OutputNotWritableError(f"{flag} {path}: cannot write in {folder} ({err.strerror or err})") from None


def writable_dir(path, flag):
    """``path`` is (or can become) a folder this process can write in; errors name ``flag``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputNotWritableError(f"{flag} {path} is a file; expected a folder (or a path to create one at)")
    folder = _existing_ancestor(path)
    if not os.path.isdir(folder):
        raise OutputNotWritableError(f"{flag} {path}: {folder} is a file, so no folder can be made under it")
    _probe(folder, flag, path)
    return path


def writable_file(path, flag):
    """``path`` names a file (not a folder) whose folder this process can write in."""
    if os.path.isdir(path):
        raise OutputNotWritableError(f"{flag} {path} is a folder; expected a file name")
    writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    return path


def refuse_or_remove(paths, overwrite, flag, what):
    """Outputs that exist among ``paths``: an error (without ``overwrite``) naming the first ones, or
    removed (files and folders) so that nothing stale is left among the new ones. Returns the removed paths."""
    found = [p for p in paths if os.path.lexists(p)]
    if found and not overwrite:
        names = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise OutputExistsError(
            f"{flag} already holds {what} ({names}); add --overwrite to replace {'them' if len(found) > 1 else 'it'}"
        )
    for p in found:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    return found
