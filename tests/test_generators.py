from __future__ import annotations

import math

import pytest
import torch

from cfx.counterfactual.search import narrow_optimizer_state
from cfx.nn.generators import (
    BatchedGenerator,
    INRGenerator,
    PixelGenerator,
    fit_reconstruction,
    make_generator,
    squared_l2,
    total_variation,
)

# small but structurally complete variants of each prior (28x28 exercises DIP's 28 -> 14 -> 7 -> 4 sizes)
SMALL = {
    "pixel": {},
    "dip": {"width": 8, "skip_channels": 2, "noise_channels": 4},
    "inr": {"width": 32, "num_frequencies": 16},
}


def digit_like(count: int) -> torch.Tensor:
    """Ring-and-stroke 28x28 images in [0, 1] with a black background, like MNIST digits."""
    rows, columns = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    images = []
    for q in range(count):
        radius = ((rows - 14) ** 2 + ((columns - 14) * (1.3 + 0.2 * q)) ** 2).sqrt()
        ring = torch.exp(-(((radius - 8) / 1.6) ** 2))
        stroke = torch.exp(-(((columns - 14 - 0.3 * (rows - 14)) / 1.2) ** 2)) * ((rows > 4) & (rows < 24))
        images.append((ring + q * stroke).clamp(0, 1)[None])
    return torch.stack(images)


def weighted_loss(images: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, images[0].numel()).reshape(images.shape[1:])
    return ((images * weights).sum() + images.square().sum()) / images[0].numel()


