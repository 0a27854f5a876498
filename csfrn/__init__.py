"""CSFRN: Consistent-Separable Feature Representation for Semantic Segmentation (AAAI 2021)."""
__version__ = "0.1.0"
