"""A checksum of a checkpoint's tensor payload: every tensor's key path, dtype, shape and bytes, in a fixed
order. :func:`csfrn.engine.checkpoint.save_checkpoint` stores it under ``"checksum"`` and
:func:`csfrn.engine.checkpoint.load_checkpoint` verifies it, so a flipped byte in the weights is an error naming
the file instead of a model that silently scores less."""

import hashlib

import torch

KEY = "checksum"
ALGORITHM = "sha256"


def _update(digest, path, value):
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _update(digest, f"{path}/{key}", value[key])
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _update(digest, f"{path}[{i}]", item)


def payload_checksum(state):
    """``{"algorithm": "sha256", "value": hex}`` of the tensors in ``state`` (its own "checksum" left out)."""
    digest = hashlib.new(ALGORITHM)
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k != KEY}
    _update(digest, "", state)
    return {"algorithm": ALGORITHM, "value": digest.hexdigest()}


def checksum_mismatch(state):
    """None when ``state`` carries no checksum or a matching one; else (stored, computed) hex values."""
    if not isinstance(state, dict) or not isinstance(state.get(KEY), dict):
        return None
    stored = state[KEY]
    computed = payload_checksum(state)["value"] if stored.get("algorithm") == ALGORITHM else None
    return None if computed == stored.get("value") else (stored.get("value"), computed)
