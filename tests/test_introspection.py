"""GenerativeIntrospection: the bisection against a closed form, held-fixed attributes, prototypes, batch
independence, clear errors, and runs through CounterfactualTask (its configs on tiny checkpoints).

The shared behaviour (input checks, shapes, details against ``detail_fields``) is in test_explainer_contract.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from cfx.counterfactual import GenerativeIntrospection
from cfx.data import SyntheticImages
from cfx.nn.attgan import AttGAN, AttGANDiscriminator, AttGANGenerator
from cfx.nn.generative import WGANCritic, WGANGenerator
from cfx.results import open_results
from cfx.tasks import ClassificationTask, GANTask
from cfx.tasks.attgan import AttGANTask
from tests.explainer_helpers import ConvClassifier, LinearFeatureClassifier, queries, tiny_cnn
from tests.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]


class AdditiveAttGANGenerator(nn.Module):
    """``decode([x], a) = x + sum_j a_j P_j``: each attribute adds a fixed pattern (an AttGAN stand-in at any size,
    whose edit with all-zero attributes is the image itself)."""

    def __init__(self, patterns: Tensor):
        super().__init__()
        self.num_attributes, self.in_channels, self.image_size = (
            patterns.shape[0],
            patterns.shape[1],
            patterns.shape[-1],
        )
        self.register_buffer("patterns", patterns)

    def encode(self, images: Tensor) -> list[Tensor]:
        return [images]

    def decode(self, features: list[Tensor], attributes: Tensor) -> Tensor:
        return features[0] + torch.einsum("na,achw->nchw", attributes, self.patterns)


class LinearAttributeHead(nn.Module):
    """``(mean pixel, W flatten(x))``: a discriminator stand-in with an attribute head."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return images.flatten(1).mean(dim=1), images.flatten(1) @ self.weight.T


def additive_attgan(
    num_attributes: int = 4, size: int = 8, scale: float = 0.3, seed: int = 0, patterns: Tensor | None = None
) -> AttGAN:
    """An :class:`AttGAN` of the additive stand-ins, attributes named ``a0, a1, ...``."""
    generator = torch.Generator().manual_seed(seed)
    if patterns is None:
        patterns = torch.randn(num_attributes, 1, size, size, generator=generator) * scale
    head = LinearAttributeHead(torch.randn(patterns.shape[0], patterns[0].numel(), generator=generator))
    stand_in = AdditiveAttGANGenerator(patterns)
    head.num_attributes, head.in_channels, head.image_size = stand_in.num_attributes, 1, stand_in.image_size
    return AttGAN(stand_in, head, tuple(f"a{i}" for i in range(stand_in.num_attributes))).eval()


class SigmoidGenerator(nn.Module):
    """``G(z) = sigmoid(z)`` per pixel: a GAN-generator stand-in whose inversion recovers any image."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.latent_dim, self.out_channels, self.image_size = size * size, 1, size

    def forward(self, latents: Tensor) -> Tensor:
        return torch.sigmoid(latents).view(len(latents), 1, self.image_size, self.image_size)


def tiny_attgan(num_attributes: int = 4, seed: int = 0, size: int = 28) -> AttGAN:
    torch.manual_seed(seed)
    return AttGAN(
        AttGANGenerator(num_attributes, image_size=size, base_channels=4, max_channels=8),
        AttGANDiscriminator(num_attributes, image_size=size, base_channels=4, max_channels=8, head_width=8),
        tuple(f"attribute{i}" for i in range(num_attributes)),
    ).eval()


# -- the bisection against a closed form -------------------------------------------------------------------
# One attribute adds the pattern u to a grey 2x2 image; a linear two-class classifier's logit difference is
# d(a) = d0 + a s with s = w . u. For a > 0 the objective lambda * softplus(-d(a)) + a ||u||_1 is convex with its
# minimum where sigmoid(-d) = ||u||_1 / (lambda s); at confidence 1/2 the minimum is a counterfactual (d >= 0)
# exactly when lambda >= LAMBDA_STAR = 2 ||u||_1 / s, and the path from a = 0 reaches it then and only then.
PATTERN = torch.tensor([0.2, 0.2, 0.2, 0.2])
CLASS_DIFFERENCE = torch.tensor([1.0, 0.5, 1.0, 5 / 6])  # s = 0.2 * 10/3 = 2/3, LAMBDA_STAR = 2 * 0.8 / (2/3) = 2.4
LAMBDA_STAR = 2 * PATTERN.abs().sum().item() / (PATTERN @ CLASS_DIFFERENCE).item()


def _toy(crossings: Tensor) -> tuple[LinearFeatureClassifier, AttGAN, Tensor]:
    """The classifier, the one-attribute AttGAN stand-in and queries (grey levels) crossing d = 0 at ``crossings``."""
    slope = (PATTERN @ CLASS_DIFFERENCE).item()
    class_weight = torch.stack([torch.zeros(4), CLASS_DIFFERENCE])
    # d0 = 0.4 * sum(w) + b = -crossing * s at grey 0.4; other grey levels g shift it by (g - 0.4) sum(w)
    bias = torch.tensor([0.0, -0.4 * CLASS_DIFFERENCE.sum().item() - 0.5 * slope])
    classifier = LinearFeatureClassifier(torch.eye(4), class_weight, bias, channels=1, size=2)
    greys = 0.4 - (crossings - 0.5) * slope / CLASS_DIFFERENCE.sum()
    images = greys.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return classifier, additive_attgan(patterns=PATTERN.view(1, 1, 2, 2)), images


def _reference_bisection(lambda_initial: float, rounds: int) -> tuple[float, float, list[float]]:
    """The bisection's bounds and visited lambdas when a round finds a counterfactual iff lambda >= LAMBDA_STAR."""
    weight, lower, upper, visited = lambda_initial, 0.0, math.inf, []
    for _ in range(rounds):
        visited.append(weight)
        if weight >= LAMBDA_STAR:
            upper = min(upper, weight)
        else:
            lower = max(lower, weight)
        weight = (lower + upper) / 2 if math.isfinite(upper) else 10 * weight
    return lower, upper, visited


