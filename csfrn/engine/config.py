"""Configuration: a tree of dataclasses (model / data / train / eval) filled from YAML and ``key=value`` overrides.

Unknown keys are errors that name the key; values are YAML-parsed (``--set train.lr=0.02``,
``--set data.crop_size=[512,512]``). A YAML file may start from others, as mmsegmentation's configs do::

    _base_: [../_base_/datasets/cityscapes_769.yaml, ../_base_/schedules/40k.yaml]
    model:
      head: fcn

The ``_base_`` files (paths relative to the file naming them; they may have bases of their own) are applied
in order, then the file itself, then ``--set``: a later value replaces an earlier one key by key, and a value
that is itself a mapping of the config (``model.loss_weights``) is replaced whole.
"""

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from ..configs import find_config
from ..errors import ConfigError, ConfigKeyError, MissingPathError


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
    binary: str = "lovasz"  # CAC binary loss: lovasz | bce
    delta: float = 10.0
    fusion_init: str = "identity"  # identity (F = ReLU(BN(A)) at step 0) | random (nn.Conv2d's default)
    csflm_supervision: str = "cac"  # cac (the paper's) | mask (Table 4's "+Aux Loss": Lovasz-softmax on B's class mask)
    # Another library's model with CSFLM plugged in instead of a CSFRN: {library, name, kwargs, tap, channels, fusion,
    # outputs} (csfrn.models.build_external); the keys above then apply as far as they can (num_classes, embed_dim, ...)
    external: Optional[Dict[str, Any]] = None


@dataclass
class DataConfig:
    dataset: str = "cityscapes"  # cityscapes | ade20k | coco_stuff | pascal_context | folder | synthetic
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
    batch_size: int = 8  # global batch, split evenly over the processes
    num_workers: int = 2
    binary_255: bool = False  # folder dataset with 2 classes: masks of 0 / 255 read 255 as class 1 (not ignore)
    prefetch_factor: int = 2  # batches queued per worker (with num_workers > 0)
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
    head_lr_mult: float = 1.0  # lr multiplier for every parameter outside the backbone
    optimizer: str = "sgd"  # sgd | adamw (no weight decay on norms and biases); see csfrn/engine/optim.py
    layer_decay: Optional[float] = None  # layer-wise lr decay of the backbone (e.g. 0.75; needs timm), null: off
    power: float = 0.9  # poly decay (1 - it / iters) ** power
    min_lr: float = 1e-4
    warmup_iters: int = 0  # linear warm-up from warmup_ratio * lr
    warmup_ratio: float = 1e-6
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    sync_bn: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch intra-op CPU threads (None: torch's default)
    work_dir: str = "runs/default"
    resume: Optional[str] = None  # a checkpoint path, or "auto" for work_dir/last.pth when it exists
    log_interval: int = 50
    eval_interval: int = 4000  # 0: evaluate only at the end
    checkpoint_interval: int = 1000
    keep_checkpoints: bool = False  # also keep iter_XXXXXX.pth at every checkpoint interval
    tensorboard: bool = False  # also log to work_dir/tb (needs the tensorboard package: an error without it)
    progress: bool = True
    ema: Optional[float] = None  # decay of an exponential moving average of the weights (e.g. 0.999): null = off;
    #                               evaluated beside the raw weights, the best kept as best_ema.pth
    accumulate: int = 1  # micro-batches per optimizer step; data.batch_size stays the global batch
    clip_grad: Optional[float] = None  # clip the gradients' global L2 norm to this (null: no clipping)
    channels_last: Optional[bool] = None  # model and images in channels_last; null: true on CUDA, false on CPU
    compile: Union[bool, str] = False  # torch.compile the model and losses: false | true | a mode name
    dist_timeout: float = 600  # seconds a process waits for the others in a collective before the job ends


@dataclass
class EvalConfig:
    mode: str = "slide"  # slide | whole
    crop_size: List[int] = field(default_factory=lambda: [769, 769])
    stride: List[int] = field(default_factory=lambda: [513, 513])
    crop_batch: int = 4  # crops per forward pass in sliding-window inference (bounds memory)
    multi_scale: bool = False
    scales: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.25, 1.5, 1.75])
    flip: bool = False
    max_images: Optional[int] = None  # evaluate only the first images (quick checks during training)
    compile: Union[bool, str] = False  # torch.compile the model for evaluation (train.compile does not)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _scalar(key, kind, value):
    """``value`` as ``kind`` (bool, int, float or str), or a ConfigError naming ``key``. PyYAML (YAML 1.1)
    reads ``1e-3`` and ``4e4`` as strings: numbers written that way are accepted for number fields."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
        return value
    if kind in (int, float):
        number = value
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            number = float(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"config key '{key}' expects {what}, got {value!r}")
        if kind is float:
            return float(number)
        if isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
            number = int(number)
        return number
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    return value


def _check_value(key, default_field, value):
    """Type check against the field's annotation: catches ``train.iters=abc``, ``flip=3`` and
    ``crop_size=[64, x]``; returns the value converted (numbers written as ``1e-3`` become floats)."""
    ann = default_field.type
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Union and type(None) in args:  # Optional[X]
        if value is None:
            return None
        ann = next(a for a in args if a is not type(None))
    elif value is None:
        raise ConfigError(f"config key '{key}' may not be null")
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union:  # Union[bool, str]: true / false or a name (checked by validate)
        if not isinstance(value, args):
            raise ConfigError(f"config key '{key}' expects true, false or a name, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return {k: _scalar(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_scalar(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    return _scalar(key, ann, value)


def _apply(section_obj, values, prefix):
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigKeyError(f"unknown config key '{full}' (known in '{prefix or 'config'}': {', '.join(fields)})")
        current = getattr(section_obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section and needs a mapping, got {value!r}")
            _apply(current, value, full)
        else:
            setattr(section_obj, key, _check_value(full, fields[key], value))


def _set_nested(tree, dotted, value, pair):
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--set {pair}: '{dotted}' is not a key (expected section.key=value, e.g. train.lr=0.02)")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {pair}: '{part}' is not a section")
    node[parts[-1]] = value


def _yaml_problem(err, line=True):
    """``line L, column C: problem`` from a PyYAML error (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).split("\n")[0]
    if mark is None:
        return problem
    return (f"line {mark.line + 1}, " if line else "") + f"column {mark.column + 1}: {problem}"


