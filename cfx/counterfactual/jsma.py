"""JSMA as the DeDUCE paper uses it: single-pixel steepest steps on the target cross-entropy."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from cfx.counterfactual.iterative import PixelStepExplainer, select_pixels
from cfx.nn.classifier import FeatureClassifier


class JSMA(PixelStepExplainer):
    """Saliency-map pixel search on ``CE(f(x'), t)`` (Papernot et al.'s JSMA in the DeDUCE paper's variant).

    Each step picks the ``pixels_per_step`` values (over ``C * H * W``) with the largest ``|grad CE|`` among the
    eligible ones, moves them by ``step_size`` against the gradient sign and clips to [0, 1]. Eligibility: a
    pixel stops being eligible once a step of this search has left it at 0 or 1 (it was picked and, after
    clipping, sits on a bound). Pixels that *start* at 0 or 1 stay eligible until picked -- on MNIST most of the
    image starts at 0 and must be writable -- and a picked bound pixel whose move is clipped away (e.g. a 0 pushed
    down) is retired by the same rule, so the search never picks it again. No other limit on how often a pixel
    moves. A query stops when its target softmax reaches ``confidence`` (success) or after ``max_iterations``
    steps (failure; the last iterate is returned).

    Args:
        classifier: the model to explain (a ResNet without spectral normalisation in the paper).
        pixels_per_step: pixels moved per step (1 in the DeDUCE paper).
        step_size: the pixel change ``delta``.
        confidence: target probability at which a query succeeds.
        max_iterations: steps after which a query fails.
        path_every: record the iterates every this many steps in the result's ``path``.
        fold_batch_norm: search on a copy of the classifier with eval-mode batch norms folded into the
            convolutions (and soft spectral norm baked in): the same function up to rounding, faster.
        channels_last: channels-last copy and inputs (mainly for GPUs).
        compile: ``torch.compile`` the copy (dynamic shapes; pays a compilation on the first call).
        bfloat16: the copy under bfloat16 autocast (GPUs; counterfactuals change).
        stop_check_every: drop finished queries from the batch every this many steps (same results; fewer
            host synchronisations, for GPUs).
    """

    def __init__(
        self,
        classifier: FeatureClassifier,
        pixels_per_step: int = 1,
        step_size: float = 0.2,
        confidence: float = 0.5,
        max_iterations: int = 700,
        path_every: int | None = None,
        fold_batch_norm: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        bfloat16: bool = False,
        stop_check_every: int = 1,
    ):
        super().__init__(
            classifier,
            pixels_per_step,
            step_size,
            confidence,
            max_iterations,
            path_every,
            fold_batch_norm=fold_batch_norm,
            channels_last=channels_last,
            compile=compile,
            bfloat16=bfloat16,
            stop_check_every=stop_check_every,
        )

    def objective(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, CE(f(x'), t))`` per sample."""
        logits = self.search_network(images)
        return logits, F.cross_entropy(logits, targets, reduction="none")

    def initial_state(self, pixels: Tensor) -> dict[str, Tensor]:
        """No pixel retired yet."""
        return {"retired": torch.zeros_like(pixels, dtype=torch.bool)}

    def move(self, pixels: Tensor, gradient: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Move the non-retired pixels of largest ``|gradient|`` against its sign; retire those left on a bound."""
        chosen = select_pixels(gradient.abs(), ~state["retired"], self.pixels_per_step)
        moved = (pixels - self.step_size * gradient.sign() * chosen).clamp(0, 1)
        on_bound = (moved == 0) | (moved == 1)
        return moved, {"retired": state["retired"] | (chosen.bool() & on_bound)}