def test_the_bisection_brackets_the_closed_form_smallest_lambda():
    crossings = torch.tensor([0.3, 0.5, 0.6])
    classifier, attgan, images = _toy(crossings)
    rounds = 6
    lower, upper, visited = _reference_bisection(1.0, rounds)
    assert min(abs(weight / LAMBDA_STAR - 1) for weight in visited) > 0.1  # no visited lambda is a close call
    explainer = GenerativeIntrospection(
        classifier, attgan=attgan, attribute_table=torch.zeros(3, 1), mode="attributes", top_k=1,
        lambda_initial=1.0, bisection_steps=rounds, max_iterations=400, learning_rate=0.004,
    )  # fmt: skip
    result = explainer.explain(images, torch.ones(3, dtype=torch.long))
    details = result.details
    assert result.success.all()
    torch.testing.assert_close(details["lambda_lower"], torch.full((3,), lower), rtol=1e-6, atol=0)
    torch.testing.assert_close(details["lambda_upper"], torch.full((3,), upper), rtol=1e-6, atol=0)
    assert lower < LAMBDA_STAR < upper
    successful = torch.tensor([weight for weight in visited if weight >= LAMBDA_STAR])
    assert torch.isin(details["lambda"], successful).all()
    # the returned edit is where the path first crosses the decision boundary: a little past each query's crossing
    edits = details["attributes"][:, 0]
    assert ((edits >= crossings) & (edits <= crossings + 0.02)).all(), edits
    torch.testing.assert_close(details["attribute_change"], details["attributes"])  # the table's start is 0
    assert details["top_attributes"].tolist() == [[0]] * 3
    # a round that ends without a counterfactual takes all its steps; the failed first round comes first
    assert (result.iterations > 400).all()


def test_bisection_ends_at_most_as_far_as_the_first_lambda_that_succeeds():
    classifier = tiny_cnn()
    images, targets = queries(classifier, 12, seed=8)
    settings = dict(
        attgan=additive_attgan(8, scale=1.0), attribute_table=torch.zeros(12, 8), mode="attributes", top_k=3,
        attribute_range=(-1.0, 2.0), lambda_initial=50.0, max_iterations=60, learning_rate=0.05,
    )  # fmt: skip
    first = GenerativeIntrospection(classifier, bisection_steps=1, **settings).explain(images, targets)
    bisected = GenerativeIntrospection(classifier, bisection_steps=6, **settings).explain(images, targets)
    changed = first.success & (first.iterations > 0)  # succeeded in the first round (lambda 50)
    assert changed.sum() >= 4
    assert bisected.success[changed].all()
    distance = lambda result: (result.counterfactuals - images).abs().flatten(1).sum(1)  # noqa: E731
    assert (distance(bisected)[changed] <= distance(first)[changed] + 1e-5).all()
    assert (distance(bisected)[changed] < distance(first)[changed] - 1e-3).any()  # smaller lambdas moved less
    assert (bisected.details["lambda"][changed] <= 50).all()
    assert (bisected.details["lambda_upper"][changed] < 50).any()


