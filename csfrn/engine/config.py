"""Configuration: a tree of dataclasses (model / data / train / eval) filled from YAML and ``key=value`` overrides.

Unknown keys are errors that name the key; values are YAML-parsed (``--set train.lr=0.02``,
``--set data.crop_size=[512,512]``).
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml


@dataclass
class ModelConfig:
    """Keyword arguments of :func:`csfrn.models.build_model`."""
    head: str = "deeplabv3plus"
    num_classes: int = 19
    backbone: str = "resnet50c"
    csflm: bool = True
    fusion: str = "aam"
    embed_dim: int = 32
    margins: bool = True
    aux: bool = True
    output_stride: int = 8
    multi_grid: bool = False
    pretrained: Optional[str] = None
    width: int = 64
    blocks: Optional[List[int]] = None
    channels: int = 512
    aux_channels: int = 256
    ohem: bool = False
    thresh: float = 0.7
    min_kept: int = 100000
    loss_weights: Optional[Dict[str, float]] = None
    binary: str = "lovasz"        # CAC binary loss: lovasz | bce
    delta: float = 10.0


@dataclass
class DataConfig:
    dataset: str = "cityscapes"   # cityscapes | ade20k | coco_stuff | pascal_context | folder | synthetic
    root: Optional[str] = "data/cityscapes"
    train_split: str = "train"
    val_split: str = "val"
    # Training pipeline (mmseg style): optional rescale to base_size [long, short] keeping the aspect ratio,
    # then a random scale in scale_range, a random crop, a flip and photometric jitter.
    base_size: Optional[List[int]] = None
    crop_size: List[int] = field(default_factory=lambda: [769, 769])
    scale_range: List[float] = field(default_factory=lambda: [0.75, 2.0])
    flip: bool = True
    photometric: bool = True
    batch_size: int = 8           # global batch, split evenly over the processes
    num_workers: int = 2
    # Synthetic set only (no files): image side, number of train images, number of val images.
    size: int = 64
    length: int = 256
    val_length: int = 32


@dataclass
class TrainConfig:
    iters: int = 40000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    head_lr_mult: float = 1.0     # lr multiplier for every parameter outside the backbone
    power: float = 0.9            # poly decay (1 - it / iters) ** power
    min_lr: float = 1e-4
    warmup_iters: int = 0         # linear warm-up from warmup_ratio * lr
    warmup_ratio: float = 1e-6
    amp: str = "none"             # none | bf16 | fp16 (CUDA only)
    sync_bn: bool = True
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    threads: Optional[int] = None  # torch intra-op CPU threads (None: torch's default)
    work_dir: str = "runs/default"
    resume: Optional[str] = None  # a checkpoint path, or "auto" for work_dir/last.pth when it exists
    log_interval: int = 50
    eval_interval: int = 4000     # 0: evaluate only at the end
    checkpoint_interval: int = 1000
    keep_checkpoints: bool = False  # also keep iter_XXXXXX.pth at every checkpoint interval
    tensorboard: bool = True      # used only when the tensorboard package is installed
    progress: bool = True


@dataclass
class EvalConfig:
    mode: str = "slide"           # slide | whole
    crop_size: List[int] = field(default_factory=lambda: [769, 769])
    stride: List[int] = field(default_factory=lambda: [513, 513])
    crop_batch: int = 4           # crops per forward pass in sliding-window inference (bounds memory)
    multi_scale: bool = False
    scales: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.25, 1.5, 1.75])
    flip: bool = False
    max_images: Optional[int] = None  # evaluate only the first images (quick checks during training)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


def _check_value(key, default_field, value):
    """Loose type check against the field's annotation: catches ``train.iters=abc`` and ``flip=3``."""
    ann = str(default_field.type)
    if value is None:
        if "Optional" not in ann:
            raise ValueError(f"config key '{key}' may not be null")
        return value
    if "Dict" in ann:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' expects a mapping, got {value!r}")
        return value
    if "List" in ann:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' expects a list, got {value!r}")
        return list(value)
    if ann.endswith("bool") or ann == "<class 'bool'>":
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' expects true/false, got {value!r}")
    elif "float" in ann:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    elif "int" in ann:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}' expects an integer, got {value!r}")
    elif "str" in ann and not isinstance(value, str):
        raise ValueError(f"config key '{key}' expects a string, got {value!r}")
    return value


def _apply(section_obj, values, prefix):
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise KeyError(f"unknown config key '{full}' (known in '{prefix or 'config'}': {', '.join(fields)})")
        current = getattr(section_obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{full}' is a section and needs a mapping, got {value!r}")
            _apply(current, value, full)
        else:
            setattr(section_obj, key, _check_value(full, fields[key], value))


def _set_nested(tree, dotted, value):
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(pairs):
    """``["train.lr=0.02", "data.flip=false"]`` -> a nested dict with YAML-parsed values."""
    tree = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"override '{pair}' is not of the form key=value")
        key, raw = pair.split("=", 1)
        _set_nested(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def from_dict(values):
    """A :class:`Config` from a nested dict (e.g. the one stored in a checkpoint)."""
    cfg = Config()
    _apply(cfg, values or {}, "")
    return cfg


def load_config(path=None, overrides=None, base=None):
    """Defaults (or the nested dict ``base``, e.g. a checkpoint's config), then the YAML file at ``path`` (when
    given), then the ``key=value`` overrides."""
    cfg = from_dict(base) if base is not None else Config()
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping with sections model/data/train/eval")
        _apply(cfg, values, "")
    _apply(cfg, parse_overrides(overrides), "")
    return cfg