@pytest.mark.parametrize("kind", ["pixel", "dip", "inr"])
def test_batched_generator_equals_per_query_generators(kind):
    seeds = torch.tensor([5, 17, 3])
    batched = make_generator(kind, 3, 2, 28, seeds, **SMALL[kind])
    singles = [make_generator(kind, 1, 2, 28, seeds[q : q + 1], **SMALL[kind]) for q in range(3)]
    outputs = batched()
    assert outputs.shape == (3, 2, 28, 28) and 0 <= outputs.min() and outputs.max() <= 1
    weighted_loss(outputs).backward()
    for q, single in enumerate(singles):
        single_output = single()
        torch.testing.assert_close(outputs[q : q + 1], single_output, atol=1e-5, rtol=1e-5)
        weighted_loss(single_output).backward()
        for (name, parameter), single_parameter in zip(batched.named_parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(parameter[q : q + 1], single_parameter, atol=1e-5, rtol=1e-5, msg=name)
            torch.testing.assert_close(parameter.grad[q : q + 1], single_parameter.grad, atol=1e-5, rtol=1e-5, msg=name)
        for buffer, single_buffer in zip(batched.buffers(), single.buffers(), strict=True):
            torch.testing.assert_close(buffer[q : q + 1], single_buffer)


def test_fourier_features_and_siren_initialisation_follow_the_specification():
    generator = INRGenerator(40, 3, (6, 5), torch.arange(40), width=256, depth=3)
    frequencies = generator.frequencies
    assert frequencies.shape == (40, 256, 2)
    assert abs(frequencies.std().item() - 10.0) < 0.25 and abs(frequencies.mean().item()) < 0.25
    features = generator.fourier_features()
    assert features.shape == (40, 30, 512)
    # pixel (row 2, column 3) of a 6 x 5 grid sits at v = (2/5, 3/4)
    phase = 2 * math.pi * (frequencies[7, :, 0] * 2 / 5 + frequencies[7, :, 1] * 3 / 4)
    torch.testing.assert_close(features[7, 2 * 5 + 3], torch.cat([phase.cos(), phase.sin()]), atol=1e-4, rtol=0)

    first, second, third = generator.sine_layers
    assert first.weight.shape == (40, 512, 256) and second.weight.shape == (40, 256, 256)
    assert generator.output.weight.shape == (40, 256, 3)
    later_bound = math.sqrt(6 / 256) / 30
    for layer, bound in [
        (first, 1 / 512),
        (second, later_bound),
        (third, later_bound),
        (generator.output, later_bound),
    ]:
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound
        assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # uniform std
        in_features = layer.weight.shape[1]
        assert layer.bias.abs().max() <= 1 / math.sqrt(in_features)

    # forward = sigmoid(linear(sin(30 (W h + b)) ...)) written out for one query
    q = 11
    hidden = features[q]
    for layer in generator.sine_layers:
        hidden = torch.sin(30 * (hidden @ layer.weight[q] + layer.bias[q]))
    expected = torch.sigmoid(hidden @ generator.output.weight[q] + generator.output.bias[q])
    torch.testing.assert_close(generator()[q], expected.T.reshape(3, 6, 5), atol=1e-5, rtol=1e-5)


def test_dip_noise_input_and_layer_groups():
    generator = make_generator("dip", 2, 1, 28, torch.tensor([0, 1]), depth=3, width=8, noise_channels=32)
    assert generator.noise.shape == (2, 32, 28, 28)
    assert generator.noise.abs().max() <= 0.1 and generator.noise.abs().max() > 0.099
    groups = generator.layer_groups()
    assert len(groups) == 7
    assert sum(len(group) for group in groups) == len(list(generator.parameters()))
    assert groups[-1] == list(generator.output.parameters())
    plain = make_generator(
        "dip",
        2,
        3,
        (20, 27),
        torch.tensor([0, 1]),
        depth=2,
        width=(4, 6),
        skip_channels=0,
        norm=False,
        upsample="nearest",
    )
    assert plain().shape == (2, 3, 20, 27)
    groups = plain.layer_groups()
    assert len(groups) == 5 and sum(len(group) for group in groups) == len(list(plain.parameters()))
    with pytest.raises(ValueError, match="too small for depth 5"):
        make_generator("dip", 1, 1, 28, torch.tensor([0]), depth=5)


@pytest.mark.parametrize(
    ("kind", "options", "steps", "lr"),
    [
        ("pixel", {}, 0, 1e-2),
        # DIP: 200 steps give max MSE 1.25e-4 with OMP_NUM_THREADS=1 and 1.14e-4 with =2 (8x under the bound); 100
        # steps gave 3.6e-4 here and 1.5e-3 reported with 2 threads, too close to the bound
        ("dip", {"width": 32}, 200, 1e-2),
        ("inr", {"width": 64, "num_frequencies": 64}, 300, 1e-3),
    ],
)
def test_fit_reconstruction_reproduces_the_queries(kind, options, steps, lr):
    images = digit_like(2)
    generator = make_generator(kind, 2, 1, 28, torch.tensor([3, 4]), **options)
    mse = fit_reconstruction(generator, images, steps, lr)
    with torch.no_grad():
        independent = ((generator() - images) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mse, independent)
    assert mse.shape == (2,) and mse.max() < 1e-3
    with pytest.raises(ValueError, match=r"expected images of shape \(2, 1, 28, 28\)"):
        fit_reconstruction(generator, images[:1], steps, lr)


@pytest.mark.parametrize("kind", ["pixel", "dip", "inr"])
def test_select_keeps_the_right_queries_and_their_adam_state(kind):
    seeds = torch.tensor([8, 9, 10, 11])
    target = digit_like(4)

    def adam_steps(generator, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            ((generator() - target[: generator.num_queries]) ** 2).sum().backward()
            optimizer.step()

    narrowed = make_generator(kind, 4, 1, 28, seeds, **SMALL[kind])
    optimizer = torch.optim.Adam(narrowed.parameters(), lr=1e-2)
    adam_steps(narrowed, optimizer, 3)
    before = narrowed().detach()
    keep = torch.tensor([False, True, False, True])
    narrowed.select(keep)
    narrow_optimizer_state(optimizer, keep)
    assert narrowed.num_queries == 2
    torch.testing.assert_close(narrowed(), before[keep])

    # the kept queries continue exactly as if nothing had been removed
    target = target[keep]
    adam_steps(narrowed, optimizer, 2)
    reference = make_generator(kind, 2, 1, 28, seeds[keep], **SMALL[kind])
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    adam_steps(reference, reference_optimizer, 5)
    torch.testing.assert_close(narrowed(), reference(), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match=r"\(2,\) bool mask"):
        narrowed.select(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="at least one query"):
        narrowed.select(torch.tensor([False, False]))


@pytest.mark.parametrize("kind", ["dip", "inr"])
def test_progressive_stages_train_only_the_first_layer_groups(kind):
    generator = make_generator(kind, 2, 1, 28, torch.tensor([1, 2]), **SMALL[kind])
    groups = generator.layer_groups()
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-2)
    for count in range(1, len(groups) + 1):
        generator.set_trainable_groups(count)
        initial = [[parameter.detach().clone() for parameter in group] for group in groups]
        optimizer.zero_grad(set_to_none=True)
        weighted_loss(generator()).backward()
        optimizer.step()
        for position, (group, values) in enumerate(zip(groups, initial, strict=True)):
            for parameter, value in zip(group, values, strict=True):
                if position < count:
                    assert parameter.grad is not None and parameter.grad.abs().sum() > 0
                    assert not torch.equal(parameter, value)
                else:
                    assert parameter.grad is None and torch.equal(parameter, value)
    with pytest.raises(ValueError, match="layer groups"):
        generator.set_trainable_groups(len(groups) + 1)


def test_total_variation_and_l2_equal_hand_computed_values():
    image = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])[None, None]
    # (dh, dw) on the 2 x 2 top-left pixels: (0, 1), (-1, -1), (1, 0), (0, 0)
    assert total_variation(image, beta=2.0).item() == pytest.approx(4.0)
    assert total_variation(image, beta=1.0, eps=0.0).item() == pytest.approx(2 + math.sqrt(2))
    assert squared_l2(image).item() == 2.0
    pixel = PixelGenerator(1, 1, 3, torch.tensor([0]), tv_weight=0.5, l2_weight=0.25)
    pixel.set_images(image)
    assert pixel.regularizer(pixel()).item() == pytest.approx(0.5 * 4 + 0.25 * 2)
    flat = torch.full((2, 1, 4, 4), 0.3, requires_grad=True)
    value = total_variation(flat, beta=1.0)
    value.sum().backward()
    torch.testing.assert_close(value, torch.zeros(2), atol=1e-8, rtol=0)
    assert torch.isfinite(flat.grad).all()
    assert torch.equal(make_generator("inr", 2, 1, 8, torch.tensor([0, 1])).regularizer(flat), torch.zeros(2))


def test_pixel_clamp_passes_the_gradient_straight_through():
    pixel = PixelGenerator(1, 1, 2, torch.tensor([0]))
    pixel.set_images(torch.tensor([[[[-0.5, 0.2], [0.9, 1.5]]]]))
    images = pixel()
    assert torch.equal(images, torch.tensor([[[[0.0, 0.2], [0.9, 1.0]]]]))
    images.sum().backward()
    assert torch.equal(pixel.image.grad, torch.ones(1, 1, 2, 2))


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="kind to be one of"):
        make_generator("gan", 1, 1, 8, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(2,\) integer seeds"):
        make_generator("pixel", 2, 1, 8, torch.tensor([0]))
    with pytest.raises(ValueError, match="image_size"):
        make_generator("inr", 1, 1, (8, 8, 8), torch.tensor([0]))
    assert issubclass(INRGenerator, BatchedGenerator)


@pytest.mark.parametrize("kind", ["dip", "inr"])
def test_bf16_autocast_stays_close_to_fp32(kind):
    generator = make_generator(kind, 2, 1, 28, torch.tensor([0, 1]), **SMALL[kind])
    with torch.no_grad():
        reference = generator()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = generator()
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, atol=3e-2, rtol=0)