def parse_overrides(pairs):
    """``["train.lr=0.02", "data.flip=false"]`` -> a nested dict with YAML-parsed values."""
    tree = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair}: not of the form key=value (e.g. train.lr=0.02)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {pair}: malformed value for '{key.strip()}' (YAML error at {_yaml_problem(err, line=False)}); "
                f"expected a YAML value such as 0.02, true, some_name or [64, 64]"
            ) from None
        _set_nested(tree, key.strip(), value, pair)
    return tree


def from_dict(values):
    """A :class:`Config` from a nested dict (e.g. the one stored in a checkpoint)."""
    cfg = Config()
    _apply(cfg, values or {}, "")
    return cfg


def _file_error(path, err):
    """The same error type with the config file named in front."""
    return type(err)(f"{path}: {err}")


BASE_KEY = "_base_"


def config_files(path, _named_by=None, _chain=()):
    """``[(file, values), ...]``: the ``_base_`` files of the YAML file at ``path`` (a file, or a shipped config's
    name: :func:`csfrn.configs.find_config`) recursively, in order, then the file itself, each with its mapping
    (``_base_`` taken out). Missing files, YAML errors, a ``_base_`` that is not a path or a list of paths and
    files that are their own bases are errors naming the file."""
    whose = f" (a {BASE_KEY} of {_named_by})" if _named_by else ""
    if _named_by is None:
        path = find_config(path)  # a file, or a shipped config's name
    elif not os.path.isfile(path):
        raise MissingPathError(f"config file not found: {path}{whose} (expected a YAML file)")
    real = os.path.realpath(path)
    if real in _chain:
        raise ConfigError(
            f"{_named_by}: {BASE_KEY} includes {path}, which includes this file again "
            f"(expected {BASE_KEY} files that do not include each other in a cycle)"
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, text.index("\x00"), text.index("\x00") + 1, "NUL byte")
    except UnicodeDecodeError as err:  # a checkpoint or an image given as the config
        raise ConfigError(
            f"{path}: not a YAML text file (binary content at byte {err.start}); expected a YAML "
            f"config (a checkpoint goes to --checkpoint / --resume)"
        ) from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error at {_yaml_problem(err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: expected a mapping with sections model / data / train / eval, got {type(values).__name__}"
        )
    bases = values.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{path}: '{BASE_KEY}' expects a file path or a list of file paths (relative to this file), got {bases!r}"
        )
    files = []
    for name in bases:
        files += config_files(os.path.join(os.path.dirname(path), name), path, _chain + (real,))
    return files + [(path, values)]


def load_config(path=None, overrides=None, base=None):
    """Defaults (or the nested dict ``base``, e.g. a checkpoint's config), then the YAML file at ``path`` (when
    given: its ``_base_`` files first, see the module doc), then the ``key=value`` overrides; the result is
    checked by :func:`validate`. Mistakes raise a :class:`csfrn.errors.UserError` naming the file or key and
    what was expected."""
    cfg = from_dict(base) if base is not None else Config()
    for file, values in config_files(path) if path is not None else []:
        try:
            _apply(cfg, values, "")
        except (ConfigError, ConfigKeyError) as err:
            raise _file_error(file, err) from None
    _apply(cfg, parse_overrides(overrides), "")
    validate(cfg)
    return cfg


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(map(str, choices))}")


