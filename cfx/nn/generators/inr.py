"""The INR prior: a SIREN on Gaussian Fourier features of the pixel coordinates, batched over queries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cfx.nn.generators.base import BatchedGenerator


class BatchedLinear(nn.Module):
    """Q independent linear maps ``h @ W_q + b_q`` (``W`` stacked as ``(Q, in, out)``), applied with ``baddbmm``.

    Weights are drawn from U(-weight_bound, weight_bound), biases from U(-bias_bound, bias_bound).
    """

    def __init__(self, num_queries: int, in_features: int, out_features: int, weight_bound: float, bias_bound: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_queries, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_queries, out_features))
        self.weight_bound = weight_bound
        self.bias_bound = bias_bound

    def init_query_(self, q: int, generator: torch.Generator) -> None:
        self.weight.data[q].uniform_(-self.weight_bound, self.weight_bound, generator=generator)
        self.bias.data[q].uniform_(-self.bias_bound, self.bias_bound, generator=generator)

    def forward(self, inputs: Tensor, scale: float = 1.0) -> Tensor:
        """Map ``(Q, N, in)`` to ``scale * (inputs @ W + b)``, shape ``(Q, N, out)``.

        The scale multiplies the (smaller) weights rather than the ``(Q, N, out)`` result: the same function and
        gradients with two fewer passes over the activations.
        """
        return torch.baddbmm(scale * self.bias.unsqueeze(1), inputs, scale * self.weight)


def pixel_coordinates(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """The ``(H * W, 2)`` (row, column) coordinates in [0, 1] of an ``H x W`` grid, row-major."""
    rows = torch.linspace(0.0, 1.0, height, device=device)
    columns = torch.linspace(0.0, 1.0, width, device=device)
    return torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).reshape(-1, 2)


class INRGenerator(BatchedGenerator):
    """DISC's INR prior: ``x(v) = sigmoid(W_out h_L(v) + b_out)`` over the pixel coordinates ``v in [0, 1]^2``.

    ``z(v) = [cos 2 pi B v, sin 2 pi B v]`` with ``B`` (``num_frequencies x 2``, per query) ~ N(0, sigma^2) fixed
    (a buffer); ``h_1 = sin(omega_0 (W_1 z + b_1))``, ``h_l = sin(omega_0 (W_l h_{l-1} + b_l))`` for ``depth``
    sine layers of ``width`` units; a linear output to C channels and a sigmoid keep the image in [0, 1].
    SIREN initialisation: first layer weights U(-1/in, 1/in), later layers (and the output layer, as in the
    SIREN code) U(-sqrt(6/in)/omega_0, sqrt(6/in)/omega_0); biases U(-1/sqrt(in), 1/sqrt(in)) (the
    ``nn.Linear`` default the SIREN code keeps). Fourier features and sine arguments are computed in float32
    even under autocast (bf16 cannot resolve phases of tens of radians). The features are fixed, so they are
    computed once and kept as a non-persistent buffer ``features`` (``Q x H*W x 2*num_frequencies`` floats).

    Layer groups: one per sine layer, then the output layer (``depth + 1`` groups).

    Args:
        num_queries: Q.
        channels: image channels C.
        image_size: H (= W) or ``(H, W)``.
        seeds: ``(Q,)`` integer seeds.
        num_frequencies: Gaussian frequencies (256; the features have twice as many dimensions).
        sigma: standard deviation of the frequencies (10, i.e. variance 100).
        width: units per sine layer (256).
        depth: number of sine layers (3).
        omega_0: SIREN frequency factor (30).
        tv_weight: optional TV weight (0).
        l2_weight: optional squared-L2 weight (0).
        tv_beta: TV exponent.
    """

    def __init__(
        self,
        num_queries: int,
        channels: int,
        image_size: int | Sequence[int],
        seeds: Tensor,
        num_frequencies: int = 256,
        sigma: float = 10.0,
        width: int = 256,
        depth: int = 3,
        omega_0: float = 30.0,
        tv_weight: float = 0.0,
        l2_weight: float = 0.0,
        tv_beta: float = 2.0,
    ):
        super().__init__(num_queries, channels, image_size, seeds, tv_weight, l2_weight, tv_beta)
        if num_frequencies < 1 or width < 1 or depth < 1 or sigma <= 0 or omega_0 <= 0:
            raise ValueError(
                "expected num_frequencies, width, depth >= 1 and sigma, omega_0 > 0, got "
                f"{num_frequencies}, {width}, {depth}, {sigma}, {omega_0}"
            )
        self.sigma = float(sigma)
        self.omega_0 = float(omega_0)
        self.register_buffer("frequencies", torch.empty(num_queries, num_frequencies, 2))
        in_features = 2 * num_frequencies
        later_bound = math.sqrt(6 / width) / omega_0
        self.sine_layers = nn.ModuleList(
            [BatchedLinear(num_queries, in_features, width, 1 / in_features, 1 / math.sqrt(in_features))]
            + [BatchedLinear(num_queries, width, width, later_bound, 1 / math.sqrt(width)) for _ in range(depth - 1)]
        )
        self.output = BatchedLinear(num_queries, width, channels, later_bound, 1 / math.sqrt(width))
        self.initialize_queries()
        self.register_buffer("features", self.fourier_features(), persistent=False)

    def init_query_(self, q: int, generator: torch.Generator) -> None:
        self.frequencies[q] = torch.randn(self.frequencies.shape[1:], generator=generator) * self.sigma

    def fourier_features(self) -> Tensor:
        """The ``(Q, H * W, 2 * num_frequencies)`` features ``[cos 2 pi B v, sin 2 pi B v]`` (float32)."""
        coordinates = pixel_coordinates(*self.image_size, device=self.frequencies.device)
        with torch.autocast(self.frequencies.device.type, enabled=False):
            phases = 2 * math.pi * torch.einsum("nd,qfd->qnf", coordinates, self.frequencies.float())
            return torch.cat([phases.cos(), phases.sin()], dim=-1)

    def forward(self) -> Tensor:
        hidden = self.features
        for layer in self.sine_layers:
            hidden = torch.sin(layer(hidden, self.omega_0).float())
        values = torch.sigmoid(self.output(hidden).float())
        return values.transpose(1, 2).reshape(self.num_queries, self.channels, *self.image_size)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return [list(layer.parameters()) for layer in [*self.sine_layers, self.output]]
