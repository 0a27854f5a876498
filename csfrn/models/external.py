"""``build_external``: another library's segmentation model with CSFLM plugged in, from a config's
``model.external`` (so that ``csfrn train`` / ``eval`` / ``predict`` / ``visualize`` / ``export`` build it as
they build csfrn's own models)::

    model:
      num_classes: 19
      embed_dim: 32
      pretrained: null            # a local .pth / .safetensors state_dict of the wrapped model (transformers:
                                  # a local save_pretrained folder)
      external:
        library: torchvision      # torchvision | smp | transformers | timm
        name: deeplabv3_resnet50  # torchvision.models.get_model name, smp architecture, transformers class, timm model
        kwargs: {aux_loss: true}  # the constructor's keyword arguments (transformers: its config's)
        tap: null                 # the submodule whose input CSFLM takes (null: add_csflm's default_tap)
        channels: null            # the tapped input's channels (null: the tapped module's in_channels)
        fusion: aam               # aam | concat | loss_only
        outputs: null             # where the logits are in the outputs: a key / attribute name or an index

Random initialisation throughout: torchvision's ``weights`` / ``weights_backbone`` and smp's ``encoder_weights``
default to None (nothing is downloaded); ``model.pretrained`` loads a local file into the wrapped model before
CSFLM is plugged. smp and transformers come with ``pip install -e .[plug]``, timm with ``.[timm]``.
"""

import os
import warnings
from typing import Any, Mapping, Optional

import torch

from ..errors import ConfigError
from ..extras import require
from .backbones import LoadReport
from .plug import PLUG_FUSIONS, add_csflm

LIBRARIES = {"torchvision": "torchvision", "smp": "plug", "transformers": "plug", "timm": "timm"}
EXTERNAL_KEYS = {
    "library": str,
    "name": str,
    "kwargs": dict,
    "tap": str,
    "channels": int,
    "fusion": str,
    "outputs": (str, int),
}
# ModelConfig keys build_external takes; the others (head, backbone, width, ...) describe csfrn's own models.
EXTERNAL_MODEL_KEYS = (
    "num_classes",
    "embed_dim",
    "margins",
    "pretrained",
    "fusion_init",
    "csflm_supervision",
    "loss_weights",
    "binary",
    "delta",
    "ohem",
    "thresh",
    "min_kept",
)


def check_external(external):
    """Check a ``model.external`` mapping without importing any library; a :class:`ConfigError` names the key."""
    if not isinstance(external, Mapping):
        raise ConfigError(
            f"config key 'model.external' expects a mapping (library, name, kwargs, tap, ...), got {external!r}"
        )
    unknown = sorted(set(external) - set(EXTERNAL_KEYS))
    if unknown:
        raise ConfigError(
            f"config key 'model.external' has unknown keys {unknown}; expected some of {', '.join(EXTERNAL_KEYS)}"
        )
    for key in ("library", "name"):
        if key not in external:
            raise ConfigError(
                f"config key 'model.external.{key}' is missing (model.external needs library and name; "
                f"a --set of one model.external key replaces the whole mapping)"
            )
    for key, kind in EXTERNAL_KEYS.items():
        value = external.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigError(f"config key 'model.external.{key}' expects {names}, got {value!r}")
    if external["library"] not in LIBRARIES:
        raise ConfigError(
            f"config key 'model.external.library' is {external['library']!r}; expected one of {', '.join(LIBRARIES)}"
        )
    fusion = external.get("fusion") or "aam"
    if fusion not in PLUG_FUSIONS:
        raise ConfigError(
            f"config key 'model.external.fusion' is {fusion!r}; expected one of {', '.join(PLUG_FUSIONS)}"
        )
    if external.get("channels") is not None and external["channels"] < 1:
        raise ConfigError(f"config key 'model.external.channels' must be >= 1, got {external['channels']}")
    return external