# -- attributes, prototypes, latents ------------------------------------------------------------------------
def test_held_fixed_attributes_never_change():
    classifier = tiny_cnn()
    images, targets = queries(classifier, 10, seed=9)
    table = (torch.rand(10, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    attgan = additive_attgan(5, scale=0.5)
    settings = dict(attgan=attgan, attribute_table=table, mode="attributes", top_k=2, bisection_steps=2, path_every=3)
    settings.update(max_iterations=30, learning_rate=0.1)
    free = GenerativeIntrospection(classifier, **settings).explain(images, targets)
    moved = free.details["attribute_change"][:, [1, 3]].abs().amax(dim=1) > 1e-3
    assert moved.sum() >= 3  # without holding them, attributes 1 and 3 move
    held = GenerativeIntrospection(classifier, held_fixed=["a1", "a3"], **settings).explain(images, targets)
    assert torch.equal(held.details["attributes"][:, [1, 3]], table[:, [1, 3]])
    assert torch.equal(held.details["attribute_change"][:, [1, 3]], torch.zeros(10, 2))
    changed = held.iterations > 0
    assert not torch.isin(held.details["top_attributes"][changed], torch.tensor([1, 3])).any()
    assert ((held.details["attributes"] >= 0) & (held.details["attributes"] <= 1)).all()
    # every recorded image is the AttGAN's edit with attributes 1 and 3 at their start values
    by_index = GenerativeIntrospection(classifier, held_fixed=[3, 1], **settings).explain(images, targets)
    assert torch.equal(by_index.details["attributes"], held.details["attributes"])
    edited = images + torch.einsum("na,achw->nchw", held.details["attributes"], attgan.generator.patterns)
    torch.testing.assert_close(held.counterfactuals[changed], edited.clamp(0, 1)[changed], atol=1e-6, rtol=0)


def test_prototypes_raise_the_class_probability_and_need_the_predicted_class():
    classifier = tiny_cnn()
    images, _ = queries(classifier, 10, seed=10)
    with torch.no_grad():
        probabilities = classifier(images).softmax(1)
    predictions, before = probabilities.argmax(1), probabilities.max(1).values
    explainer = GenerativeIntrospection(
        classifier, attgan=additive_attgan(8, scale=1.0), attribute_table=torch.zeros(10, 8), mode="attributes",
        attribute_range=(-1.0, 2.0), kind="prototype", prototype_confidence=0.99, top_k=2, bisection_steps=3,
        max_iterations=100, learning_rate=0.2,
    )  # fmt: skip
    result = explainer.explain(images, predictions)
    already = before >= 0.99
    assert (~already).sum() >= 5
    assert (result.target_probability[~already] > before[~already] + 1e-4).all()
    assert torch.equal(result.success, result.target_probability >= 0.99)
    assert result.success[~already].any() and torch.equal(result.counterfactuals[already], images[already])
    other = (predictions + 1) % 3
    with pytest.raises(ValueError, match=r"a prototype's target is the classifier's prediction .* queries \[0, 1"):
        explainer.explain(images, other)


def _wgan_latent(latent_dim: int = 10) -> WGANGenerator:
    torch.manual_seed(0)
    return WGANGenerator(latent_dim=latent_dim).eval()


@pytest.mark.parametrize("mode", ["latent", "attributes"])
def test_results_do_not_depend_on_the_batch(mode):
    torch.manual_seed(1)
    classifier = ConvClassifier(size=28).eval()
    with torch.no_grad():
        classifier.head.weight.mul_(20)
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = (classifier(images).argmax(1) + torch.tensor([1, 2, 1, 2, 1, 2])) % 3
    indices = torch.tensor([4, 17, 3, 9, 0, 11])
    models = (
        {"generator": _wgan_latent(), "inversion_steps": 15, "inversion_restarts": 3}
        if mode == "latent"
        else {"attgan": tiny_attgan()}
    )
    explainer = GenerativeIntrospection(
        classifier, mode=mode, top_k=3, bisection_steps=3, max_iterations=6, learning_rate=0.1, path_every=4,
        lambda_initial=5.0, **models,
    )  # fmt: skip
    whole = explainer.explain(images, targets, indices)
    halves = [explainer.explain(images[part], targets[part], indices[part]) for part in (slice(0, 3), slice(3, 6))]
    for name in ("counterfactuals", "target_probability", "path"):
        torch.testing.assert_close(
            getattr(whole, name), torch.cat([getattr(h, name) for h in halves]), atol=1e-4, rtol=0, msg=name
        )
    for name in ("success", "iterations"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves])), name
    for name, value in whole.details.items():
        torch.testing.assert_close(
            value, torch.cat([h.details[name] for h in halves]), atol=1e-4, rtol=0, equal_nan=True, msg=name
        )
    assert (whole.iterations > 0).all()
    if mode == "latent":  # the inversion restarts are seeded by the dataset index: other indices, other latents
        moved = explainer.explain(images, targets, indices + 1)
        assert not torch.allclose(moved.details["attributes"], whole.details["attributes"])


