"""Counterfactual explainers (pure torch): ``Method(classifier, ...).explain(images, targets)``."""

from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.counterfactual.deduce import DeDUCE
from cfx.counterfactual.disc import DISC
from cfx.counterfactual.introspection import GenerativeIntrospection
from cfx.counterfactual.jsma import JSMA
from cfx.counterfactual.revise import REVISE
from cfx.counterfactual.vlk import VLK
from cfx.counterfactual.wachter import Wachter

__all__ = [
    "DISC",
    "JSMA",
    "REVISE",
    "VLK",
    "CounterfactualResult",
    "DeDUCE",
    "Explainer",
    "GenerativeIntrospection",
    "Wachter",
]
