"""The AnoGAN realism score: functional (against a per-image, per-restart loop and closed forms) and metric class."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from cfx.metrics.anogan import AnoGANScore
from cfx.metrics.functional.anogan import anogan_score, check_anogan_settings
from cfx.nn.generative import WGANCritic, WGANGenerator
from cfx.seeding import per_sample_seed, torch_generator
from tests.distributed import run_distributed

SETTINGS = {"steps": 12, "step_size": 0.05, "decay_fraction": 0.25, "decay_factor": 0.1, "restarts": 3}


class TinyGenerator(nn.Module):
    """z (3) -> Linear -> batch norm (running statistics in eval mode) -> tanh -> Linear -> sigmoid, 1 x 4 x 4."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.latent_dim, self.out_channels, self.image_size = 3, 1, 4
        self.layers = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 16), nn.Sigmoid())
        with torch.no_grad():
            self.layers[1].running_mean.uniform_(-0.5, 0.5)
            self.layers[1].running_var.uniform_(0.5, 2.0)
        self.double()

    def forward(self, latents: Tensor) -> Tensor:
        return self.layers(latents).view(-1, 1, 4, 4)


class TinyCritic(nn.Module):
    """``features``: a 3x3 convolution to 2 channels (1 x 4 x 4 images)."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.image_size = 1, 4
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.double()

    def features(self, images: Tensor) -> Tensor:
        return self.conv(images)


class LinearGenerator(nn.Module):
    """``G(z) = A z + b`` (not squashed): with ``x - G(z) > 0`` throughout, the L1 gradient is constant."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.latent_dim, self.out_channels, self.image_size = weight.shape[1], 1, 2
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, latents: Tensor) -> Tensor:
        return (latents @ self.weight.T + self.bias).view(-1, 1, 2, 2)


class IdentityCritic(nn.Module):
    """``f(x) = x``."""

    in_channels, image_size = 1, 2

    def features(self, images: Tensor) -> Tensor:
        return images


def _images(count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 1, 4, 4, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 10_000, (count,), generator=generator)


def _reference_loss(image: Tensor, latent: Tensor, generator: nn.Module, critic: nn.Module, weight: float) -> Tensor:
    made = generator(latent)
    pixels = (image - made[0]).abs().sum()
    return pixels + weight * (critic.features(image[None]) - critic.features(made)).abs().sum()


def _reference_score(image: Tensor, index: int, generator: nn.Module, critic: nn.Module, settings: dict) -> float:
    """One image's score: a loop over restarts, each its own SGD run on one latent with the step-size schedule."""
    steps, restarts = settings["steps"], settings["restarts"]
    weight = settings.get("feature_weight", 0.1)
    decayed = round(settings["decay_fraction"] * steps)
    generator.eval(), critic.eval()
    draws = torch.randn(
        restarts, generator.latent_dim, generator=torch_generator(per_sample_seed(torch.tensor([index]))[0]),
        dtype=torch.float64,
    )  # fmt: skip
    finals = []
    for restart in range(restarts):
        latent = draws[restart : restart + 1].clone().requires_grad_(True)
        optimizer = torch.optim.SGD([latent], lr=settings["step_size"])

        for step in range(steps):
            for group in optimizer.param_groups:  # the schedule restarts with each restart
                group["lr"] = settings["step_size"] * (settings["decay_factor"] if step >= steps - decayed else 1.0)
            optimizer.zero_grad()
            _reference_loss(image, latent, generator, critic, weight).backward()
            optimizer.step()
        with torch.no_grad():
            finals.append(_reference_loss(image, latent, generator, critic, weight).item())
    return min(finals)


