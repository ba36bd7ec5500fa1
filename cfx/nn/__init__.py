"""Pure-torch networks: classifiers and the models explainers build on (no Lightning import)."""

from cfx.nn.adapter import ModuleClassifier, as_classifier
from cfx.nn.classifier import FeatureClassifier
from cfx.nn.cnn import SmallCNN
from cfx.nn.duq import (
    DUQClassifier,
    DUQFeatureClassifier,
    DUQHead,
    duq_uncertainty,
    gradient_penalty,
    kernel_margin_loss,
)
from cfx.nn.gaussian import ClassGaussians, class_feature_statistics, fit_class_gaussians
from cfx.nn.generative import GAN, ConvAutoencoder, ConvVAE, WGANCritic, WGANGenerator
from cfx.nn.loss_predictor import LossPredictingClassifier, LossPredictor, pairwise_ranking_loss
from cfx.nn.resnet import ResNet
from cfx.nn.spectral import SoftSpectralNorm, apply_soft_spectral_norm
from cfx.nn.timm_model import TimmClassifier

__all__ = [
    "ClassGaussians",
    "ConvAutoencoder",
    "ConvVAE",
    "DUQClassifier",
    "DUQFeatureClassifier",
    "DUQHead",
    "FeatureClassifier",
    "GAN",
    "LossPredictingClassifier",
    "LossPredictor",
    "ModuleClassifier",
    "ResNet",
    "SmallCNN",
    "SoftSpectralNorm",
    "TimmClassifier",
    "WGANCritic",
    "WGANGenerator",
    "apply_soft_spectral_norm",
    "as_classifier",
    "class_feature_statistics",
    "duq_uncertainty",
    "fit_class_gaussians",
    "gradient_penalty",
    "kernel_margin_loss",
    "pairwise_ranking_loss",
]