def test_without_a_table_the_start_is_the_discriminators_thresholded_attributes():
    classifier = tiny_cnn()
    images, targets = queries(classifier, 6, seed=11)
    attgan = additive_attgan(4)
    with torch.no_grad():
        expected = (attgan.discriminator(images)[1] > 0).float()
    explainer = GenerativeIntrospection(classifier, attgan=attgan, mode="attributes", top_k=2, max_iterations=3)
    result = explainer.explain(images, targets)
    unchanged = result.iterations == 0
    assert unchanged.any() and (~unchanged).any()
    torch.testing.assert_close(result.details["attributes"][unchanged], expected[unchanged])
    start = result.details["attributes"] - result.details["attribute_change"]
    torch.testing.assert_close(start, expected, atol=1e-6, rtol=0)


def test_the_latent_start_is_the_best_inversion_of_the_query():
    generator = SigmoidGenerator()
    classifier = tiny_cnn()
    images, targets = queries(classifier, 5, seed=12)
    explainer = GenerativeIntrospection(
        classifier, generator=generator, top_k=2, max_iterations=0, inversion_steps=200, inversion_learning_rate=0.2
    )
    result = explainer.explain(images, targets)
    searched = result.iterations == 0  # max_iterations 0: the start G(a0) is the counterfactual or the failure
    latents = result.details["attributes"]
    reconstructed = ~torch.isnan(latents).any(1)
    assert searched.all() and reconstructed.sum() >= 2
    error = (generator(latents[reconstructed]) - images[reconstructed]).abs().flatten(1).mean(1)
    assert (error < 0.03).all(), error
    torch.testing.assert_close(result.counterfactuals[reconstructed], generator(latents[reconstructed]))


class RowCountingGenerator(SigmoidGenerator):
    """:class:`SigmoidGenerator` that records the rows of every call."""

    def __init__(self, size: int = 8):
        super().__init__(size)
        self.rows: list[int] = []

    def forward(self, latents: Tensor) -> Tensor:
        self.rows.append(len(latents))
        return super().forward(latents)


def test_a_query_paired_with_several_targets_is_inverted_once():
    classifier = tiny_cnn()
    images, _ = queries(classifier, 2, seed=13)
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
    others = torch.stack([(predicted + 1) % 3, (predicted + 2) % 3], dim=1).flatten()  # 2 targets per query
    paired, indices = images.repeat_interleave(2, dim=0), torch.tensor([5, 5, 8, 8])
    generator = RowCountingGenerator()
    settings = {"top_k": 2, "max_iterations": 0, "inversion_steps": 30, "inversion_restarts": 3}
    explainer = GenerativeIntrospection(classifier, generator=generator, **settings)
    together = explainer.explain(paired, others, indices).details["attributes"]
    assert generator.rows[0] == 2 * 3  # two distinct queries x 3 restarts, not four
    alone = GenerativeIntrospection(classifier, generator=SigmoidGenerator(), **settings)
    single = alone.explain(images, others[::2], torch.tensor([5, 8])).details["attributes"]
    torch.testing.assert_close(together, single.repeat_interleave(2, dim=0), atol=1e-5, rtol=0)
    generator.rows.clear()  # the same index on different images: each image is inverted
    explainer.explain(torch.cat([images[:1], images[1:]]), others[::2], torch.tensor([5, 5]))
    assert generator.rows[0] == 2 * 3