def _at_least(key, value, low, what="an integer"):
    if value < low:
        raise ConfigError(f"config key '{key}' must be {what} >= {low}, got {value}")


def _positive(key, value, what="a number"):
    if not value > 0:
        raise ConfigError(f"config key '{key}' must be {what} > 0, got {value}")


def _size(key, value, pair):
    """Two positive integers [height, width], or null."""
    if value is not None:
        pair(f"config key '{key}'", value, minimum=1, error=ConfigError, expected="two integers [height, width]")


def validate(cfg):
    """Check every value of a :class:`Config` that can be checked without touching files: names against their
    choices, counts and sizes against their ranges. Raises :class:`csfrn.errors.ConfigError` naming the key and
    what was expected. (Files are checked where they are opened: dataset folders by the datasets, checkpoints
    by the loader.)"""
    # here, not at the top: the config tree loads without torch (csfrn VERB --help builds on it)
    from ..data import DATASETS
    from ..losses.cac import BINARY_LOSSES
    from ..losses.eq7 import DEFAULT_LOSS_WEIGHTS, SUPERVISIONS
    from ..models.backbones import ARCHS, is_timm
    from ..models.builder import ASPP_DILATIONS
    from ..models.external import check_external
    from ..models.heads import HEADS
    from ..nn.csflm import FUSION_INITS, FUSIONS
    from ..ops._checks import pair
    from .inference import INFERENCE_MODES
    from .optim import OPTIMIZERS
    from .speed import check_compile_setting
    from .step import AMP_DTYPES

    m, d, t, e = cfg.model, cfg.data, cfg.train, cfg.eval
    if m.external is not None:
        check_external(m.external)
    _choice("model.head", m.head, sorted(HEADS))
    if not (is_timm(m.backbone) and len(m.backbone) > len("timm:")):
        _choice("model.backbone", m.backbone, sorted(ARCHS) + ["timm:<name>"])
    _choice("model.fusion", m.fusion, FUSIONS)
    _choice("model.binary", m.binary, BINARY_LOSSES)
    _choice("model.csflm_supervision", m.csflm_supervision, SUPERVISIONS)
    _choice("model.fusion_init", m.fusion_init, FUSION_INITS)
    _choice("model.output_stride", m.output_stride, sorted(ASPP_DILATIONS))
    _at_least("model.num_classes", m.num_classes, 1)
    for key in ("embed_dim", "width", "channels", "aux_channels", "min_kept"):
        _at_least(f"model.{key}", getattr(m, key), 1)
    if m.blocks is not None and (len(m.blocks) != 4 or min(m.blocks) < 1):
        raise ConfigError(
            f"config key 'model.blocks' expects four block counts >= 1 (one per ResNet stage) or null, got {m.blocks}"
        )
    if not 0 < m.thresh <= 1:
        raise ConfigError(f"config key 'model.thresh' must lie in (0, 1], got {m.thresh}")
    _positive("model.delta", m.delta)
    unknown = sorted(set(m.loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS))
    if unknown:
        raise ConfigError(
            f"config key 'model.loss_weights' has unknown keys {unknown}; expected some of "
            f"{', '.join(DEFAULT_LOSS_WEIGHTS)}"
        )

    _choice("data.dataset", d.dataset, list(DATASETS))
    if d.dataset != "synthetic" and not d.root:
        raise ConfigError(f"config key 'data.root' is empty; dataset '{d.dataset}' needs its folder")
    _size("data.crop_size", d.crop_size, pair)
    _size("data.base_size", d.base_size, pair)
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError(
            f"config key 'data.scale_range' expects [low, high] with 0 < low <= high, got {d.scale_range}"
        )
    _at_least("data.batch_size", d.batch_size, 1)
    _at_least("data.num_workers", d.num_workers, 0)
    _at_least("data.prefetch_factor", d.prefetch_factor, 1)
    _at_least("data.size", d.size, 16)
    _at_least("data.length", d.length, 1)
    _at_least("data.val_length", d.val_length, 1)

    _at_least("train.iters", t.iters, 1)
    _positive("train.lr", t.lr)
    for key in ("momentum", "weight_decay", "power", "min_lr"):
        _at_least(f"train.{key}", getattr(t, key), 0, "a number")
    _positive("train.head_lr_mult", t.head_lr_mult)
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    if t.layer_decay is not None and not 0 < t.layer_decay <= 1:
        raise ConfigError(f"config key 'train.layer_decay' must lie in (0, 1] (or be null: off), got {t.layer_decay}")
    _at_least("train.warmup_iters", t.warmup_iters, 0)
    if not 0 <= t.warmup_ratio <= 1:
        raise ConfigError(f"config key 'train.warmup_ratio' must lie in [0, 1], got {t.warmup_ratio}")
    _choice("train.amp", t.amp, list(AMP_DTYPES))
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    if t.threads is not None:
        _at_least("train.threads", t.threads, 1)
    _at_least("train.log_interval", t.log_interval, 1)
    _at_least("train.eval_interval", t.eval_interval, 0)
    _at_least("train.checkpoint_interval", t.checkpoint_interval, 1)
    if t.ema is not None and not 0 < t.ema < 1:
        raise ConfigError(
            f"config key 'train.ema' is the EMA decay and must lie in (0, 1) (e.g. 0.999), or null "
            f"for no EMA; got {t.ema}"
        )
    _at_least("train.accumulate", t.accumulate, 1)
    if t.clip_grad is not None:
        _positive("train.clip_grad", t.clip_grad, "a max gradient norm")
    check_compile_setting("train.compile", t.compile)
    _positive("train.dist_timeout", t.dist_timeout, "a number of seconds")
    check_compile_setting("eval.compile", e.compile)

    _choice("eval.mode", e.mode, INFERENCE_MODES)
    _size("eval.crop_size", e.crop_size, pair)
    _size("eval.stride", e.stride, pair)
    if any(s > c for s, c in zip(e.stride, e.crop_size)):
        raise ConfigError(
            f"config key 'eval.stride' is {e.stride}, larger than eval.crop_size {e.crop_size}: the "
            f"sliding windows would leave pixels uncovered; expected a stride <= the crop size"
        )
    _at_least("eval.crop_batch", e.crop_batch, 1)
    if not e.scales or min(e.scales) <= 0:
        raise ConfigError(f"config key 'eval.scales' expects a non-empty list of positive numbers, got {e.scales}")
    if e.max_images is not None:
        _at_least("eval.max_images", e.max_images, 1)
    return cfg