def _library_model(library, name, kwargs, num_classes, pretrained=None):
    """The wrapped model with ``num_classes`` outputs, randomly initialised (transformers: from ``pretrained``, a
    local folder, when given; the other libraries' files are loaded by :func:`load_external_weights`)."""
    kwargs = dict(kwargs or {})
    what = f"model.external {library}:{name}"
    if library == "torchvision":
        from torchvision.models import get_model, list_models, segmentation  # here: only this library needs it

        names = list_models(module=segmentation)
        if name not in names:
            raise ConfigError(
                f"config key 'model.external.name' is {name!r}: not one of torchvision's segmentation "
                f"models ({', '.join(names)})"
            )
        kwargs.setdefault("weights", None)
        kwargs.setdefault("weights_backbone", None)
        return get_model(name, num_classes=num_classes, **kwargs)
    if library == "smp":
        smp = require("segmentation_models_pytorch", "plug", what)
        archs = smp.MODEL_ARCHITECTURES_MAPPING
        if name.lower() not in archs:
            raise ConfigError(
                f"config key 'model.external.name' is {name!r}: not an smp architecture "
                f"({', '.join(a.__name__ for a in archs.values())})"
            )
        kwargs.setdefault("encoder_weights", None)
        return archs[name.lower()](classes=num_classes, **kwargs)
    if library == "transformers":
        transformers = require("transformers", "plug", what)
        cls = getattr(transformers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ConfigError(
                f"config key 'model.external.name' is {name!r}: not a transformers model class (e.g. "
                f"SegformerForSemanticSegmentation, UperNetForSemanticSegmentation)"
            )
        config = cls.config_class(num_labels=num_classes, **kwargs)
        return cls(config) if pretrained is None else _transformers_pretrained(cls, config, os.fspath(pretrained))
    timm = require("timm", "timm", what)
    if not timm.is_model(name):
        raise ConfigError(f"config key 'model.external.name' is {name!r}: not a timm model (timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _read_state(path):
    """A state_dict from a .safetensors / .pth file (read without running code)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"model.pretrained {path} does not exist (expected a .pth / .safetensors file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # comes with timm, smp and transformers

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained {path} holds a {type(state).__name__}, not a state_dict")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def load_external_weights(model, path):
    """Load a local checkpoint into the wrapped model: tensors whose shape differs (a classifier for another
    class count) are skipped, missing / unexpected keys are warned about. Returns a ``LoadReport``."""
    state = _read_state(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ConfigError(
            f"model.pretrained {path}: none of its {len(state)} tensors fits the model "
            f"{type(model).__name__} (expected a state_dict of that model)"
        )
    result = model.load_state_dict(fitting, strict=False)
    skipped = sorted(k for k in state if k in own and k not in fitting)
    report = LoadReport(sorted(result.missing_keys), sorted(k for k in state if k not in own), skipped)
    if report.missing or report.unexpected or skipped:

        def some(keys):
            return f"{len(keys)}" + (f" ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" if keys else "")

        warnings.warn(
            f"loading {path}: missing keys {some(report.missing)}, unexpected keys "
            f"{some(report.unexpected)}, skipped for their shape {some(skipped)}",
            stacklevel=2,
        )
    return report


def _transformers_pretrained(cls, config, path):
    """A transformers model from a local ``save_pretrained`` folder, through ``from_pretrained`` (which renames
    the checkpoint's keys to the installed version's), with ``config`` (model.external.kwargs, num_labels):
    tensors of another class count are re-initialised."""
    if not os.path.isdir(path):
        raise ConfigError(
            f"model.pretrained {path}: a transformers model loads from a local save_pretrained folder "
            f"(config.json and model.safetensors), not a file"
        )
    try:
        return cls.from_pretrained(path, config=config, local_files_only=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.pretrained {path} could not be loaded into {cls.__name__}: {detail}") from None


def build_external(
    external: Mapping[str, Any],
    num_classes: int,
    embed_dim: int = 32,
    margins: bool = True,
    pretrained: Optional[str] = None,
    fusion_init: str = "identity",
    csflm_supervision: str = "cac",
    loss_weights: Optional[Mapping[str, float]] = None,
    binary: str = "lovasz",
    delta: float = 10.0,
    ohem: bool = False,
    thresh: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
):
    """The model of ``model.external`` (see the module doc) with CSFLM plugged in: a ``CSFLMPlug``.

    ``num_classes``, ``embed_dim``, ``margins``, ``fusion_init``, ``csflm_supervision``, ``loss_weights``,
    ``binary``, ``delta`` and OHEM (``ohem``, ``thresh``, ``min_kept``) are the model config's (``add_csflm``'s
    options of the same names); ``pretrained`` a local state_dict of the wrapped model.
    """
    check_external(external)
    try:
        model = _library_model(external["library"], external["name"], external.get("kwargs"), num_classes, pretrained)
    except (TypeError, ValueError, KeyError, AssertionError) as err:  # the library refusing model.external.kwargs
        if isinstance(err, ConfigError):
            raise
        detail = str(err).strip().strip('"').splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.external {external['library']}:{external['name']} could not be built with "
            f"kwargs {external.get('kwargs') or {}} ({type(err).__name__}: {detail})"
        ) from None
    report = None
    if pretrained is not None and external["library"] != "transformers":
        report = load_external_weights(model, pretrained)
    picker = external.get("outputs")
    if isinstance(picker, int):
        outputs = lambda out, i=picker: out[i]  # noqa: E731
    elif isinstance(picker, str):
        outputs = lambda out, k=picker: out[k] if isinstance(out, Mapping) else getattr(out, k)  # noqa: E731
    else:
        outputs = None
    plug = add_csflm(
        model,
        num_classes,
        fusion=external.get("fusion") or "aam",
        embed_dim=embed_dim,
        tap=external.get("tap"),
        channels=external.get("channels"),
        margins=margins,
        fusion_init=fusion_init,
        csflm_supervision=csflm_supervision,
        loss_weights=loss_weights,
        ohem=ohem,
        thresh=thresh,
        min_kept=min_kept,
        delta=delta,
        binary=binary,
        ignore_index=ignore_index,
        outputs=outputs,
    )
    plug.pretrained_report = report
    return plug