# -- errors ---------------------------------------------------------------------------------------------------
def test_bad_settings_and_mismatched_models_are_clear_errors():
    classifier, big = tiny_cnn(), ConvClassifier(size=28).eval()
    attgan = additive_attgan(4)

    def build(model_classifier=classifier, **settings):
        return GenerativeIntrospection(
            model_classifier, **{"mode": "attributes", "attgan": attgan, "top_k": 2, **settings}
        )

    with pytest.raises(
        ValueError, match=r"attribute_table must be \(M, 4\): the AttGAN's 4 attributes .* got \(10, 3\)"
    ):
        build(attribute_table=torch.zeros(10, 3))
    with pytest.raises(ValueError, match=r"attribute_table must be \(M, 4\)"):
        build(attribute_table=torch.zeros(10))
    with pytest.raises(
        ValueError, match=r"attgan.generator \(AttGANGenerator\) takes 28x28 images, the classifier 8x8"
    ):
        build(attgan=tiny_attgan())
    rgb = ConvClassifier(size=28).eval()
    rgb.in_channels = 3
    with pytest.raises(ValueError, match=r"attgan.generator .* takes 1-channel images, the classifier 3-channel"):
        build(rgb, attgan=tiny_attgan())
    with pytest.raises(
        ValueError, match=r"held_fixed names \['Young'\] are not attributes of the AttGAN \(its attributes: \['a0'"
    ):
        build(held_fixed=["Young"])
    with pytest.raises(ValueError, match=r"held_fixed indices must be in 0\.\.3"):
        build(held_fixed=[4])
    with pytest.raises(ValueError, match="names an attribute twice"):
        build(held_fixed=["a1", "a1"])
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.2 \(the attributes not held fixed\)"):
        build(held_fixed=["a0", "a1"], top_k=3)
    with pytest.raises(ValueError, match="latent dimensions have no names"):
        GenerativeIntrospection(classifier, generator=SigmoidGenerator(), held_fixed=["a0"])
    with pytest.raises(ValueError, match=r"mode='latent' edits a GAN latent: give generator="):
        GenerativeIntrospection(classifier, attgan=attgan)
    with pytest.raises(ValueError, match=r"mode='attributes' edits an AttGAN's attributes: give attgan="):
        GenerativeIntrospection(classifier, generator=SigmoidGenerator(), mode="attributes")
    with pytest.raises(ValueError, match="the generator makes 28x28 images, the classifier takes 8x8 ones"):
        GenerativeIntrospection(classifier, generator=_wgan_latent())
    with pytest.raises(TypeError, match="generator must be a GAN generator module"):
        GenerativeIntrospection(big, generator=GANTask(_wgan_latent(), WGANCritic()).generative_model())
    with pytest.raises(TypeError, match="attgan must be an AttGAN"):
        build(attgan=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"attribute_range must be \(low, high\) with low <= 0 and high >= 1"):
        build(attribute_range=(0.2, 1.0))
    with pytest.raises(ValueError, match="kind must be 'criticism' or 'prototype'"):
        build(kind="proto")
    explainer = build(attribute_table=torch.zeros(10, 4))
    images, targets = queries(classifier, 4, seed=0)
    with pytest.raises(ValueError, match=r"indices must be dataset indices 0\.\.9 of the attribute table, got 3\.\.12"):
        explainer.explain(images, targets, torch.tensor([3, 4, 5, 12]))


# -- through CounterfactualTask ------------------------------------------------------------------------------
NUM_CLASSES = 3
MORPHOMETRIC = ("thick", "slanted", "wide", "tall", "long", "large")


def _data(**kwargs) -> SyntheticImages:
    return SyntheticImages(num_samples=60, num_classes=NUM_CLASSES, image_size=28, noise=0.3, batch_size=8, **kwargs)


