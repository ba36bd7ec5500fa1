"""Counterfactual explainers (pure torch): ``Method(classifier, ...).explain(images, targets)``."""

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.counterfactual.deduce import DeDUCE
from cfx.counterfactual.disc import DISC
from cfx.counterfactual.jsma import JSMA
from cfx.counterfactual.wachter import Wachter

__all__ = ["DISC", "JSMA", "CounterfactualResult", "DeDUCE", "Explainer", "Wachter"]
