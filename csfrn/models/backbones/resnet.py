"""Dilated ResNet-50/101 backbones (output stride 8 or 16), torchvision stem or deep "V1c" stem.

Key names follow torchvision (``conv1``, ``bn1``, ``layerX.Y.conv1`` ... ``downsample.0/1``); the deep stem
is ``conv1 = Sequential(conv 3x3, BN, ReLU, conv 3x3, BN, ReLU, conv 3x3)`` followed by ``bn1``, timm's
layout, so timm ``resnet50c`` checkpoints load as they are and mmsegmentation ``ResNetV1c`` checkpoints load
after renaming ``stem.{0,1,3,4,6,7}``. The stride sits on the 3x3 conv of a bottleneck (V1.5) and downsampling
is a strided 1x1 conv + BN, as in both torchvision and ResNetV1c.
"""

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import ConfigError
from .timm_backbone import build_timm_backbone, is_timm

# (stem, block counts) of each named architecture.
ARCHS = {
    "resnet50": ("plain", (3, 4, 6, 3)),
    "resnet101": ("plain", (3, 4, 23, 3)),
    "resnet50c": ("deep", (3, 4, 6, 3)),
    "resnet101c": ("deep", (3, 4, 23, 3)),
}

# mmsegmentation ResNetV1c stem -> our (timm) names.
_MMSEG_STEM = {
    "stem.0.": "conv1.0.",
    "stem.1.": "conv1.1.",
    "stem.3.": "conv1.3.",
    "stem.4.": "conv1.4.",
    "stem.6.": "conv1.6.",
    "stem.7.": "bn1.",
}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, first_dilation=None, downsample=None):
        super().__init__()
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


class ResNet(nn.Module):
    """Dilated ResNet that returns the outputs of its four stages.

    Args:
        layers: number of bottleneck blocks in each of the four stages, e.g. (3, 4, 6, 3) for ResNet-50.
        deep_stem: three 3x3 convs 3 -> width/2 -> width/2 -> width (ResNetV1c) instead of one 7x7 conv.
        output_stride: 8 or 16; once the running stride reaches it, later stages dilate instead of striding.
        multi_grid: multiply the dilations of the last stage's blocks by (1, 2, 4) (dilations 4, 8, 16 at
            output stride 8), as in DeepLabv3.
        width: base channels; stage i has planes width * 2**i and outputs 4 * width * 2**i channels.
    """

    def __init__(self, layers=(3, 4, 6, 3), deep_stem=False, output_stride=8, multi_grid=False, width=64):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four block counts >= 1, got {tuple(layers)}")
        if deep_stem:
            half = width // 2
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, padding=1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, width, 3, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        # The one place where stride turns into dilation: the stem has stride 4; each stage that would push the
        # running stride past output_stride dilates by its stride instead.
        inplanes, net_stride, dilation = width, 4, 1
        self.out_channels = []
        for i, (blocks, stage_stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2**i
            prev_dilation = dilation
            if net_stride >= output_stride and stage_stride > 1:
                dilation *= stage_stride
                stage_stride = 1
            else:
                net_stride *= stage_stride
            grid = (1, 2, 4) if multi_grid and i == 3 else (1,)
            block_dilations = [dilation * grid[b % len(grid)] for b in range(blocks)]
            downsample = None
            if stage_stride != 1 or inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stage_stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            # As torchvision and timm: the first block of a dilated stage keeps the previous dilation (it still
            # sees the finer grid); with multi-grid every block takes its grid dilation.
            first = block_dilations[0] if multi_grid and i == 3 else prev_dilation
            stage = [Bottleneck(inplanes, planes, stage_stride, block_dilations[0], first, downsample)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes, 1, d) for d in block_dilations[1:]]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.out_channels.append(inplanes)
        self.out_channels = tuple(self.out_channels)
        self.output_stride = net_stride

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def layer_ids(self):
        """{parameter name: layer group} for layer-wise lr decay, as timm's ResNet ``group_matcher``: the stem
        is layer 0, then every block in order."""
        ids, block = {}, 0
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0].startswith("layer"):
                stage, index = int(parts[0][5:]), int(parts[1])
                block = sum(len(getattr(self, f"layer{i}")) for i in range(1, stage)) + index + 1
                ids[name] = block
            else:
                ids[name] = 0
        return ids

    def forward(self, x):
        """Returns the four stage outputs (strides 4, 8, then output_stride twice at output stride 8)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: checkpoint keys it left out, model keys it did not fill."""

    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    ignored: list = field(default_factory=list)  # ImageNet classifier (fc.*) keys, dropped on purpose

    def __str__(self):
        return (
            f"missing keys ({len(self.missing)}): {self.missing}; unexpected keys ({len(self.unexpected)}): "
            f"{self.unexpected}; ignored classifier keys: {self.ignored}"
        )


def _unwrap(state):
    """A bare state_dict, from a torchvision / timm file or an mmcv / training checkpoint."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint must hold a state_dict (a dict of tensors), got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        for old, new in _MMSEG_STEM.items():
            if k.startswith(old):
                k = new + k[len(old) :]
        out[k] = v
    return out


def load_pretrained(model, path):
    """Load ImageNet weights into ``model`` from a local torchvision, timm or mmsegmentation file.

    The file is read with ``weights_only=True`` (no code runs). A shape mismatch is an error naming every
    offending key; missing and unexpected keys are returned in a ``LoadReport`` (and warned about); missing
    tensors keep their initialisation.
    """
    state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    own = model.state_dict()
    ignored = sorted(k for k in state if k.startswith("fc."))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    mismatched = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint {path} does not fit this backbone (shape mismatch in {len(mismatched)} "
            f"tensors; a plain-stem file for a deep-stem model or a different width?):\n  " + "\n  ".join(mismatched)
        )
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys), ignored)
    if report.missing or report.unexpected:
        warnings.warn(f"loading {path}: {report}", stacklevel=2)
    return report


def build_backbone(name="resnet50c", output_stride=8, multi_grid=False, width=64, blocks=None, pretrained=None):
    """A named dilated ResNet; ``blocks`` overrides the block counts, ``pretrained`` is a local checkpoint file.
    ``"timm:<name>"`` is timm's model ``name`` (:class:`TimmBackbone`), which takes no width, blocks or multi-grid.

    Returns (backbone, LoadReport or None).
    """
    if is_timm(name):
        for key, value, default in (("width", width, 64), ("blocks", blocks, None), ("multi_grid", multi_grid, False)):
            if value != default:
                raise ConfigError(
                    f"{key}={list(value) if key == 'blocks' else value} (model.{key}) applies to "
                    f"csfrn's ResNets only; backbone {name!r} is timm's, whose shape its name gives: "
                    f"leave model.{key} at {default if default is not None else 'null'}"
                )
        return build_timm_backbone(name, output_stride, pretrained)
    if name not in ARCHS:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {sorted(ARCHS)} or timm:<name> (any timm "
            f"model that dilates, e.g. timm:convnext_atto)"
        )
    stem, layers = ARCHS[name]
    model = ResNet(
        tuple(blocks) if blocks is not None else layers,
        deep_stem=stem == "deep",
        output_stride=output_stride,
        multi_grid=multi_grid,
        width=width,
    )
    report = load_pretrained(model, pretrained) if pretrained is not None else None
    return model, report
