"""Checkpoints and the one place models are built: atomic checkpoint files that load without executing code
(``torch.load(weights_only=True)``), a model from a config (:func:`build_model_from_config`) and a model from a
checkpoint (:func:`load_model_from_checkpoint`, which every verb and the library use)."""

import dataclasses
import os
import pickle
import random
import re
import tempfile

import numpy as np
import torch

from ..errors import UserError
from ..models import build_external, build_model
from ..models.external import EXTERNAL_MODEL_KEYS
from .checksum import KEY as CHECKSUM_KEY
from .checksum import checksum_mismatch, payload_checksum
from .config import from_dict, load_config
from .distributed import resolve_device


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and says what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file holds objects whose loading would run code; it is refused without running any."""


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, flushed and fsynced, then
    ``os.replace``d over ``path`` and the directory fsynced. A crash leaves the old file or the new one, never
    a torn one, and no temp file is left behind on error. A dict ``state`` gets the checksum of its tensors
    (``"checksum"``, verified by :func:`load_checkpoint`). The file's mode is 0666 less the umask (0644 with the
    usual 022), as ``open`` would give it: teammates can read shared runs."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if isinstance(state, dict):
        state = {**state, CHECKSUM_KEY: payload_checksum(state)}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files(directory):
    """Delete temp files that a process killed inside :func:`save_checkpoint` left in ``directory``."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(".tmp") and ".pth." in name:
            os.unlink(os.path.join(directory, name))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by :func:`save_checkpoint`; only tensors and plain containers are accepted.

    Errors (:class:`CheckpointError`, a ValueError) name the file and say what is wrong: missing (also a
    FileNotFoundError), empty, truncated or not a PyTorch file, holding objects whose loading would run code
    (also a pickle.UnpicklingError), tensors that no longer match the checksum stored with them."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a checkpoint file" if os.path.isdir(path) else "not found"
        raise CheckpointNotFoundError(f"checkpoint {what}: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): the run that wrote it was probably killed, or the copy failed"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:
            raise UnsafeCheckpointError(
                f"checkpoint {path} is refused: it holds a Python object ({found.group(1)}) that loading would "
                f"have to run; csfrn checkpoints hold only tensors and plain containers"
            ) from None
        problem = err
    except Exception as err:  # torch.load's errors on damaged files are OSError, EOFError, KeyError, RuntimeError
        problem = err
    else:
        mismatch = checksum_mismatch(state)
        if mismatch:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the checksum of its tensors does not match the one "
                f"stored at saving (sha256 {mismatch[0][:12]}..., now {mismatch[1][:12]}...); "
                f"copy it again or use another checkpoint"
            )
        return state
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    detail = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
    what = "is truncated or corrupt" if zipped else "is not a PyTorch checkpoint file"
    raise CheckpointError(f"checkpoint {path} {what} ({size} bytes; torch.load: {detail})") from None


def require_keys(state, path, keys, purpose):
    """Check that ``state`` (what :func:`load_checkpoint` returned) is a csfrn checkpoint holding ``keys``;
    the error says what the file is instead and how to use it."""
    path = os.fspath(path)
    if isinstance(state, dict) and all(k in state for k in keys):
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} is a bare state_dict ({len(state)} tensors), not a csfrn checkpoint "
            f"(no config is stored with it): build the model with csfrn.models.build_model(...) and "
            f"call model.load_state_dict(torch.load(path, weights_only=True)), or give an ImageNet "
            f"backbone file as model.pretrained"
        )
    if isinstance(state, dict) and "state_dict" in state and "model" not in state:
        raise CheckpointError(
            f"checkpoint {path} is an mmcv / mmsegmentation checkpoint, not a csfrn checkpoint; "
            f"an ImageNet backbone file of that kind goes into model.pretrained"
        )
    if isinstance(state, dict) and "model" in state and "config" in state:
        missing = [k for k in keys if k not in state]
        raise CheckpointError(
            f"checkpoint {path} holds model weights only (no {', '.join(missing)}), so it cannot be "
            f"{purpose}; use work_dir/last.pth or an iter_*.pth"
        )
    found = f"keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else f"a {type(state).__name__}"
    raise CheckpointError(
        f"checkpoint {path} is not a csfrn checkpoint (expected keys {', '.join(keys)}; found {found})"
    )


def checkpoint_num_classes(state):
    """The class count a csfrn checkpoint was trained for (from its config)."""
    return int(state["config"].get("model", {}).get("num_classes", 19))