def _fit(task, folder: Path, steps: int = 2, **data) -> Path:
    folder.mkdir(parents=True)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=str(folder))
    trainer.fit(task, _data(**data))
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A classifier, a 10-D latent WGAN and an AttGAN of the six morphometric attributes, each trained 2 steps."""
    from cfx.nn import SmallCNN

    root = tmp_path_factory.mktemp("introspection")
    torch.manual_seed(0)
    attgan = tiny_attgan(len(MORPHOMETRIC))
    return {
        "classifier": _fit(
            ClassificationTask(SmallCNN(in_channels=1, num_classes=NUM_CLASSES, channels=(4, 8), hidden=16)),
            root / "classifier",
        ),
        "gan": _fit(GANTask(WGANGenerator(latent_dim=10), WGANCritic(), critic_steps=1, grid_samples=4), root / "gan"),
        "attgan": _fit(
            AttGANTask(attgan.generator, attgan.discriminator, critic_steps=1, grid_images=4),
            root / "attgan",
            attributes="morphometric",
        ),
    }


def _cli(config: str, checkpoints: dict[str, Path], generative: str, *overrides: str) -> None:
    from cfx.cli import main

    main(
        [
            "test", "-c", str(REPO / "configs" / "counterfactual" / config),
            f"--model.classifier={checkpoints['classifier']}", f"--model.generative={checkpoints[generative]}",
            "--model.max_queries=2", "--model.explainer.init_args.max_iterations=3",
            "--model.explainer.init_args.bisection_steps=2", "--trainer.enable_progress_bar=false",
            "--data=cfx.data.SyntheticImages", "--data.init_args.num_samples=60",
            f"--data.init_args.num_classes={NUM_CLASSES}",
            "--data.init_args.image_size=28", "--data.init_args.eval_batch_size=2", *overrides,
        ]
    )  # fmt: skip


def test_the_latent_config_runs_and_stores_the_details(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _cli(
        "embedded_mnist_gci_latent.yaml", checkpoints, "gan",
        "--model.explainer.init_args.inversion_steps=3", "--model.explainer.init_args.top_k=4",
    )  # fmt: skip
    results = open_results(tmp_path / "runs" / "counterfactual" / "embedded_mnist_gci_latent")
    assert results.finished and len(results) == 2 * (NUM_CLASSES - 1)
    assert results.metadata["explainer"]["class_path"] == "cfx.counterfactual.GenerativeIntrospection"
    assert results.metadata["explainer"]["init_args"]["generator"] == str(checkpoints["gan"])
    assert results.extra_fields == {
        "attributes": (torch.float32, (10,)),
        "attribute_change": (torch.float32, (10,)),
        "top_attributes": (torch.int64, (4,)),
        "lambda": (torch.float32, ()),
        "lambda_lower": (torch.float32, ()),
        "lambda_upper": (torch.float32, ()),
    }
    top = results["top_attributes"]
    assert top.shape == (len(results), 4) and ((top >= 0) & (top < 10)).all()
    assert "attribute_names" not in results.metadata
    changed = results["attribute_change"].abs()
    assert torch.equal(changed.gather(1, top[:, :1]).squeeze(1), changed.amax(1))


def test_the_attribute_config_hands_the_attgan_and_the_datas_attribute_table(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _cli(
        "embedded_mnist_gci_attributes.yaml", checkpoints, "attgan",
        "--data.init_args.attributes=morphometric", "--data.init_args.noise=0.3",
        "--model.explainer.init_args.top_k=2", "--model.explainer.init_args.held_fixed=[thick]",
    )  # fmt: skip
    results = open_results(tmp_path / "runs" / "counterfactual" / "embedded_mnist_gci_attributes")
    assert results.finished and len(results) == 2 * (NUM_CLASSES - 1)
    assert results.metadata["attribute_names"] == list(MORPHOMETRIC)
    init_args = results.metadata["explainer"]["init_args"]
    assert init_args["attgan"] == str(checkpoints["attgan"]) and init_args["attribute_table"] == "Tensor(60, 6)"
    data = _data(attributes="morphometric")
    data.setup()
    table = data.attribute_table()
    start = results["attributes"] - results["attribute_change"]
    torch.testing.assert_close(start, table[results["index"]], atol=1e-6, rtol=0)  # each query's own attributes
    assert torch.equal(results["attributes"][:, 0], table[results["index"], 0])  # thick is held fixed
    assert not torch.isin(results["top_attributes"], torch.tensor([0])).any()


def test_the_attribute_prototype_config_pairs_each_query_with_its_own_predicted_class(
    checkpoints, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _cli(
        "embedded_mnist_gci_attribute_prototypes.yaml", checkpoints, "attgan",
        "--data.init_args.attributes=morphometric", "--data.init_args.noise=0.3",
    )  # fmt: skip
    results = open_results(tmp_path / "runs" / "counterfactual" / "embedded_mnist_gci_attribute_prototypes")
    assert results.finished and len(results) == 2  # one pair per query, nothing dropped
    assert torch.equal(results["target"], results["original_prediction"])
    assert results.metadata["explainer"]["init_args"]["kind"] == "prototype"
    assert results.metadata["attribute_names"] == list(MORPHOMETRIC)
