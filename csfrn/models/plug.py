"""``add_csflm``: CSFLM plugged into another segmentation model (torchvision's FCN / DeepLabV3 / LRASPP, or any
model whose classifier input can be tapped).

The paper places CSFLM after a head's context module (PPM, Non-local, ASPP) and before the classifier. Here the
context features are "tapped" as the input of one submodule of the wrapped model (by default the input of the
final classifier conv, see ``default_tap``) through a forward pre-hook on that submodule:

- fusion "concat" / "aam": the hook replaces that input by CSFLM's fused features, so the classifier sees them
  in every mode (train and eval, with or without labels);
- fusion "loss_only": the hook only hands the input to CSFLM when a training step with labels runs, for the CAC
  and smooth losses; at inference CSFLM does not run and the model's graph and cost are those of the wrapped
  model (CSFLM is built without fusion layers: it adds its 3x3 conv, embedding and margin convs only).
"""
from collections.abc import Mapping
from typing import Callable, Optional, Union

import torch.nn.functional as F
from torch import nn

from ..losses import check_model_labels, class_index
from ..nn import CSFLM
from .segmentor import CSFRN, set_losses

PLUG_FUSIONS = ("concat", "aam", "loss_only")


def default_tap(model):
    """(name of the submodule whose input CSFLM taps, channels of that input) for torchvision-style models.

    - ``model.classifier.high_classifier`` (torchvision's LRASPP): the LR-ASPP features (``cbr(x) * scale(x)``,
      128 channels, upsampled to the low-level branch's stride 8) before the high classifier; the low-level
      1x1 classifier (a skip from stride-8 backbone features, added to the logits) is left as it is.
    - ``model.classifier`` an ``nn.Sequential`` ending in a ``Conv2d`` (torchvision's FCNHead and DeepLabHead):
      the input of that final conv, or of the dropout right before it (FCNHead), so CSFLM runs on the context
      features before the dropout, as in csfrn's own heads.
    """
    classifier = getattr(model, "classifier", None)
    high = getattr(classifier, "high_classifier", None)
    if isinstance(high, nn.Conv2d):
        return "classifier.high_classifier", high.in_channels
    if isinstance(classifier, nn.Sequential) and len(classifier) and isinstance(classifier[-1], nn.Conv2d):
        i = len(classifier) - 1
        channels = classifier[i].in_channels
        while i > 0 and isinstance(classifier[i - 1], (nn.Dropout, nn.Dropout2d)):
            i -= 1
        return f"classifier.{i}", channels
    raise ValueError(f"add_csflm: no default tap for {type(model).__name__} (it knows torchvision's FCN, DeepLabV3 "
                     f"and LRASPP); pass tap= the name of the submodule whose input is the classifier's input "
                     f"features (e.g. tap='decode_head.conv_seg'), the submodule itself or a callable "
                     f"model -> submodule")


def _resolve_tap(model, tap, channels):
    if tap is None:
        name, found = default_tap(model)
        return name, channels or found
    if isinstance(tap, str):
        try:
            module = model.get_submodule(tap)
        except AttributeError as e:
            raise ValueError(f"add_csflm: tap={tap!r} names no submodule of {type(model).__name__} ({e})") from None
        name = tap
    else:
        module = tap if isinstance(tap, nn.Module) else tap(model)
        if not isinstance(module, nn.Module):
            raise TypeError(f"add_csflm: tap must be a submodule name, a submodule or a callable model -> "
                            f"submodule; the callable returned {type(module).__name__}")
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name is None:
            raise ValueError(f"add_csflm: the tap module {type(module).__name__} is not a submodule of the model")
    if name == "":
        raise ValueError("add_csflm: the tap must be a submodule, not the model itself")
    if channels is None:
        channels = getattr(module, "in_channels", None)
        if not isinstance(channels, int):
            raise ValueError(f"add_csflm: cannot tell the channels of the input of {name!r} "
                             f"({type(module).__name__} has no in_channels); pass channels=")
    return name, channels


