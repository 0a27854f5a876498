"""CSFLM, the Consistent-Separable Feature Learning Module (paper Figure 1)."""

from typing import NamedTuple, Optional

import torch
from torch import nn

from .aam import AAM
from .layers import ConvBNReLU

EMBED_DIMS = (8, 16, 32, 64)
FUSIONS = ("concat", "aam")
FUSION_INITS = ("identity", "random")


class CSFLMOutput(NamedTuple):
    features: torch.Tensor  # the fused features F that go on to the classifier (or decoder)
    embeddings: torch.Tensor  # B, the C-S features [N, D, h, w]
    margins: Optional[torch.Tensor]  # C, the margin map [N, 1, h, w]; None when margins are switched off


class CSFLM(nn.Module):
    """Learns consistent-separable (C-S) features from a head's features A and fuses them back in.

    A' = conv3x3(A) + BN + ReLU; B = conv1x1(A') -> embeddings; C = conv1x1(A') -> one-channel margin map.
    Fusion "concat": conv1x1(concat[A, B]) + BN + ReLU (the paper's "+CSFLM" ablation rows); "aam": the
    Adaptive Aggregation Module with X = B, Y = A; None: no fusion (``features`` is A itself and the module
    has no fusion layers), for CSFLM run only to feed the losses (``csfrn.models.add_csflm(fusion="loss_only")``).

    The module makes features only. The class centres s_k and margins m_k (one ``class_avg_pool`` call over
    B and C stacked) and the distances phi (``center_distance``) are made by ``csfrn.losses.CACLoss`` from
    ``embeddings`` / ``margins`` during training; inference needs neither labels nor centres.

    Choices the paper leaves open: the embedding and margin convs have biases (no BN follows them); the
    margin conv starts at zero, so every margin starts at m = 0 and phi's scale exp(delta * m) at 1, rather
    than at a random exp(+-10 * O(1)) that saturates phi (SpatialEmbeddings also initialises its sigma
    output to a constant).

    The fusion starts as the identity on A (``fusion_init="identity"``, the default): the 1x1 fuse conv's
    weights are [I on A's channels, 0 on B's] (with AAM, its 3x3 deformable convs start as Dirac kernels too),
    so at step 0 F = ReLU(BN(A)) and the network is the head it was plugged into; B enters as training moves
    those weights. The paper presents CSFLM as a module plugged into strong baselines ("We plug CSFLM after
    PPM, Non-local block and ASPP"), and the DCN it builds AAM on starts its offsets at zero for the same
    reason (the module starts as the plain network); Net2Net (Chen, Goodfellow and Shlens, ICLR 2016) starts
    inserted layers as the identity. With random weights (``"random"``, nn.Conv2d's default) F is nearly
    uncorrelated with A at step 0 (correlation 0.05 with AAM at the demo scale), and on the synthetic val
    split that cost about 1.5 points of mIoU (benchmarks/diagnose_csflm.py; docs/evidence.md).

    Args:
        channels: channels of A (and of the output), 512 in the paper.
        embed_dim: width D of the C-S features (8, 16, 32 or 64; 32 in the paper).
        fusion: "concat", "aam" or None (no fusion).
        margins: learn the margin map; False fixes every margin at 0 (paper Table 5).
        fusion_init: "identity" (F = ReLU(BN(A)) at step 0) or "random" (nn.Conv2d's default init).
    """

    def __init__(
        self,
        channels: int = 512,
        embed_dim: int = 32,
        fusion: Optional[str] = "aam",
        margins: bool = True,
        fusion_init: str = "identity",
    ):
        super().__init__()
        if fusion is not None and fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {list(FUSIONS)} or None")
        if fusion_init not in FUSION_INITS:
            raise ValueError(f"unknown fusion_init {fusion_init!r}; choose one of {list(FUSION_INITS)}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1 (the paper uses {EMBED_DIMS}), got {embed_dim}")
        self.fusion = fusion
        self.conv = ConvBNReLU(channels, channels, 3)
        self.embed = nn.Conv2d(channels, embed_dim, 1)
        self.margin = nn.Conv2d(channels, 1, 1) if margins else None
        if fusion is None:
            self.fuse = None
        elif fusion == "concat":
            self.fuse = ConvBNReLU(channels + embed_dim, channels, 1)
        else:
            self.fuse = AAM(embed_dim, channels, channels)
        if self.margin is not None:
            nn.init.zeros_(self.margin.weight)
            nn.init.zeros_(self.margin.bias)
        if fusion_init == "identity" and self.fuse is not None:
            self._identity_fusion(channels, embed_dim)

    @torch.no_grad()
    def _identity_fusion(self, channels, embed_dim):
        if self.fusion == "concat":  # input [A, B]
            weight = self.fuse[0].weight
            weight.zero_()
            weight[:, :channels, 0, 0] = torch.eye(channels)
        else:  # AAM: input [X' = deform(B), Y' = deform(A)]
            nn.init.dirac_(self.fuse.weight_x)
            nn.init.dirac_(self.fuse.weight_y)
            weight = self.fuse.fuse[0].weight
            weight.zero_()
            weight[:, embed_dim:, 0, 0] = torch.eye(channels)

    def forward(self, a: torch.Tensor) -> CSFLMOutput:
        a2 = self.conv(a)
        b = self.embed(a2)
        c = self.margin(a2) if self.margin is not None else None
        if self.fuse is None:
            f = a
        elif self.fusion == "concat":
            f = self.fuse(torch.cat([a, b], dim=1))
        else:
            f = self.fuse(b, a)
        return CSFLMOutput(f, b, c)
