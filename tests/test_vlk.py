"""VLK: shrinkage and FISTA steps in closed form, alibi's bisection on c, prototypes against a brute-force loop, the
best valid iterate, batching across c-steps, the prototypes file and clear errors.

The contract every explainer keeps (batching, input checks, ...) is in test_explainer_contract.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from cfx.counterfactual import VLK
from cfx.counterfactual.search import bisection_step
from cfx.counterfactual.vlk import (
    ClassEncodings,
    class_prototypes,
    fit_class_encodings,
    load_prototypes,
    shrink,
)
from cfx.data import SyntheticImages
from cfx.io import file_sha256
from cfx.nn import SmallCNN
from cfx.nn.generative import ConvAutoencoder, ConvVAE
from cfx.tasks import ClassificationTask, load_classifier
from cfx.tasks.generative import AutoencoderTask, load_generative
from cfx.tasks.prototypes import fit_and_save_prototypes, load_checked_prototypes, prototypes_main
from tests.explainer_helpers import (
    LinearFeatureClassifier,
    MLPClassifier,
    assert_batch_invariant,
    linear_autoencoder,
    linear_classifier,
    queries,
    random_class_encodings,
    random_gaussians,
    tiny_cnn,
)
from tests.trainers import quiet_trainer


def test_shrinkage_moves_each_element_towards_the_origin_by_the_threshold() -> None:
    values = torch.tensor([0.5, 0.32, 0.28, 0.1, -0.05, 0.9])
    origin = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3, 0.0])
    expected = torch.tensor([0.4, 0.3, 0.3, 0.2, 0.05, 0.8])
    torch.testing.assert_close(shrink(values, origin, 0.1), expected)


def brute_force_prototypes(codes: Tensor, targets: Tensor, encodings: Tensor, labels: Tensor, k: int) -> Tensor:
    rows = []
    for code, target in zip(codes, targets, strict=True):
        members = encodings[labels == target]
        distances = [float((member - code).norm().detach()) for member in members]
        nearest = sorted(range(len(members)), key=distances.__getitem__)[:k]
        rows.append(members[nearest].mean(0))
    return torch.stack(rows)


def test_prototypes_are_the_mean_of_the_k_nearest_encodings_of_the_target_class() -> None:
    generator = torch.Generator().manual_seed(0)
    encodings = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (200,), generator=generator)
    labels[:2] = 3  # a class with fewer than k encodings contributes all of them
    codes = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, (30,), generator=generator)
    prototypes = class_prototypes(codes, targets, encodings, labels, k=5)
    torch.testing.assert_close(prototypes, brute_force_prototypes(codes, targets, encodings, labels, 5))
    assert (targets == 3).any()
    # each row on its own (no matrix-product distances): the same bits in any batch
    singles = [class_prototypes(codes[i : i + 1], targets[i : i + 1], encodings, labels, 5) for i in range(30)]
    assert torch.equal(prototypes, torch.cat(singles))
    with pytest.raises(ValueError, match=r"no training encodings of target class\(es\) \[4\]"):
        class_prototypes(codes[:2], torch.tensor([1, 4]), encodings, labels, 5)


def alibi_bisection(c: float, lower: float, upper: float, found: bool) -> tuple[float, float, float]:
    """alibi's update as it writes it, for one instance."""
    if found:
        upper = min(upper, c)
        if upper < 1e9:
            c = (lower + upper) / 2
    else:
        lower = max(lower, c)
        if upper < 1e9:
            c = (lower + upper) / 2
        else:
            c *= 10
    return c, lower, upper