class CSFLMPlug(nn.Module):
    """A segmentation model with CSFLM plugged in (``add_csflm`` makes one).

    ``plug(images)`` returns what the wrapped model returns (torchvision: ``{"out": logits, "aux": ...}``);
    ``plug(images, labels)`` returns ``(outputs, losses)``, ``losses`` holding the weighted terms of Eq. 7
    that apply, as csfrn's own models: "seg" (on ``outputs["out"]``, or on the output when it is a tensor),
    "aux" (on ``outputs["aux"]``, in train mode, when the model has one), "cac" and "smooth" (when CSFLM runs:
    always with "concat" / "aam", in train mode only with "loss_only"; "smooth" only with margins).
    Logits smaller than the labels are upsampled (bilinear) for the loss. Labels are checked as ``CSFRN``
    checks them (a one-line ValueError for a value outside [0, num_classes) that is not ``ignore_index``; not
    inside ``csfrn.losses.labels_checked()``).

    Attributes: ``model`` the wrapped model (its tapped submodule carries the hook), ``csflm`` the module,
    ``tap`` the tapped submodule's name, ``fusion``.
    """

    def __init__(self, model, csflm, tap, fusion, num_classes, seg_loss=None, loss_weights=None, delta=10.0,
                 binary="lovasz", ignore_index=255):
        super().__init__()
        self.model = model
        self.csflm = csflm
        self.tap = tap
        self.fusion = fusion
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        set_losses(self, seg_loss, loss_weights, delta, binary, ignore_index)
        self._record = None        # a list while a forward with labels collects CSFLM's outputs
        model.get_submodule(tap).register_forward_pre_hook(self._tap_hook)

    def _tap_hook(self, module, args):
        if self.fusion == "loss_only":
            if self._record is not None:
                self._record.append(self.csflm(args[0]))
            return None
        out = self.csflm(args[0])
        if self._record is not None:
            self._record.append(out)
        return (out.features,) + tuple(args[1:])

    def forward(self, images, labels=None):
        if labels is None:
            return self.model(images)
        CSFRN.check_input(images)
        if labels.shape != (images.shape[0],) + images.shape[2:]:
            raise ValueError(f"labels must have shape [N, H, W] = {[images.shape[0], *images.shape[2:]]} to match "
                             f"images {list(images.shape)}, got {list(labels.shape)}")
        labels = labels.long()
        check_model_labels(labels, self.num_classes, self.ignore_index)   # as CSFRN.forward does
        collect = self.training or self.fusion != "loss_only"
        self._record = [] if collect else None
        try:
            outputs = self.model(images)
            record = self._record
        finally:
            self._record = None
        if collect and len(record) != 1:
            raise RuntimeError(f"add_csflm: the tapped submodule {self.tap!r} ran {len(record)} times in one forward; "
                               f"tap a submodule that runs once")
        return outputs, self._losses(outputs, labels, record[0] if collect else None)

    def _losses(self, outputs, labels, out):
        w = self.loss_weights
        aux = None
        if isinstance(outputs, Mapping):
            logits, aux = outputs["out"], outputs.get("aux")
        else:
            logits = outputs
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"add_csflm: the model's logits have {logits.shape[1]} channels, num_classes is "
                             f"{self.num_classes}")
        losses = {"seg": w["seg"] * self.seg_loss(self._resize(logits, labels), labels)}
        if aux is not None and self.training:
            losses["aux"] = w["aux"] * F.cross_entropy(self._resize(aux, labels), labels,
                                                       ignore_index=self.ignore_index)
        if out is not None:
            index = class_index(labels, out.embeddings.shape[2:], self.ignore_index)
            losses["cac"] = w["cac"] * self.cac_loss(out.embeddings, out.margins, index)
            if out.margins is not None:
                losses["smooth"] = w["smooth"] * self.smooth_loss(out.margins, index)
        return losses

    @staticmethod
    def _resize(logits, labels):
        if logits.shape[2:] == labels.shape[1:]:
            return logits
        return F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)

    def extra_repr(self):
        return f"tap={self.tap!r}, fusion={self.fusion!r}, num_classes={self.num_classes}"


def add_csflm(model: nn.Module, num_classes: int, fusion: str = "aam", embed_dim: int = 32, *,
              tap: Union[None, str, nn.Module, Callable[[nn.Module], nn.Module]] = None,
              channels: Optional[int] = None, margins: bool = True,
              loss_weights: Optional[Mapping[str, float]] = None, seg_loss: Optional[nn.Module] = None,
              delta: float = 10.0, binary: str = "lovasz", ignore_index: int = 255) -> "CSFLMPlug":
    """Plug CSFLM into a segmentation model; returns a ``CSFLMPlug`` wrapping ``model``.

    ``model`` is modified in place (a forward pre-hook on the tapped submodule) and becomes ``plug.model``:
    keep using the returned module. Its state_dict keys are ``model.<the wrapped model's keys>`` and
    ``csflm.*``; load pretrained weights into ``model`` before plugging.

    Args:
        model: torchvision's ``fcn_resnet50/101``, ``deeplabv3_resnet50/101``, ``deeplabv3_mobilenet_v3_large``,
            ``lraspp_mobilenet_v3_large`` (see ``default_tap`` for where CSFLM goes), or any model given ``tap``.
        num_classes: the model's number of classes (checked against its logits).
        fusion: "aam" (CSFLM + AAM, the full CSFRN), "concat" (the paper's "+CSFLM") or "loss_only" (CSFLM
            drives the CAC / smooth losses in training and is not run at inference).
        embed_dim: width of the C-S features (8 / 16 / 32 / 64).
        tap: the submodule whose (first) input is the classifier's input features [N, channels, h, w]: its name
            (as in ``model.named_modules()``), the submodule itself, or a callable ``model -> submodule``;
            None: ``default_tap(model)``. It must run once per forward. With "concat" / "aam" its input is
            replaced by CSFLM's output (same shape).
        channels: channels of the tapped input (default: the tapped module's ``in_channels``).
        margins: learn class margins (False: fixed margin 0, no smooth loss).
        loss_weights: overrides of {"seg": 1.0, "aux": 0.4, "cac": 0.2, "smooth": 0.2}.
        seg_loss: loss on the logits (default cross-entropy with ``ignore_index``).
        delta, binary: the CAC loss's margin temperature and binary loss ("lovasz" or "bce").
    """
    if fusion not in PLUG_FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {list(PLUG_FUSIONS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_csflm: model must be an nn.Module, got {type(model).__name__}")
    name, channels = _resolve_tap(model, tap, channels)
    csflm = CSFLM(channels, embed_dim, None if fusion == "loss_only" else fusion, margins)
    param = next(model.parameters(), None)
    if param is not None:
        csflm.to(device=param.device, dtype=param.dtype)
    plug = CSFLMPlug(model, csflm, name, fusion, num_classes, seg_loss, loss_weights, delta, binary, ignore_index)
    return plug.train(model.training)
