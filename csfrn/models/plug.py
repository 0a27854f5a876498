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

The wrapped model's outputs may be a tensor of logits, torchvision's ``{"out": ..., "aux": ...}``, a Hugging
Face ``ModelOutput`` (``.logits``; its ``loss`` is left alone: the model gets no labels), or a tuple / list whose
first element is the logits (smp with ``aux_params`` returns ``(mask, label)``); ``outputs=`` picks them from
anything else. ``plug(images)`` returns them as the wrapped model returns them.
"""

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..losses import Eq7Loss
from ..nn import CSFLM
from .segmentor import CSFRN

PLUG_FUSIONS = ("concat", "aam", "loss_only")


class PlugError(UserError, ValueError):
    """A tap, channel count or model output that ``add_csflm`` cannot work with (one line; the CLI prints it)."""


class PlugTypeError(UserError, TypeError):
    """An argument of ``add_csflm`` of the wrong kind (a tap that is no name, module or callable, ...)."""


class PlugRunError(UserError, RuntimeError):
    """A tapped submodule that does not run exactly once per forward pass."""


def default_tap(model):
    """(name of the submodule whose input CSFLM taps, channels of that input) for torchvision, smp and Hugging
    Face models.

    - ``model.classifier.high_classifier`` (torchvision's LRASPP): the LR-ASPP features (``cbr(x) * scale(x)``,
      128 channels, upsampled to the low-level branch's stride 8) before the high classifier; the low-level
      1x1 classifier (a skip from stride-8 backbone features, added to the logits) is left as it is.
    - ``model.classifier`` an ``nn.Sequential`` ending in a ``Conv2d`` (torchvision's FCNHead and DeepLabHead):
      the input of that final conv, or of the dropout right before it (FCNHead), so CSFLM runs on the context
      features before the dropout, as in csfrn's own heads.
    - ``model.segmentation_head`` an ``nn.Sequential`` led by a ``Conv2d`` (segmentation_models_pytorch): the
      decoder's output features, the input of that conv (``segmentation_head.0``).
    - ``model.decode_head.classifier`` a ``Conv2d`` (Hugging Face Segformer, UperNet): its input, the decode
      head's fused features.
    """
    head = getattr(model, "segmentation_head", None)
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], nn.Conv2d):
        return "segmentation_head.0", head[0].in_channels
    decode_classifier = getattr(getattr(model, "decode_head", None), "classifier", None)
    if isinstance(decode_classifier, nn.Conv2d):
        return "decode_head.classifier", decode_classifier.in_channels
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
    raise PlugError(
        f"add_csflm: no default tap for {type(model).__name__} (it knows torchvision's FCN, DeepLabV3 "
        f"and LRASPP, smp's models and Hugging Face's Segformer / UperNet); pass tap= the name of the "
        f"submodule whose input is the classifier's input features (e.g. tap='decode_head.conv_seg'), "
        f"the submodule itself or a callable model -> submodule"
    )


def _resolve_tap(model, tap, channels):
    if tap is None:
        name, found = default_tap(model)
        return name, channels or found
    if isinstance(tap, str):
        try:
            module = model.get_submodule(tap)
        except AttributeError as e:
            raise PlugError(f"add_csflm: tap={tap!r} names no submodule of {type(model).__name__} ({e})") from None
        name = tap
    elif isinstance(tap, nn.Module) or callable(tap):
        module = tap if isinstance(tap, nn.Module) else tap(model)
        if not isinstance(module, nn.Module):
            raise PlugTypeError(
                f"add_csflm: tap must be a submodule name, a submodule or a callable model -> "
                f"submodule; the callable returned {type(module).__name__}"
            )
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name is None:
            raise PlugError(f"add_csflm: the tap module {type(module).__name__} is not a submodule of the model")
    else:
        raise PlugTypeError(
            f"add_csflm: tap={tap!r} is a {type(tap).__name__}; expected a submodule name (str, as in "
            f"model.named_modules()), the submodule itself or a callable model -> submodule"
        )
    if name == "":
        raise PlugError("add_csflm: the tap must be a submodule, not the model itself")
    if channels is None:
        channels = getattr(module, "in_channels", None)
        if not isinstance(channels, int):
            raise PlugError(
                f"add_csflm: cannot tell the channels of the input of {name!r} "
                f"({type(module).__name__} has no in_channels); pass channels="
            )
    return name, channels


def _out_of_place(model, tap):
    """Turn off ``inplace`` on the tapped module and on the module that runs right after it in their
    ``nn.Sequential`` (a Dropout2d(inplace=True) would overwrite the features CSFLM keeps for its backward).
    Returns the names of the modules changed."""
    names = [tap]
    parent_name, _, child = tap.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential):
        children = [n for n, _ in parent.named_children()]
        at = children.index(child)
        if at + 1 < len(children):
            names.append(f"{parent_name}.{children[at + 1]}" if parent_name else children[at + 1])
    changed = []
    for name in names:
        module = model.get_submodule(name)
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changed.append(name)
    return changed


def _backbone_name(model):
    """The wrapped model's encoder: torchvision's and UperNet's ``backbone``, smp's ``encoder``, Hugging Face's
    base model (``base_model_prefix``, e.g. ``segformer``); None when there is none."""
    for name in ("backbone", "encoder"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return None


class CSFLMPlug(nn.Module):
    """A segmentation model with CSFLM plugged in (``add_csflm`` makes one).

    ``plug(images)`` returns what the wrapped model returns (a tensor, torchvision's ``{"out": logits, "aux":
    ...}``, a Hugging Face ``ModelOutput``, smp's ``(mask, label)``), in train and eval mode alike;
    ``plug(images, labels)`` returns ``(outputs, losses)``, ``losses`` holding the weighted terms of Eq. 7
    that apply, made by the same ``csfrn.losses.Eq7Loss`` as csfrn's own models': "seg" (on the logits:
    ``outputs["out"]``, ``outputs.logits``, ``outputs[0]``, the output itself when it is a tensor, or what
    ``outputs=`` picks), "aux" (on ``outputs["aux"]``, in train mode, when the model has one), "cac" and "smooth"
    (when CSFLM runs: always with "concat" / "aam", in train mode only with "loss_only"; "smooth" only with
    margins), or "mask" in train mode in their place (``csflm_supervision="mask"``). Logits smaller than the
    labels are upsampled (bilinear, in float32: ``csfrn.losses.upsample_logits``) for the loss. :meth:`segment`
    gives the logits at the input size (what csfrn's evaluation, prediction and export use), :meth:`predict_maps`
    CSFRN's maps. Labels are checked as ``CSFRN`` checks them (a one-line ValueError for a value outside
    [0, num_classes) that is not ``ignore_index``; not inside ``csfrn.losses.labels_checked()``).

    Attributes: ``model`` the wrapped model (its tapped submodule carries the hook), ``csflm`` the module,
    ``criterion`` the ``Eq7Loss``,
    ``tap`` the tapped submodule's name, ``channels`` its input's, ``fusion``, ``outputs`` the logits picker
    or None, ``out_of_place`` the modules whose ``inplace`` was turned off, ``backbone_prefix`` the prefix of
    the wrapped model's encoder parameters (``train.head_lr_mult`` applies to the others) or None.
    """

    def __init__(self, model, csflm, tap, fusion, criterion, channels=None, outputs=None):
        super().__init__()
        self.model = model
        self.csflm = csflm
        self.criterion = criterion
        self.tap = tap
        self.channels = channels if channels is not None else csflm.embed.in_channels
        self.fusion = fusion
        self.num_classes = criterion.num_classes
        self.outputs = outputs
        self._record = None  # a list while a forward collects (tapped input, CSFLM's output)
        self.out_of_place = _out_of_place(model, tap)
        backbone = _backbone_name(model)
        self.backbone_prefix = f"model.{backbone}." if backbone else None
        model.get_submodule(tap).register_forward_pre_hook(self._tap_hook)

    def _check_tapped(self, x):
        """The tapped input is CSFLM's input: a feature map [N, channels, h, w]."""
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == self.channels:
            return
        got = f"a {x.dim()}-D tensor {list(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
        hint = (
            " (a 3-D token tensor [N, L, C]: tap a module whose input is the tokens reshaped into a map)"
            if isinstance(x, torch.Tensor) and x.dim() == 3
            else f" (pass channels={x.shape[1]} if that is the right tap)"
            if isinstance(x, torch.Tensor) and x.dim() == 4
            else ""
        )
        raise PlugError(
            f"add_csflm: the input of tap {self.tap!r} is {got}; CSFLM needs a feature map "
            f"[N, {self.channels}, h, w] (channels={self.channels}){hint}"
        )

    def _tap_hook(self, module, args):
        x = args[0] if args else None
        self._check_tapped(x)
        if self.fusion == "loss_only":
            if self._record is not None:
                self._record.append((x, self.csflm(x)))
            return None
        out = self.csflm(x)
        if self._record is not None:
            self._record.append((x, out))
        return (out.features,) + tuple(args[1:])

    def _run(self, images, collect):
        """The wrapped model's outputs and, when ``collect``, the one (tapped input, CSFLM output) of the pass."""
        self._record = [] if collect else None
        try:
            outputs = self.model(images)
            record = self._record
        finally:
            self._record = None
        if collect and len(record) != 1:
            raise PlugRunError(
                f"add_csflm: the tapped submodule {self.tap!r} ran {len(record)} times in one forward; "
                f"tap a submodule that runs once"
            )
        return outputs, (record[0] if collect else None)

    def forward(self, images, labels=None):
        if labels is None:
            return self.model(images)
        CSFRN.check_input(images)
        labels = self.criterion.prepare_labels(images, labels)
        outputs, record = self._run(images, self.training or self.fusion != "loss_only")
        logits, aux = self.pick(outputs)
        if logits.shape[1] != self.num_classes:
            raise PlugError(
                f"add_csflm: the model's logits have {logits.shape[1]} channels, num_classes is {self.num_classes}"
            )
        return outputs, self.criterion(labels, logits, aux, record[1] if record else None)

    def pick(self, outputs):
        """(logits [N, K, h, w], aux logits or None) from the wrapped model's outputs."""
        aux = None
        if self.outputs is not None:
            logits = self.outputs(outputs)
        elif isinstance(outputs, torch.Tensor):
            logits = outputs
        elif isinstance(outputs, Mapping) and "out" in outputs:  # torchvision
            logits, aux = outputs["out"], outputs.get("aux")
        elif isinstance(outputs, Mapping) and "logits" in outputs:  # Hugging Face ModelOutput
            logits = outputs["logits"]
        elif isinstance(getattr(outputs, "logits", None), torch.Tensor):
            logits = outputs.logits
        elif isinstance(outputs, (tuple, list)) and outputs:  # smp with aux_params: (mask, label)
            logits = outputs[0]
        else:
            raise PlugTypeError(
                f"add_csflm: cannot find the logits in the model's output (a "
                f"{type(outputs).__name__}); pass outputs= a callable that picks them from it"
            )
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 4):
            got = f"a {logits.dim()}-D tensor" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
            raise PlugTypeError(
                f"add_csflm: the logits picked from the model's output are {got}, expected "
                f"[N, K, h, w]; pass outputs= a callable that picks them"
            )
        return logits, aux

    def segment(self, images):
        """Logits [N, K, H, W] at the size of ``images`` (upsampled bilinearly when the model's are smaller)."""
        logits, _ = self.pick(self(images))
        if logits.shape[2:] != images.shape[2:]:
            logits = F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict_maps(self, images):
        """As :meth:`csfrn.models.CSFRN.predict_maps`: {"logits" at the input size, "features" (CSFLM's fused
        F; the tapped input with "loss_only"), "embeddings", "margins"}; CSFLM runs for it with any fusion."""
        outputs, (tapped, out) = self._run(images, True)
        logits, _ = self.pick(outputs)
        logits = (
            F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
            if logits.shape[2:] != images.shape[2:]
            else logits
        )
        features = tapped if self.fusion == "loss_only" else out.features
        return {"logits": logits, "features": features, "embeddings": out.embeddings, "margins": out.margins}

    def extra_repr(self):
        return f"tap={self.tap!r}, fusion={self.fusion!r}, num_classes={self.num_classes}"


def add_csflm(
    model: nn.Module,
    num_classes: int,
    fusion: str = "aam",
    embed_dim: int = 32,
    *,
    tap: Union[None, str, nn.Module, Callable[[nn.Module], nn.Module]] = None,
    channels: Optional[int] = None,
    margins: bool = True,
    fusion_init: str = "identity",
    csflm_supervision: str = "cac",
    loss_weights: Optional[Mapping[str, float]] = None,
    seg_loss: Optional[nn.Module] = None,
    ohem: bool = False,
    thresh: float = 0.7,
    min_kept: int = 100000,
    delta: float = 10.0,
    binary: str = "lovasz",
    ignore_index: int = 255,
    outputs: Optional[Callable[[Any], "torch.Tensor"]] = None,
) -> "CSFLMPlug":
    """Plug CSFLM into a segmentation model; returns a ``CSFLMPlug`` wrapping ``model``.

    ``model`` is modified in place (a forward pre-hook on the tapped submodule) and becomes ``plug.model``:
    keep using the returned module. Its state_dict keys are ``model.<the wrapped model's keys>``, ``csflm.*``
    and, with ``csflm_supervision="mask"``, ``criterion.mask_head.*``; load pretrained weights into ``model``
    before plugging.

    The losses are those of :func:`csfrn.models.build_model`'s models (``csfrn.losses.Eq7Loss``), with the same
    options (``margins``, ``fusion_init``, ``csflm_supervision``, ``loss_weights``, OHEM, ``binary``, ``delta``,
    ``ignore_index``); the wrapped model's own auxiliary output, when it has one, takes the place of the
    auxiliary head.

    The tapped input is checked at every pass (a 4-D map with ``channels`` channels, else a one-line error
    naming the tap and the shape it got). An in-place module at the tap or right after it in its
    ``nn.Sequential`` (smp FPN's ``Dropout2d(inplace=True)``) is made out-of-place (``plug.out_of_place`` lists
    them): in place, it would overwrite features CSFLM keeps for its backward.

    Args:
        model: torchvision's ``fcn_resnet50/101``, ``deeplabv3_resnet50/101``, ``deeplabv3_mobilenet_v3_large``,
            ``lraspp_mobilenet_v3_large`` (see ``default_tap`` for where CSFLM goes), or any model given ``tap``:
            smp's (``tap="segmentation_head.0"``, or ``"decoder.dropout"`` with ``channels=``), Hugging Face's
            ``SegformerForSemanticSegmentation`` / ``UperNetForSemanticSegmentation``
            (``tap="decode_head.classifier"``), ...
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
        fusion_init: "identity" (the fusion starts as the identity on the tapped features) or "random"
            (nn.Conv2d's default init); no fusion layers with "loss_only".
        csflm_supervision: "cac" (the CAC + smoothness losses) or "mask" (Table 4's "+Aux Loss": a 1x1 classifier
            on the embeddings B, Lovasz-softmax on the class mask at B's size, weighted as the CAC loss).
        loss_weights: overrides of {"seg": 1.0, "aux": 0.4, "cac": 0.2, "smooth": 0.2}.
        seg_loss: loss on the logits (default cross-entropy with ``ignore_index``, or OHEM cross-entropy with
            ``ohem``, ``thresh``, ``min_kept``, as ``build_model``'s).
        delta, binary: the CAC loss's margin temperature and binary loss ("lovasz" or "bce").
        ignore_index: the label value of unlabelled pixels.
        outputs: a callable picking the logits [N, K, h, w] from the model's outputs, for outputs other than a
            tensor, torchvision's dict, a ``ModelOutput`` with ``.logits`` or a tuple / list led by the logits.
    """
    if fusion not in PLUG_FUSIONS:
        raise PlugError(f"unknown fusion {fusion!r}; choose one of {list(PLUG_FUSIONS)}")
    if not isinstance(model, nn.Module):
        raise PlugTypeError(f"add_csflm: model must be an nn.Module, got {type(model).__name__}")
    name, channels = _resolve_tap(model, tap, channels)
    csflm = CSFLM(channels, embed_dim, None if fusion == "loss_only" else fusion, margins, fusion_init)
    criterion = Eq7Loss(
        num_classes,
        embed_dim,
        csflm_supervision,
        seg_loss,
        ohem=ohem,
        thresh=thresh,
        min_kept=min_kept,
        loss_weights=loss_weights,
        binary=binary,
        delta=delta,
        ignore_index=ignore_index,
    )
    param = next(model.parameters(), None)
    if param is not None:
        csflm.to(device=param.device, dtype=param.dtype)
        criterion.to(device=param.device, dtype=param.dtype)  # the mask head, with "mask"
    if outputs is not None and not callable(outputs):
        raise PlugTypeError(
            f"add_csflm: outputs must be a callable picking the logits from the model's output, got "
            f"{type(outputs).__name__}"
        )
    plug = CSFLMPlug(model, csflm, name, fusion, criterion, channels, outputs)
    return plug.train(model.training)


def model_logits(model, x):
    """Logits [N, K, H, W] at the size of ``x`` of any csfrn model: ``model.segment(x)`` for a plugged model
    (:class:`CSFLMPlug`, whose own outputs follow the wrapped model's convention), else ``model(x)``."""
    segment = getattr(model, "segment", None)
    return segment(x) if callable(segment) else model(x)