def check_training(cfg, world_size=1):
    """What only training needs: the files it starts from exist, the global batch splits evenly over the
    ``world_size`` processes, and BatchNorm sees at least two samples (per process, unless SyncBN pools them over
    the processes). A resumed run takes its weights from the checkpoint: its ``model.pretrained`` may be gone."""
    resume = cfg.train.resume
    resuming = resume not in (None, "auto") or (
        resume == "auto" and os.path.isfile(os.path.join(cfg.train.work_dir, "last.pth"))
    )
    for key, path, expected in (
        ("train.resume", resume, "a checkpoint file, or 'auto'"),
        ("model.pretrained", None if resuming else cfg.model.pretrained, "an ImageNet checkpoint file, or null"),
    ):
        folder = key == "model.pretrained" and (cfg.model.external or {}).get("library") == "transformers"
        if folder and path is not None and not os.path.isdir(path):
            raise MissingPathError(
                f"config key 'model.pretrained': {path} is not a folder (expected a local "
                f"save_pretrained folder of the transformers model, or null)"
            )
        if (
            path is not None
            and not folder
            and not (key == "train.resume" and path == "auto")
            and not os.path.isfile(path)
        ):
            raise MissingPathError(f"config key '{key}': {path} does not exist (expected {expected})")
    batch = cfg.data.batch_size
    if batch % world_size:
        raise ConfigError(
            f"config key 'data.batch_size' is {batch}, which does not split evenly over "
            f"{world_size} processes; expected a multiple of {world_size}"
        )
    per_process = batch // world_size
    accumulate = cfg.train.accumulate
    if per_process % accumulate:
        raise ConfigError(
            f"config key 'train.accumulate' is {accumulate}, but the {per_process} samples per process "
            f"(data.batch_size {batch} over {world_size} process{'es' if world_size > 1 else ''}) do "
            f"not split into {accumulate} equal micro-batches; expected a divisor of {per_process}"
        )
    per_process //= accumulate
    synced = world_size > 1 and cfg.train.sync_bn
    if per_process < 2 and not synced:
        hint = "train.sync_bn=true or " if world_size > 1 else ""
        if accumulate > 1:
            raise ConfigError(
                f"config key 'train.accumulate' is {accumulate}: micro-batches of {per_process} sample "
                f"per process, but BatchNorm needs at least 2 in training; expected {hint}a smaller "
                f"train.accumulate"
            )
        raise ConfigError(
            f"config key 'data.batch_size' is {batch}: {per_process} sample per process "
            f"({world_size} process{'es' if world_size > 1 else ''}), but BatchNorm needs at least "
            f"2 in training; expected {hint}data.batch_size >= {2 * world_size}"
        )
