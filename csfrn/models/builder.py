"""``build_model``: one call from names and numbers to a CSFRN segmentor."""

from typing import Mapping, Optional, Sequence

from ..losses import Eq7Loss
from ..nn import CSFLM
from .backbones import build_backbone
from .heads import HEADS, AuxHead, DeepLabV3PlusHead
from .segmentor import CSFRN

# ASPP rates per output stride (DeepLabv3+: 6/12/18 at stride 16, doubled at stride 8).
ASPP_DILATIONS = {8: (12, 24, 36), 16: (6, 12, 18)}


def build_model(
    head: str,
    num_classes: int,
    backbone: str = "resnet50c",
    csflm: bool = True,
    fusion: str = "aam",
    embed_dim: int = 32,
    margins: bool = True,
    aux: bool = True,
    output_stride: int = 8,
    multi_grid: bool = False,
    pretrained: Optional[str] = None,
    *,
    width: int = 64,
    blocks: Optional[Sequence[int]] = None,
    channels: int = 512,
    aux_channels: int = 256,
    ohem: bool = False,
    thresh: float = 0.7,
    min_kept: int = 100000,
    loss_weights: Optional[Mapping[str, float]] = None,
    binary: str = "lovasz",
    delta: float = 10.0,
    fusion_init: str = "identity",
    csflm_supervision: str = "cac",
    ignore_index: int = 255,
) -> CSFRN:
    """Build a CSFRN segmentor (or, with ``csflm=False``, the plain head baseline).

    Args:
        head: "fcn", "psp", "nonlocal" or "deeplabv3plus".
        num_classes: number of classes.
        backbone: "resnet50", "resnet101" (torchvision stem) or "resnet50c", "resnet101c" (deep stem), or
            "timm:<name>": timm's model ``name`` (``pip install -e .[timm]``) at the output stride, its four deepest
            feature maps in the places of the ResNet stages (see ``TimmBackbone``; no width / blocks / multi_grid).
        csflm: add CSFLM after the head's context module.
        fusion: "aam" (full CSFRN) or "concat" (the paper's "+CSFLM" ablation).
        embed_dim: width of the C-S features (8 / 16 / 32 / 64).
        margins: learn class margins (False: fixed margin 0, paper Table 5).
        aux: auxiliary FCN head on stage 3 (loss weight 0.4).
        output_stride: 8 (paper) or 16.
        multi_grid: layer4 dilations (1, 2, 4) x base.
        pretrained: local ImageNet checkpoint for the backbone (torchvision, timm or mmseg key names; for a
            timm backbone a timm / torchvision ``.pth`` or ``.safetensors`` file of that model, loaded by timm);
            the load report is kept in ``model.pretrained_report``.
        width, blocks: narrow / shallow backbones for small experiments (64 and the named depth by default).
        channels: head and CSFLM width (512); aux_channels: aux head width (256).
        ohem, thresh, min_kept: OHEM cross-entropy for the segmentation loss.
        loss_weights: overrides of {"seg": 1.0, "aux": 0.4, "cac": 0.2, "smooth": 0.2}.
        binary, delta: the CAC loss's binary loss ("lovasz" or "bce") and margin temperature.
        fusion_init: "identity" (CSFLM's fusion starts as the identity on A: F = ReLU(BN(A)) at step 0) or
            "random" (nn.Conv2d's default init).
        csflm_supervision: "cac" (the paper's CAC + smoothness losses) or "mask" (Table 4's "+Aux Loss" row: a
            1x1 classifier on the embeddings B, supervised by Lovasz-softmax on the class mask at B's size,
            weighted as the CAC loss; no CAC or smoothness loss). See ``csfrn.losses.Eq7Loss``.
        ignore_index: the label value of unlabelled pixels.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    if output_stride not in ASPP_DILATIONS:
        raise ValueError(f"output_stride must be one of {sorted(ASPP_DILATIONS)}, got {output_stride}")
    net, report = build_backbone(
        backbone, output_stride=output_stride, multi_grid=multi_grid, width=width, blocks=blocks, pretrained=pretrained
    )
    if head == "deeplabv3plus":
        decode = DeepLabV3PlusHead(net.out_channels, num_classes, channels, ASPP_DILATIONS[output_stride])
    else:
        decode = HEADS[head](net.out_channels, num_classes, channels)
    module = CSFLM(channels, embed_dim, fusion, margins, fusion_init) if csflm else None
    aux_head = AuxHead(net.out_channels[2], num_classes, aux_channels) if aux else None
    criterion = Eq7Loss(
        num_classes,
        embed_dim if csflm else None,
        csflm_supervision,
        ohem=ohem,
        thresh=thresh,
        min_kept=min_kept,
        loss_weights=loss_weights,
        binary=binary,
        delta=delta,
        ignore_index=ignore_index,
    )
    model = CSFRN(net, decode, module, aux_head, criterion)
    model.pretrained_report = report
    return model
