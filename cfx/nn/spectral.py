"""Soft spectral normalisation: ``W / max(1, sigma(W) / c)`` with one power iteration per training step.

torch's ``parametrizations.spectral_norm`` is the hard version (``c = 1``, always divides by sigma). DDU and
DeDUCE use the soft version, which only shrinks a layer whose largest singular value exceeds ``c``; this
bounds the layer's Lipschitz constant by ``c`` while leaving well-conditioned layers untouched.
The spectral norm is that of the weight reshaped to ``(out, -1)``, as in torch's implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class SoftSpectralNorm(nn.Module):
    """Parametrization dividing a weight by ``max(1, sigma / coeff)``.

    Args:
        weight: the weight the parametrization is registered on (used for shapes and the initial vectors).
        coeff: the Lipschitz bound ``c``; DDU/DeDUCE use 4 (REFERENCE.md).
        n_power_iterations: power iterations per training-mode forward.
        eps: numerical floor for the vector normalisation.
    """

    def __init__(self, weight: Tensor, coeff: float = 4.0, n_power_iterations: int = 1, eps: float = 1e-12):
        super().__init__()
        if coeff <= 0:
            raise ValueError(f"spectral-norm coefficient must be positive, got {coeff}")
        self.coeff = float(coeff)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = eps
        matrix = weight.detach().flatten(1)
        generator = torch.Generator().manual_seed(0)
        u = torch.randn(matrix.shape[0], generator=generator).to(matrix)
        v = torch.randn(matrix.shape[1], generator=generator).to(matrix)
        self.register_buffer("_u", nn.functional.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", nn.functional.normalize(v, dim=0, eps=eps))
        with torch.no_grad():
            self._power_iteration(matrix, 15)

    @torch.no_grad()
    def _power_iteration(self, matrix: Tensor, iterations: int) -> None:
        for _ in range(iterations):
            self._v.copy_(nn.functional.normalize(matrix.t() @ self._u, dim=0, eps=self.eps))
            self._u.copy_(nn.functional.normalize(matrix @ self._v, dim=0, eps=self.eps))

    def sigma(self, weight: Tensor) -> Tensor:
        """Largest singular value of ``weight`` as estimated from the current power-iteration vectors."""
        return torch.dot(self._u, weight.flatten(1) @ self._v)

    def forward(self, weight: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            self._power_iteration(weight.detach().flatten(1), self.n_power_iterations)
        factor = torch.clamp(self.sigma(weight) / self.coeff, min=1.0)
        return weight / factor


def apply_soft_spectral_norm(module: nn.Module, coeff: float = 4.0, n_power_iterations: int = 1) -> nn.Module:
    """Register :class:`SoftSpectralNorm` on the weight of every Conv and Linear layer of ``module``.

    Args:
        module: the network, changed in place.
        coeff: the Lipschitz bound ``c``.
        n_power_iterations: power iterations per training step.

    Returns:
        The same module, for chaining.
    """
    for layer in list(module.modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(layer, "weight"):
            parametrize.register_parametrization(
                layer, "weight", SoftSpectralNorm(layer.weight, coeff, n_power_iterations)
            )
    return module
