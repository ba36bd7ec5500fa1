"""Pure-torch networks: classifiers and the models explainers build on (no Lightning import)."""

from cfx.nn.classifier import FeatureClassifier
from cfx.nn.cnn import SmallCNN
from cfx.nn.resnet import ResNet
from cfx.nn.spectral import SoftSpectralNorm, apply_soft_spectral_norm
from cfx.nn.timm_model import TimmClassifier

__all__ = [
    "FeatureClassifier",
    "ResNet",
    "SmallCNN",
    "SoftSpectralNorm",
    "TimmClassifier",
    "apply_soft_spectral_norm",
]