def check_num_classes(state, path, num_classes):
    """A clear error when the configured class count is not the checkpoint's."""
    have = checkpoint_num_classes(state)
    if have != num_classes:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} has {have} classes, the config asks for {num_classes} (model.num_classes)"
        )


# RNG states are kept as tensors / plain lists so that weights_only loading accepts them.
def rng_state():
    """The torch, CUDA, numpy and Python RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model_from_config(model_cfg, load_pretrained=True):
    """:func:`csfrn.models.build_model` with the keyword arguments of a ModelConfig. ``load_pretrained=False``
    leaves ``model.pretrained`` unread: a model that a checkpoint is loaded into needs no ImageNet file."""
    kwargs = dataclasses.asdict(model_cfg)
    if not load_pretrained:
        kwargs["pretrained"] = None
    external = kwargs.pop("external")
    if external is not None:
        return build_external(external, **{k: kwargs[k] for k in EXTERNAL_MODEL_KEYS})
    if kwargs["blocks"] is not None:
        kwargs["blocks"] = tuple(kwargs["blocks"])
    return build_model(**kwargs)


# ModelConfig keys that change no tensor of the state_dict.
_LOSS_ONLY = ("pretrained", "ohem", "thresh", "min_kept", "loss_weights", "binary", "delta", "fusion_init")


def load_model_state(model, weights, path, model_cfg, saved_config):
    """``model.load_state_dict(weights)``; a mismatch is an error naming the checkpoint and the model keys in
    which the config differs from the checkpoint's own."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        saved = from_dict({"model": (saved_config or {}).get("model", {})}).model
        diffs = [
            f"{k}: checkpoint {getattr(saved, k)!r}, config {getattr(model_cfg, k)!r}"
            for k in dataclasses.asdict(model_cfg)
            if k not in _LOSS_ONLY and getattr(saved, k) != getattr(model_cfg, k)
        ]
        lines = str(err).splitlines()
        detail = "; ".join(diffs) if diffs else (lines[1].strip() if len(lines) > 1 else lines[0])
        if (
            not diffs
            and not model_cfg.external
            and weights
            and all(k.startswith(("model.", "csflm.")) for k in weights)
        ):
            detail = (
                "it holds a model plugged with add_csflm (model.* and csflm.* weights) but its config has no "
                "model.external to rebuild it; set model.external (library, name, kwargs, tap) to that model's "
                "recipe (--config with it), or train with it set"
            )
        raise CheckpointError(f"checkpoint {path} does not fit the configured model ({detail})") from None


def checkpoint_config(state, config=None, overrides=None):
    """The Config of a checkpoint's model: the checkpoint's own config, then the YAML file ``config`` layered
    on top (a file with only an ``eval:`` section is fine), then ``key=value`` overrides. The training
    machine's ``train.device`` is not inherited (``auto``, unless the file or the overrides say otherwise)."""
    base = dict(state["config"])
    base["train"] = {**base.get("train", {}), "device": "auto"}
    return load_config(config, overrides, base=base)


def load_model_from_checkpoint(path, cfg=None, device="cpu", config=None, overrides=None, state=None):
    """A model in eval mode from best.pth / last.pth / iter_*.pth, and its Config. Returns (model, Config).

    The config is the checkpoint's own with the YAML file ``config`` and the ``overrides`` layered on top
    (:func:`checkpoint_config`), or ``cfg`` when given. ``device=None`` puts the model where the config's
    ``train.device`` says (``auto``: CUDA when there is one). ``model.pretrained`` is never read: the weights come
    from the checkpoint, and the ImageNet file may be gone. Errors name the file: missing, empty, truncated,
    not a csfrn checkpoint (a bare state_dict), a class count other than the config's, another architecture.
    ``state``: what :func:`load_checkpoint` gave for ``path``, when the caller has it already.
    """
    state = require_keys(load_checkpoint(path) if state is None else state, path, ("model", "config"), "loaded")
    if cfg is None:
        cfg = checkpoint_config(state, config, overrides)
    check_num_classes(state, path, cfg.model.num_classes)
    model = build_model_from_config(cfg.model, load_pretrained=False)
    load_model_state(model, state["model"], path, cfg.model, state["config"])
    if device is None:
        device = resolve_device(cfg.train.device)
    return model.to(device).eval(), cfg