def test_bisection_step_follows_alibis_rules_for_every_row() -> None:
    found = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    c, lower = torch.full((8,), 0.3, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    upper = torch.full((8,), 1e10, dtype=torch.float64)
    reference = [(0.3, 0.0, 1e10)] * 8
    for round_found in found:
        c, lower, upper = bisection_step(c, lower, upper, round_found)
        reference = [alibi_bisection(*state, bool(hit)) for state, hit in zip(reference, round_found, strict=True)]
        assert torch.equal(torch.stack([c, lower, upper], 1), torch.tensor(reference, dtype=torch.float64))


def hinge_gradient(matrix: Tensor, bias: Tensor, points: Tensor, sources: Tensor, kappa: float) -> Tensor:
    """d/dx max(0, p_o - max_{i != o} p_i + kappa) for p = softmax(W x + b), by hand."""
    probabilities = (points @ matrix.T + bias).softmax(1)
    rows = torch.arange(len(points))
    others = probabilities.clone()
    others[rows, sources] = -1
    runner_up = others.argmax(1)
    p_source, p_other = probabilities[rows, sources], probabilities[rows, runner_up]
    eye = torch.eye(probabilities.shape[1], dtype=points.dtype)
    by_logit = p_source[:, None] * (eye[sources] - probabilities) - p_other[:, None] * (eye[runner_up] - probabilities)
    active = (p_source - p_other + kappa > 0).to(points.dtype)
    return active[:, None] * by_logit @ matrix


def test_two_fista_steps_equal_the_hand_computed_update() -> None:
    classifier = linear_classifier(seed=5, channels=1, size=4, features=5, classes=3)
    autoencoder = linear_autoencoder(seed=6, channels=1, size=4, latent_dim=3)
    encodings = random_class_encodings(3, 3, per_class=5, seed=7)
    images = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        sources = classifier(images).argmax(1)
    targets = (sources + 1) % 3
    kappa, beta, gamma, theta, c, rate = 0.05, 0.03, 0.5, 0.3, 2.0, 0.2
    explainer = VLK(
        classifier, autoencoder, encodings, k=2, kappa=kappa, beta=beta, gamma=gamma, theta=theta, c_init=c,
        c_steps=1, max_iterations=2, learning_rate=rate, path_every=1,
    )  # fmt: skip
    path = explainer.explain(images, targets).path.flatten(2).double()

    start = images.flatten(1).double()
    matrix = classifier.head.weight.double() @ classifier.features.weight.double()
    bias = classifier.head.bias.double()
    enc_w, enc_b = autoencoder.encoder.weight.double(), autoencoder.encoder.bias.double()
    dec_w, dec_b = autoencoder.decoder.weight.double(), autoencoder.decoder.bias.double()
    reconstruct_w, reconstruct_b = dec_w @ enc_w - torch.eye(16, dtype=torch.float64), dec_w @ enc_b + dec_b
    codes = start @ enc_w.T + enc_b
    prototypes = brute_force_prototypes(codes, targets, encodings.encodings.double(), encodings.labels, 2)

    def gradient(point: Tensor) -> Tensor:
        return (
            c * hinge_gradient(matrix, bias, point, sources, kappa)
            + 2 * (point - start)
            + gamma * 2 * (point @ reconstruct_w.T + reconstruct_b) @ reconstruct_w
            + theta * 2 * (point @ enc_w.T + enc_b - prototypes) @ enc_w
        )

    def shrink_and_clip(values: Tensor) -> Tensor:
        difference = values - start
        moved = torch.where(difference > beta, values - beta, torch.where(difference < -beta, values + beta, start))
        return moved.clamp(0, 1)

    first = shrink_and_clip(start - rate * gradient(start))
    point = (first + 1 / 4 * (first - start)).clamp(0, 1)
    second = shrink_and_clip(point - rate * (1 - 1 / 2) ** 0.5 * gradient(point))
    torch.testing.assert_close(path[:, 1], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(path[:, 2], second, atol=1e-5, rtol=0)
    # every branch of the step is exercised: pixels kept at x0 by the shrinkage, moved up, moved down, momentum
    assert (first == start).any() and (first > start).any() and (first < start).any()
    assert not torch.allclose(point, first)


def one_pixel_problem(slope: float) -> tuple[LinearFeatureClassifier, ClassEncodings]:
    """Two classes on 1x1 images: logits ``(0, slope * (x - 0.5))``, so class 1 iff ``x > 0.5``."""
    classifier = LinearFeatureClassifier(
        torch.ones(1, 1), torch.tensor([[0.0], [slope]]), torch.tensor([0.0, -slope / 2]), channels=1, size=1
    ).eval()
    return classifier, random_class_encodings(2, 1)


def test_the_bisection_on_c_follows_alibis_rules_where_success_at_each_c_is_known() -> None:
    # One FISTA step per c-step, no autoencoder or prototype term: from x0 < 0.5 the step moves x by
    # rate * c * |dh/dx| - beta (h = p_0 - p_1 = 1 - 2 sigmoid(s), s = slope (x - 0.5)) once that is positive, so the
    # c-step finds a counterfactual iff c > c* = (0.5 - x0 + beta) / (rate |dh/dx|), and the best one is that of
    # the smallest successful c tried.
    slope, rate, beta, steps = 4.0, 0.1, 0.1, 6
    classifier, encodings = one_pixel_problem(slope)
    starts = torch.tensor([0.1, 0.2, 0.3, 0.45])
    explainer = VLK(
        classifier, linear_autoencoder(size=1, latent_dim=1), encodings, k=1, beta=beta, gamma=0.0, theta=0.0,
        c_init=1.0, c_steps=steps, max_iterations=1, learning_rate=rate,
    )  # fmt: skip
    result = explainer.explain(starts.view(4, 1, 1, 1), torch.ones(4, dtype=torch.long))
    branches = set()
    for i, start in enumerate(starts.tolist()):
        sigmoid = 1 / (1 + math.exp(-slope * (start - 0.5)))
        pull = rate * 2 * slope * sigmoid * (1 - sigmoid)
        threshold = (0.5 - start + beta) / pull
        state, tried = (1.0, 0.0, 1e10), []
        for _ in range(steps):
            c = state[0]
            assert abs(c - threshold) > 1e-3 * threshold  # no float-rounding borderline case
            tried.append(c)
            branches.add((c > threshold, state[2] < 1e9))
            state = alibi_bisection(*state, c > threshold)
        smallest = min(c for c in tried if c > threshold)
        expected = min(start + pull * smallest - beta, 1.0)
        assert bool(result.success[i])
        torch.testing.assert_close(result.counterfactuals[i].flatten(), torch.tensor([expected]), atol=1e-5, rtol=0)
    assert branches == {(True, False), (True, True), (False, False), (False, True)}
    assert (result.iterations == steps).all()


def test_returns_the_closest_valid_iterate_over_all_c_steps() -> None:
    classifier = tiny_cnn()
    images, targets = queries(classifier, 16, seed=14)
    explainer = VLK(
        classifier, linear_autoencoder(), random_class_encodings(3, 4), k=2, beta=0.01, gamma=1.0, theta=1.0,
        c_init=10.0, c_steps=3, max_iterations=8, learning_rate=0.05, path_every=1,
    )  # fmt: skip
    result = explainer.explain(images, targets)
    searched = result.iterations > 0
    assert (result.success & searched).sum() >= 5 and (result.iterations[searched] == 24).all()
    with torch.no_grad():
        probabilities = classifier(result.path.flatten(0, 1)).softmax(1).view(16, 25, 3)
    best_steps = []
    for i in torch.nonzero(result.success & searched).flatten().tolist():
        target = int(targets[i])
        valid = (probabilities[i].argmax(1) == target) & (probabilities[i, :, target] >= 0.5)
        difference = (result.path[i] - images[i]).flatten(1)
        distances = difference.square().sum(1) + 0.01 * difference.abs().sum(1)
        best = int(torch.nonzero(valid).flatten()[distances[valid].argmin()])
        assert torch.equal(result.counterfactuals[i], result.path[i, best])
        best_steps.append(best)
    assert max(best_steps) > 8  # some bests come from a later c-step (the path runs the c-steps one after the other)


def test_a_batch_equals_each_query_explained_alone_across_c_steps() -> None:
    classifier = tiny_cnn()
    images, targets = queries(classifier, 8, seed=12)
    explainer = VLK(
        classifier, linear_autoencoder(), random_class_encodings(3, 4), k=2, beta=0.01, gamma=1.0, theta=1.0,
        c_init=3.0, c_steps=3, max_iterations=5, learning_rate=0.05, path_every=2,
    )  # fmt: skip
    assert_batch_invariant(explainer, images, targets, tolerance=1e-4)  # measured spread 2.7e-5


def test_the_autoencoder_is_used_in_eval_mode_and_left_unchanged() -> None:
    torch.manual_seed(0)
    classifier, autoencoder = MLPClassifier().eval(), ConvAutoencoder().train()
    before = copy.deepcopy(autoencoder.state_dict())
    modes: list[bool] = []
    autoencoder.decoder.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    explainer = VLK(classifier, autoencoder, random_class_encodings(10, 16), c_steps=2, max_iterations=2)
    result = explainer.explain(images, torch.tensor([0, 1, 2]))
    assert result.counterfactuals.shape == images.shape
    assert modes and not any(modes) and autoencoder.training
    assert all(torch.equal(before[key], value) for key, value in autoencoder.state_dict().items())
    assert all(parameter.grad is None for parameter in autoencoder.parameters())


def test_an_autoencoder_or_prototypes_that_do_not_fit_are_refused() -> None:
    classifier, encodings = MLPClassifier(), random_class_encodings(10, 16)
    with pytest.raises(ValueError, match="3-channel images, the classifier 1-channel"):
        VLK(classifier, ConvAutoencoder(in_channels=3), encodings)
    with pytest.raises(ValueError, match="32x32 images, the classifier 28x28"):
        VLK(classifier, ConvAutoencoder(image_size=32), encodings)
    with pytest.raises(ValueError, match="the prototypes are 5-d encodings, the autoencoder's codes 16-d"):
        VLK(classifier, ConvAutoencoder(), random_class_encodings(10, 5))
    with pytest.raises(ValueError, match="the prototypes cover 3 classes, the classifier has 10"):
        VLK(classifier, ConvAutoencoder(), random_class_encodings(3, 16))
    with pytest.raises(TypeError, match=r"prototypes must be the ClassEncodings of .*load_prototypes"):
        VLK(classifier, ConvAutoencoder(), torch.zeros(10, 16))
    missing = ClassEncodings(torch.zeros(9, 16), torch.arange(9), 10)  # the classifier never predicted class 9
    explainer = VLK(classifier, ConvAutoencoder(), missing)
    with pytest.raises(ValueError, match=r"no training encodings of target class\(es\) \[9\]"):
        explainer.explain(torch.rand(2, 1, 28, 28), [3, 9])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((torch.zeros(4), torch.zeros(4, dtype=torch.long), 2), r"encodings must be a \(M, D\) float tensor"),
        ((torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), 2), r"labels must be \(4,\) integer classes"),
        ((torch.zeros(4, 2), torch.zeros(4), 2), r"labels must be \(4,\) integer classes"),
        ((torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]), 2), r"labels must be classes 0\.\.1"),
    ],
)
def test_malformed_class_encodings_are_refused(arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassEncodings(*arguments)


def test_the_prototypes_file_round_trips_and_other_files_are_refused(tmp_path: Path) -> None:
    encodings = random_class_encodings(3, 4, per_class=3)
    encodings.sources = {"classifier": {"path": "c.ckpt", "sha256": "ab"}, "autoencoder": {"path": "a.ckpt"}}
    encodings.save(tmp_path / "class_prototypes.pt")
    loaded = load_prototypes(tmp_path / "class_prototypes.pt")
    assert torch.equal(loaded.encodings, encodings.encodings) and torch.equal(loaded.labels, encodings.labels)
    assert loaded.num_classes == 3 and loaded.sources == encodings.sources
    with pytest.raises(FileNotFoundError, match="no class prototypes at .*absent.pt"):
        load_prototypes(tmp_path / "absent.pt")
    random_gaussians(3, 4).save(tmp_path / "class_gaussians.pt")
    with pytest.raises(ValueError, match="is not a class prototypes file"):
        load_prototypes(tmp_path / "class_gaussians.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a readable class prototypes file"):
        load_prototypes(tmp_path / "garbage.pt")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"c_steps": 0}, "c_steps must be >= 1"),
        ({"max_iterations": -1}, "max_iterations must be >= 0"),
        ({"k": 0}, "k must be >= 1"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"c_init": 0.0}, "c_init must be > 0"),
        ({"feature_range": (0.5, 0.2)}, "feature_range must be"),
        ({"feature_range": (-0.5, 0.5)}, "feature_range must be"),
    ],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    classifier, encodings = one_pixel_problem(1.0)
    with pytest.raises(ValueError, match=message):
        VLK(classifier, linear_autoencoder(size=1, latent_dim=1), encodings, **settings)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path, SyntheticImages]:
    """An AutoencoderTask and a ClassificationTask checkpoint, each trained two steps on 28 px synthetic images."""
    folder = tmp_path_factory.mktemp("vlk")
    datamodule = SyntheticImages(num_samples=60, num_classes=3, image_size=28, batch_size=16, eval_batch_size=16)
    paths = []
    for name, task in (
        ("autoencoder", AutoencoderTask(ConvAutoencoder(latent_dim=4))),
        ("classifier", ClassificationTask(SmallCNN(in_channels=1, num_classes=3, channels=(4, 8), hidden=16))),
    ):
        torch.manual_seed(0)
        trainer = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=folder / name)
        trainer.fit(task, datamodule)
        paths.append(folder / name / "last.ckpt")
        trainer.save_checkpoint(paths[-1])
    return paths[0], paths[1], datamodule


