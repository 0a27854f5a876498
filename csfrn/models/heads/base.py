"""What every decode head shares: a context part, an optional decoder and a dropout + 1x1 classifier.

A segmentor runs ``a = head.context(feats)`` (the head's ``channels``-wide feature at the backbone's output
stride), optionally replaces ``a`` by CSFLM's fused features, then ``head.classify(head.decode(a, feats))``.
"""

from torch import nn


class DecodeHead(nn.Module):
    def __init__(self, channels, num_classes, dropout=0.1):
        super().__init__()
        self.channels = channels
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def context(self, feats):
        raise NotImplementedError

    def decode(self, a, feats):
        """Everything between the context feature and the classifier; nothing for single-scale heads."""
        return a

    def classify(self, x):
        return self.conv_seg(self.dropout(x))

    def forward(self, feats):
        return self.classify(self.decode(self.context(feats), feats))
