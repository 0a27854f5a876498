"""Any timm model as a CSFRN backbone: ``backbone="timm:<name>"``.

timm's ``features_only`` model at the output stride (timm dilates the late stages itself), its four deepest
feature maps handed to the head and the aux head in the places of our ResNets' four stage outputs (strides
4, 8, then the output stride twice at output stride 8); their channels come from timm's ``feature_info``.
timm is an optional dependency (``pip install -e .[timm]``), imported only here.
"""

import difflib

from torch import nn

from ...errors import ConfigError
from ...extras import require

TIMM_PREFIX = "timm:"


def is_timm(name):
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


class TimmBackbone(nn.Module):
    """The four deepest feature maps of ``timm.create_model(name, features_only=True, output_stride=...)``.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. "resnet50c", "convnext_atto", "efficientnet_b0".
        output_stride: 8 or 16; a family that cannot dilate (ViT, Swin, HRNet, VGG, DLA, ...) is an error saying so.
        pretrained: a local timm (or, for timm's ResNets, torchvision) checkpoint, ``.pth`` or ``.safetensors``,
            of the classification model ``name``; timm loads it strictly (its classifier left out).

    Attributes: ``body`` the timm model, ``out_channels`` the four maps' channels, ``output_stride``,
    ``timm_name``.
    """

    def __init__(self, name, output_stride=8, pretrained=None):
        super().__init__()
        timm = require("timm", "timm", f"model.backbone {TIMM_PREFIX}{name}")
        if not name or not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5) if name else []
            hint = f" (similar names: {', '.join(close)})" if close else " (see timm.list_models())"
            raise ConfigError(f"unknown timm model {name!r} in model.backbone '{TIMM_PREFIX}{name}'{hint}")
        self.timm_name = name
        kwargs = {"features_only": True, "output_stride": output_stride, "out_indices": 4}
        try:
            body = timm.create_model(name, pretrained=False, **kwargs)
        except (TypeError, AssertionError) as err:
            why = str(err).strip().splitlines()[0] if str(err).strip() else f"{type(err).__name__} in timm"
            raise ConfigError(
                f"model.backbone '{TIMM_PREFIX}{name}' cannot run at output stride {output_stride}: "
                f"this timm family cannot dilate its late stages ({why}); choose one that does "
                f"(resnet*, convnext*, efficientnet*, regnet*, mobilenetv3*, ... see the README's "
                f"Backbones)"
            ) from None
        reductions = body.feature_info.reduction()
        if len(reductions) < 4:
            raise ConfigError(
                f"model.backbone '{TIMM_PREFIX}{name}' has {len(reductions)} feature stages; the heads need 4"
            )
        if reductions[-1] != output_stride:
            raise ConfigError(
                f"model.backbone '{TIMM_PREFIX}{name}' ignores output_stride={output_stride} (its "
                f"deepest features have stride {reductions[-1]}): this timm family cannot dilate"
            )
        if pretrained is not None:
            body = self._load(timm, name, kwargs, pretrained)
        self.body = body
        self.out_channels = tuple(body.feature_info.channels())
        self.output_stride = output_stride

    @staticmethod
    def _load(timm, name, kwargs, path):
        """timm's own loader (its per-family checkpoint filters, the classifier dropped, strict) reads the file
        into the classification model before it becomes the features model, whose names may differ."""
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            detail = "; ".join(lines)[:600] if lines else type(err).__name__
            raise ConfigError(
                f"model.pretrained {path} does not fit timm's {name} (expected a timm or torchvision "
                f"checkpoint of that model, .pth or .safetensors): {detail}"
            ) from None

    def forward(self, x):
        """The four deepest feature maps (a tuple, shallow to deep)."""
        return tuple(self.body(x))

    def layer_ids(self):
        """{parameter name in this module: timm's layer group of it} from timm's ``group_matcher`` of the full
        model ``timm_name`` (what timm's layer-wise lr decay reads). The features model may rename the full
        model's top-level sequences (``stages.0`` becomes ``stages_0``); names map back to the full model's."""
        timm = require("timm", "timm", "train.layer_decay")
        try:
            full = timm.create_model(self.timm_name, pretrained=False, output_stride=self.output_stride)
        except TypeError:  # a family whose features model alone takes output_stride (MobileNetV3); same names
            full = timm.create_model(self.timm_name, pretrained=False)
        if not hasattr(full, "group_matcher"):
            raise ConfigError(
                f"timm's {self.timm_name} has no group_matcher: train.layer_decay cannot tell its "
                f"layers apart; set train.layer_decay=null"
            )
        full_ids = timm.models.group_parameters(full, full.group_matcher(coarse=False), reverse=True)
        ids = {}
        for name, _ in self.body.named_parameters():
            candidates = [name]
            first, _, rest = name.partition(".")
            if "_" in first:
                head, _, index = first.rpartition("_")
                candidates.append(f"{head}.{index}.{rest}" if rest else f"{head}.{index}")
            found = next((full_ids[c] for c in candidates if c in full_ids), None)
            if found is None:
                raise ConfigError(
                    f"train.layer_decay: parameter {name} of timm's {self.timm_name} features model "
                    f"has no layer in timm's group_matcher; set train.layer_decay=null"
                )
            ids[f"body.{name}"] = found
        return ids


def build_timm_backbone(name, output_stride=8, pretrained=None):
    """``TimmBackbone`` for ``"timm:<name>"``; returns (backbone, LoadReport or None) as ``build_backbone``."""
    from .resnet import LoadReport  # here, not at the top: resnet imports this module

    model = TimmBackbone(name[len(TIMM_PREFIX) :] if is_timm(name) else name, output_stride, pretrained)
    return model, (LoadReport() if pretrained is not None else None)