def test_fitted_prototypes_are_the_training_encodings_grouped_by_prediction(checkpoints) -> None:
    autoencoder_path, classifier_path, datamodule = checkpoints
    path = fit_and_save_prototypes(autoencoder_path, classifier_path, datamodule)
    assert path == autoencoder_path.parent / "class_prototypes.pt"
    autoencoder, classifier = load_generative(autoencoder_path), load_classifier(classifier_path)
    images = torch.cat([batch["image"] for batch in datamodule.eval_dataloader("train")])
    encodings = load_checked_prototypes(autoencoder_path, classifier_path)
    torch.testing.assert_close(encodings.encodings, autoencoder.encode(images), atol=1e-6, rtol=0)
    assert torch.equal(encodings.labels, classifier(images).argmax(1))
    assert encodings.sources["autoencoder"] == {
        "path": str(autoencoder_path.resolve()),
        "sha256": file_sha256(autoencoder_path),
    }
    assert encodings.sources["classifier"]["sha256"] == file_sha256(classifier_path)
    with pytest.raises(ValueError, match="was fitted with another classifier"):
        load_checked_prototypes(autoencoder_path, autoencoder_path)
    # what CounterfactualTask hands VLK: the loaded networks and prototypes
    counts = encodings.class_counts()
    test_images = images[:4]
    targets = torch.nonzero(counts > 0).flatten()[torch.arange(4) % int((counts > 0).sum())]
    result = VLK(classifier, autoencoder, encodings, c_steps=2, max_iterations=3).explain(test_images, targets)
    assert result.counterfactuals.shape == test_images.shape


def test_cfx_prototypes_writes_the_file_and_refuses_other_checkpoints_in_one_line(
    checkpoints, tmp_path, capsys
) -> None:
    autoencoder_path, classifier_path, _ = checkpoints
    data = ["--data", "cfx.data.SyntheticImages", "--data.init_args.num_samples=60", "--data.init_args.image_size=28"]
    output = tmp_path / "prototypes.pt"
    written = prototypes_main(
        ["--autoencoder", str(autoencoder_path), "--classifier", str(classifier_path), "--output", str(output), *data]
    )
    assert written == output and load_prototypes(output).encodings.shape == (len(load_prototypes(output).labels), 4)
    for autoencoder, message in ((tmp_path / "absent.ckpt", "no checkpoint at"), (classifier_path, "expected one of")):
        with pytest.raises(SystemExit) as exit_info:
            prototypes_main(["--autoencoder", str(autoencoder), "--classifier", str(classifier_path), *data])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_encoding_with_a_vae_is_refused() -> None:
    batches = [{"image": torch.rand(2, 1, 28, 28)}]
    with pytest.raises(ValueError, match=r"autoencoder\.encode must return \(N, D\) codes, got a tuple"):
        fit_class_encodings(ConvVAE(), MLPClassifier(), batches, 10)