def test_score_equals_a_per_image_per_restart_loop():
    generator, critic = TinyGenerator().train(), TinyCritic().eval()
    parameters = {name: value.clone() for name, value in generator.state_dict().items()}
    images, indices = _images(5)
    scores = anogan_score(images, indices, generator, critic, **SETTINGS)
    assert generator.training and not critic.training  # modes restored
    assert all(torch.equal(value, parameters[name]) for name, value in generator.state_dict().items())
    assert all(parameter.grad is None for parameter in (*generator.parameters(), *critic.parameters()))
    expected = [_reference_score(images[i], int(indices[i]), generator, critic, SETTINGS) for i in range(5)]
    assert scores.dtype == torch.float64 and scores.shape == (5,)
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)
    unoptimised = anogan_score(images, indices, generator, critic, **{**SETTINGS, "steps": 0})
    assert (scores < unoptimised).all()  # the steps improve every image's reconstruction


def test_score_does_not_depend_on_the_batch():
    generator, critic = TinyGenerator(), TinyCritic()
    images, indices = _images(6, seed=2)
    batch = anogan_score(images, indices, generator, critic, **SETTINGS)
    singles = torch.cat(
        [anogan_score(images[i : i + 1], indices[i : i + 1], generator, critic, **SETTINGS) for i in range(6)]
    )
    order = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    permuted = anogan_score(images[order], indices[order], generator, critic, **SETTINGS)
    torch.testing.assert_close(batch, singles, rtol=1e-12, atol=0)
    torch.testing.assert_close(permuted, batch[order], rtol=1e-12, atol=0)
    other_seed = anogan_score(images, indices, generator, critic, **SETTINGS, seed=1)
    assert not torch.allclose(other_seed, batch, rtol=1e-6, atol=0)  # the restarts come from the seeds


def test_the_deduce_wgan_scores_batch_invariantly_in_float32():
    torch.manual_seed(0)
    generator, critic = WGANGenerator(), WGANCritic()
    images = torch.rand(3, 1, 28, 28)
    indices = torch.tensor([4, 0, 17])
    settings = {"steps": 3, "restarts": 2}
    batch = anogan_score(images, indices, generator, critic, **settings)
    singles = torch.cat(
        [anogan_score(images[i : i + 1], indices[i : i + 1], generator, critic, **settings) for i in range(3)]
    )
    assert batch.dtype == torch.float32 and torch.isfinite(batch).all()
    torch.testing.assert_close(batch, singles, rtol=1e-4, atol=0)


@pytest.mark.parametrize("restarts", [1, 3])
def test_step_size_schedule_follows_the_closed_form(restarts):
    """With ``x - G(z) > 0`` everywhere the gradient is the constant ``-(1 + w) A^T 1``, so every restart ends at
    ``z0 + (1 + w) A^T 1 (step (n - d) + step * factor * d)``: the full schedule, at every restart."""
    generator_random = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 2, generator=generator_random, dtype=torch.float64)
    bias = torch.full((4,), -100.0, dtype=torch.float64)  # G(z) far below the image
    generator, critic = LinearGenerator(weight, bias), IdentityCritic()
    images, indices = torch.ones(2, 1, 2, 2, dtype=torch.float64), torch.tensor([3, 8])
    steps, step_size, decay_fraction, factor, feature_weight = 10, 0.01, 0.3, 0.1, 0.5
    scores = anogan_score(
        images, indices, generator, critic, steps=steps, step_size=step_size, decay_fraction=decay_fraction,
        decay_factor=factor, restarts=restarts, feature_weight=feature_weight,
    )  # fmt: skip
    travelled = step_size * (7 + factor * 3)  # 3 = round(0.3 * 10) decayed steps
    direction = (1 + feature_weight) * weight.T @ torch.ones(4, dtype=torch.float64)
    expected = []
    for index in indices.tolist():
        starts = torch.randn(
            restarts, 2, generator=torch_generator(per_sample_seed(torch.tensor([index]))[0]), dtype=torch.float64
        )
        finals = starts + travelled * direction
        residual = 1 - (finals @ weight.T + bias)  # (restarts, 4), all positive
        assert (residual > 0).all()
        expected.append(((1 + feature_weight) * residual.sum(dim=1)).min())
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-12, atol=0)


