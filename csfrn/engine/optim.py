"""The optimizer of ``csfrn train``: ``train.optimizer`` sgd (the paper's recipe) or adamw, parameter groups with
``train.head_lr_mult`` and ``train.layer_decay``; the poly schedule with warm-up (:func:`poly_lambda`) scales
every group's lr alike, whichever optimizer runs.

- sgd: momentum ``train.momentum``, weight decay on every parameter (as the paper and mmseg).
- adamw: torch's AdamW, no weight decay on 1-D parameters (norm weights and biases, timm's layer scales).
- ``train.layer_decay`` (e.g. 0.75, None: off): layer-wise lr decay through timm's ``param_groups_layer_decay``
  (``pip install -e .[timm]``): the backbone's layers (timm's ``group_matcher`` for a ``timm:`` backbone; stem
  then blocks for csfrn's ResNets) get lr * layer_decay ** (depth above them), everything after the backbone
  (head, CSFLM, aux head) the full lr.
"""

import torch

from ..errors import ConfigError
from ..extras import require

OPTIMIZERS = ("sgd", "adamw")


def poly_lambda(train_cfg):
    """lr factor at iteration it: mmseg's poly (with min_lr) times its linear warm-up."""
    base, iters, power, min_lr = train_cfg.lr, train_cfg.iters, train_cfg.power, train_cfg.min_lr
    warmup, ratio = train_cfg.warmup_iters, train_cfg.warmup_ratio

    def factor(it):
        lr = (base - min_lr) * (1 - min(it, iters) / iters) ** power + min_lr
        if it < warmup:
            lr *= 1 - (1 - it / warmup) * (1 - ratio)
        return lr / base

    return factor


def backbone_prefix(model):
    """Prefix of the backbone's parameter names: "backbone." for csfrn's models, the wrapped model's encoder
    for a plugged one (``CSFLMPlug.backbone_prefix``); None when there is none to tell."""
    return getattr(model, "backbone_prefix", "backbone." if hasattr(model, "backbone") else None)


class _LayerGrouped:
    """What timm's ``param_groups_layer_decay`` reads of a model: its parameters and a ``group_matcher``; here
    the backbone's layer ids and one top layer for everything after the backbone."""

    def __init__(self, model, ids):
        self.model, self.ids = model, ids
        self.top = max(ids.values()) + 1

    def named_parameters(self):
        return self.model.named_parameters()

    def group_matcher(self, coarse=False):
        return lambda name: self.ids.get(name, self.top)


def _layer_groups(model, train_cfg, weight_decay, exclude_1d):
    layers = getattr(getattr(model, "backbone", None), "layer_ids", None)
    if layers is None:
        raise ConfigError(
            f"train.layer_decay={train_cfg.layer_decay} needs a backbone with layers (csfrn's "
            f"ResNets or timm:<name>); this {type(model).__name__} has none: set train.layer_decay=null"
        )
    timm_optim = require("timm.optim", "timm", "train.layer_decay")
    ids = {f"backbone.{name}": i for name, i in layers().items()}
    return timm_optim.param_groups_layer_decay(
        _LayerGrouped(model, ids),
        weight_decay=weight_decay,
        weight_decay_exclude_1d=exclude_1d,
        layer_decay=train_cfg.layer_decay,
    )


def param_groups(model, train_cfg):
    """The parameter groups (each with its own "lr", "weight_decay" and "lr_scale", the layer decay factor),
    the group at the base lr first (the one ``csfrn train`` logs)."""
    adamw = train_cfg.optimizer == "adamw"
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    prefix = backbone_prefix(model)
    in_backbone = {id(p) for n, p in named if prefix is not None and n.startswith(prefix)}
    if train_cfg.layer_decay is not None:
        base = _layer_groups(model, train_cfg, train_cfg.weight_decay, adamw)
    elif adamw:
        base = [
            {"params": [p for _, p in named if p.ndim > 1], "weight_decay": train_cfg.weight_decay},
            {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        base = [{"params": [p for _, p in named], "weight_decay": train_cfg.weight_decay}]
    groups = []
    for group in base:
        scale = group.get("lr_scale", 1.0)
        for backbone in (True, False):
            params = [p for p in group["params"] if (id(p) in in_backbone) == backbone]
            if params:
                mult = 1.0 if backbone else train_cfg.head_lr_mult
                groups.append(
                    {
                        "params": params,
                        "lr": train_cfg.lr * scale * mult,
                        "lr_scale": scale,
                        "weight_decay": group["weight_decay"],
                        "backbone": backbone,
                    }
                )
    groups.sort(key=lambda g: (-g["lr_scale"], not g["backbone"], -g["weight_decay"]))
    return groups


def build_optimizer(model, train_cfg):
    """``train.optimizer`` over :func:`param_groups`: SGD (momentum ``train.momentum``) or AdamW, fused on a GPU
    (:func:`fused_on`)."""
    if train_cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"config key 'train.optimizer' is {train_cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
        )
    groups = param_groups(model, train_cfg)
    fused = {"fused": True} if fused_on(p for group in groups for p in group["params"]) else {}
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, **fused)
    return torch.optim.SGD(
        groups, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay, **fused
    )


def fused_on(params):
    """Whether the optimizer runs fused (one kernel per step): when every parameter is on a GPU. Besides its
    speed, a fused optimizer takes the fp16 GradScaler's inf check as a device tensor (``found_inf``), where an
    unfused one reads it on the host before every step: with it a train.amp=fp16 step has no host sync. On the
    CPU the default (unfused) implementation stays."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" for p in params)


def load_optimizer_state(optimizer, state):
    """``optimizer.load_state_dict(state)`` keeping this run's implementation: torch takes every group setting
    from the saved state, so a checkpoint of a GPU run would make a CPU resume fused, and one written before the
    optimizer was fused would leave a GPU resume unfused (and the fp16 step syncing)."""
    implementation = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, implementation):
        group.update(keep)
