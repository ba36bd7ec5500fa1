"""LightningModules: thin training / evaluation wrappers around the pure-torch models in cfx.nn."""

from cfx.tasks.attgan import AttGANTask
from cfx.tasks.base import CfxTask
from cfx.tasks.classification import (
    ClassificationTask,
    check_data_matches,
    load_classifier,
    load_task,
    read_checkpoint,
)
from cfx.tasks.counterfactual import CounterfactualTask
from cfx.tasks.ddu import FitClassGaussians, fit_and_save_class_gaussians, load_classifier_and_gaussians
from cfx.tasks.dep import DEPTask
from cfx.tasks.discrepancy import DiscrepancyResult, classifier_discrepancy
from cfx.tasks.duq import DUQTask, load_duq_classifier
from cfx.tasks.generative import AutoencoderTask, GANTask, VAETask, load_generative

__all__ = [
    "AttGANTask",
    "AutoencoderTask",
    "CfxTask",
    "ClassificationTask",
    "CounterfactualTask",
    "DEPTask",
    "DUQTask",
    "DiscrepancyResult",
    "FitClassGaussians",
    "GANTask",
    "VAETask",
    "check_data_matches",
    "classifier_discrepancy",
    "fit_and_save_class_gaussians",
    "load_classifier",
    "load_classifier_and_gaussians",
    "load_duq_classifier",
    "load_generative",
    "load_task",
    "read_checkpoint",
]