def test_bad_inputs_are_clear_errors():
    generator, critic = TinyGenerator(), TinyCritic()
    images, indices = _images(2)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 4, 4\)"):
        anogan_score(images[:, :, :3], indices, generator, critic, steps=1)
    with pytest.raises(ValueError, match="empty batch"):
        anogan_score(images[:0], indices[:0], generator, critic, steps=1)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values in \[0\.\d+, 1\.\d+\]"):
        anogan_score(images + 0.5, indices, generator, critic, steps=1)
    with pytest.raises(ValueError, match="NaN"):
        anogan_score(torch.full_like(images, float("nan")), indices, generator, critic, steps=1)
    with pytest.raises(ValueError, match="floating-point"):
        anogan_score(images.long(), indices, generator, critic, steps=1)
    with pytest.raises(ValueError, match=r"expected \(2,\) dataset indices"):
        anogan_score(images, indices[:1], generator, critic, steps=1)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1.*decay_fraction must be in"):
        anogan_score(images, indices, generator, critic, restarts=0, decay_fraction=1.5)
    featureless = nn.Identity()
    featureless.in_channels, featureless.image_size = 1, 4
    with pytest.raises(TypeError, match=r"missing \['critic.features'\]"):
        anogan_score(images, indices, generator, featureless, steps=1)
    mismatched = TinyCritic()
    mismatched.image_size = 8
    with pytest.raises(
        ValueError, match="the generator makes 1-channel 4 px images, the critic expects 1-channel 8 px"
    ):
        anogan_score(images, indices, generator, mismatched, steps=1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        anogan_score(images, indices, generator, critic, steps=1)
    with pytest.raises(ValueError, match=r"the AnoGAN settings are \['steps', .*unknown \['step'\]"):
        check_anogan_settings({"step": 3})
    with pytest.raises(ValueError, match="step_size must be finite and > 0"):
        AnoGANScore(generator, critic, step_size=-1.0)


def test_metric_mean_and_kept_scores_over_batches():
    generator, critic = TinyGenerator(), TinyCritic()
    images, indices = _images(7, seed=4)
    expected = anogan_score(images, indices, generator, critic, **SETTINGS)
    metric = AnoGANScore(generator, critic, keep_scores=True, **SETTINGS)
    for start in range(0, 7, 3):
        metric.update(images[start : start + 3], indices[start : start + 3])
    assert metric.compute().item() == pytest.approx(expected.mean().item(), rel=1e-12)
    scores, sorted_indices = metric.scores()
    order = torch.argsort(indices)
    assert torch.equal(sorted_indices, indices[order])
    torch.testing.assert_close(scores, expected[order], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="keep_scores=True"):
        AnoGANScore(generator, critic).scores()


def _metric_on_rank(rank: int, world_size: int) -> tuple[float, Tensor, Tensor]:
    """Each process scores every ``world_size``-th image (rank 1 of 2 one fewer: 7 images), in batches of 2."""
    images, indices = _images(7, seed=5)
    metric = AnoGANScore(TinyGenerator(), TinyCritic(), keep_scores=True, **SETTINGS)
    mine = torch.arange(rank, 7, world_size)
    for start in range(0, len(mine), 2):
        rows = mine[start : start + 2]
        metric.update(images[rows], indices[rows])
    scores, sorted_indices = metric.scores()
    return metric.compute().item(), scores, sorted_indices


@pytest.mark.ddp
def test_two_process_metric_equals_one_process():
    mean, scores, indices = _metric_on_rank(0, 1)
    for rank_mean, rank_scores, rank_indices in run_distributed(_metric_on_rank, world_size=2):
        assert rank_mean == pytest.approx(mean, rel=1e-12)
        assert torch.equal(rank_indices, indices)
        torch.testing.assert_close(rank_scores, scores, rtol=1e-12, atol=0)
