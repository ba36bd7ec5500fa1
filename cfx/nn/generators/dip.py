"""The deep image prior: Ulyanov et al.'s "skip" encoder-decoder on a fixed noise image, batched over queries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cfx.nn.generators.base import BatchedGenerator


class GroupedConv2d(nn.Module):
    """Q independent convolutions as one grouped convolution (``groups=Q``), reflection padding ``kernel // 2``.

    Weights ``(Q, out, in, k, k)`` and biases ``(Q, out)`` (optional) are drawn from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the PyTorch default for ``nn.Conv2d``.
    """

    def __init__(
        self,
        num_queries: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_queries, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_queries, out_channels)) if bias else None
        self.stride = stride
        self.padding = kernel_size // 2

    def init_query_(self, q: int, generator: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.weight[0, 0].numel())
        self.weight.data[q].uniform_(-bound, bound, generator=generator)
        if self.bias is not None:
            self.bias.data[q].uniform_(-bound, bound, generator=generator)

    def forward(self, inputs: Tensor) -> Tensor:
        """Map ``(Q, in, H, W)`` to ``(Q, out, H', W')``."""
        queries, out_channels, in_channels = self.weight.shape[:3]
        if self.padding:
            inputs = F.pad(inputs, (self.padding,) * 4, mode="reflect")
        outputs = F.conv2d(
            inputs.reshape(1, queries * in_channels, *inputs.shape[2:]),
            self.weight.reshape(queries * out_channels, *self.weight.shape[2:]),
            None if self.bias is None else self.bias.reshape(-1),
            stride=self.stride,
            groups=queries,
        )
        return outputs.reshape(queries, out_channels, *outputs.shape[2:])


class InstanceNorm(nn.Module):
    """Per-image, per-channel normalisation over H x W with a per-query affine map ``(Q, C)`` (init 1 and 0).

    This is what DIP's BatchNorm computes on its batch of one image in training mode, without coupling queries.
    """

    def __init__(self, num_queries: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_queries, channels))
        self.bias = nn.Parameter(torch.zeros(num_queries, channels))

    def forward(self, inputs: Tensor) -> Tensor:
        return F.instance_norm(inputs) * self.weight[:, :, None, None] + self.bias[:, :, None, None]


class ConvBlock(nn.Module):
    """Grouped convolution, optional instance norm and LeakyReLU (no convolution bias before a norm: it cancels)."""

    def __init__(
        self,
        num_queries: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        norm: bool,
        negative_slope: float,
    ):
        super().__init__()
        self.conv = GroupedConv2d(num_queries, in_channels, out_channels, kernel_size, stride, bias=not norm)
        self.norm = InstanceNorm(num_queries, out_channels) if norm else None
        self.negative_slope = negative_slope

    def forward(self, inputs: Tensor) -> Tensor:
        outputs = self.conv(inputs)
        if self.norm is not None:
            outputs = self.norm(outputs)
        return F.leaky_relu(outputs, self.negative_slope)


def _per_level(value: int | Sequence[int], depth: int, name: str, minimum: int) -> list[int]:
    values = [int(value)] * depth if isinstance(value, int) else [int(v) for v in value]
    if len(values) != depth or min(values) < minimum:
        raise ValueError(f"expected {name} to be an int or {depth} ints >= {minimum}, got {value!r}")
    return values


class DIPGenerator(BatchedGenerator):
    """DISC's DIP prior: a U-Net "skip" network ``x = sigmoid(f_theta(z))`` on a fixed per-query noise image ``z``.

    ``z`` (``noise_channels x H x W``, a buffer) is drawn from U(-1, 1) and scaled by ``noise_scale`` (0.1, the
    DIP code's default scale). Level ``l`` (of ``depth``) with input ``u_l`` computes
    ``skip_l = block1x1(u_l)`` and ``d_l = block3x3(block3x3_stride2(u_l))``; the decoder upsamples the deeper
    result (``d_l`` at the last level) to ``u_l``'s size (interpolation to the skip size handles odd sizes:
    28 -> 14 -> 7 -> 4 and back), concatenates ``skip_l``, normalises, and applies a 3x3 then a 1x1 block;
    a final 1x1 convolution to C channels and a sigmoid give the image. Blocks are grouped convolution
    (reflection padding), instance norm and LeakyReLU(0.2). DIP's BatchNorm is replaced by a per-query instance
    norm (identical for DIP's one-image batches, without coupling the queries), or no norm (``norm=False``).

    Layer groups, from input to output: encoder level 1 (its down blocks and skip block), ..., encoder level
    ``depth``, decoder level ``depth``, ..., decoder level 1, output convolution (``2 * depth + 1`` groups).

    Args:
        num_queries: Q.
        channels: image channels C.
        image_size: H (= W) or ``(H, W)``.
        seeds: ``(Q,)`` integer seeds.
        depth: number of down/up levels (3 for 28x28).
        width: channels of each level's down and up blocks (an int or one per level; DIP uses 128).
        skip_channels: channels of each level's skip block (an int or one per level; 0 disables it; DIP uses 4).
        noise_channels: channels of the noise input (32, as in DIP).
        noise_scale: the noise is U(-noise_scale, noise_scale).
        upsample: interpolation mode ("bilinear" or "nearest").
        norm: use the per-query instance norm.
        negative_slope: LeakyReLU slope.
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
        depth: int = 3,
        width: int | Sequence[int] = 32,
        skip_channels: int | Sequence[int] = 4,
        noise_channels: int = 32,
        noise_scale: float = 0.1,
        upsample: str = "bilinear",
        norm: bool = True,
        negative_slope: float = 0.2,
        tv_weight: float = 0.0,
        l2_weight: float = 0.0,
        tv_beta: float = 2.0,
    ):
        super().__init__(num_queries, channels, image_size, seeds, tv_weight, l2_weight, tv_beta)
        if depth < 1 or noise_channels < 1 or noise_scale <= 0:
            raise ValueError(
                f"expected depth, noise_channels >= 1, noise_scale > 0, got {depth}, {noise_channels}, {noise_scale}"
            )
        if upsample not in ("bilinear", "nearest"):
            raise ValueError(f"expected upsample 'bilinear' or 'nearest', got {upsample!r}")
        widths = _per_level(width, depth, "width", 1)
        skips = _per_level(skip_channels, depth, "skip_channels", 0)
        if min(self.image_size) <= 2**depth:
            raise ValueError(f"image size {self.image_size} is too small for depth {depth}: need more than {2**depth}")
        self.noise_scale = float(noise_scale)
        self.upsample = upsample
        self.register_buffer("noise", torch.empty(num_queries, noise_channels, *self.image_size))
        q = num_queries
        self.skips = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.merge_norms = nn.ModuleList()
        self.ups = nn.ModuleList()
        in_channels = noise_channels
        for level in range(depth):
            width_l, skip_l = widths[level], skips[level]
            deeper = widths[level + 1] if level + 1 < depth else width_l
            self.skips.append(ConvBlock(q, in_channels, skip_l, 1, 1, norm, negative_slope) if skip_l else None)
            self.downs.append(
                nn.Sequential(
                    ConvBlock(q, in_channels, width_l, 3, 2, norm, negative_slope),
                    ConvBlock(q, width_l, width_l, 3, 1, norm, negative_slope),
                )
            )
            self.merge_norms.append(InstanceNorm(q, skip_l + deeper) if norm else None)
            self.ups.append(
                nn.Sequential(
                    ConvBlock(q, skip_l + deeper, width_l, 3, 1, norm, negative_slope),
                    ConvBlock(q, width_l, width_l, 1, 1, norm, negative_slope),
                )
            )
            in_channels = width_l
        self.output = GroupedConv2d(q, widths[0], channels, 1)
        self.initialize_queries()

    def init_query_(self, q: int, generator: torch.Generator) -> None:
        self.noise[q].uniform_(-self.noise_scale, self.noise_scale, generator=generator)

    def _level(self, level: int, inputs: Tensor) -> Tensor:
        deeper = self.downs[level](inputs)
        if level + 1 < len(self.downs):
            deeper = self._level(level + 1, deeper)
        align = False if self.upsample == "bilinear" else None
        merged = F.interpolate(deeper, size=inputs.shape[2:], mode=self.upsample, align_corners=align)
        if self.skips[level] is not None:
            merged = torch.cat([self.skips[level](inputs), merged], dim=1)
        if self.merge_norms[level] is not None:
            merged = self.merge_norms[level](merged)
        return self.ups[level](merged)

    def forward(self) -> Tensor:
        return torch.sigmoid(self.output(self._level(0, self.noise)).float())

    def layer_groups(self) -> list[list[nn.Parameter]]:
        encoders = [
            [
                *self.downs[level].parameters(),
                *(self.skips[level].parameters() if self.skips[level] is not None else []),
            ]
            for level in range(len(self.downs))
        ]
        decoders = [
            [
                *(self.merge_norms[level].parameters() if self.merge_norms[level] is not None else []),
                *self.ups[level].parameters(),
            ]
            for level in reversed(range(len(self.ups)))
        ]
        return [*encoders, *decoders, list(self.output.parameters())]
