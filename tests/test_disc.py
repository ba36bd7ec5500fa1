import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

import cfx.counterfactual.disc as disc_module
from cfx.counterfactual import DISC
from cfx.counterfactual.objectives import (
    dep_consistency,
    duq_consistency,
    image_space_distance,
    latent_space_distance,
)
from cfx.nn import DUQFeatureClassifier, DUQHead, LossPredictingClassifier, LossPredictor
from cfx.nn.classifier import FeatureClassifier
from cfx.seeding import per_sample_seed

SIZE = 8
INR = {"width": 32, "depth": 2, "num_frequencies": 16}


class HalfBrightness(FeatureClassifier):
    """Class 0 when the left half of an 8x8 image is brighter than the right half, class 1 otherwise."""

    in_channels, num_classes, feature_dim, stage_channels, image_size = 1, 2, 2, (1, 2), SIZE

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        halves = torch.stack([images[..., : SIZE // 2].mean((1, 2, 3)), images[..., SIZE // 2 :].mean((1, 2, 3))], 1)
        second = torch.cat([images, 1 - images], 1)[..., ::2, ::2]
        return halves, [images, second]

    def classify(self, features: Tensor) -> Tensor:
        return self.scale * (features - features.mean(1, keepdim=True))


def left_bright_images(count: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 1, SIZE, SIZE, generator=generator) * 0.3
    images[..., :3] += 0.6
    return images


def make_disc(classifier: FeatureClassifier | None = None, **options) -> DISC:
    settings = dict(
        prior="inr",
        prior_options=INR,
        lr=1e-3,
        steps_per_stage=20,
        reconstruction_steps=100,
        reconstruction_lr=1e-3,
        max_iterations=200,
    )
    settings.update(options)
    return DISC(classifier or HalfBrightness(), **settings)


def test_dep_term_is_l1_distance_to_target_loss_or_its_hinge():
    predicted = torch.tensor([0.3, -1.2, 2.0])
    assert torch.allclose(dep_consistency(predicted, 0.5), torch.tensor([0.2, 1.7, 1.5]))
    # one-sided: only losses above s* cost anything
    assert torch.allclose(dep_consistency(predicted, 0.5, "hinge"), torch.tensor([0.0, 0.0, 1.5]))
    assert torch.allclose(
        dep_consistency(predicted, torch.tensor([0.0, -2.0, 3.0]), "hinge"), torch.tensor([0.3, 0.8, 0])
    )
    with pytest.raises(ValueError, match="form must be"):
        dep_consistency(predicted, 0.5, "squared")


def test_duq_term_is_kernel_margin():
    kernels = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3], [0.5, 0.3, 0.6]])
    source, target = torch.tensor([0, 0, 2]), torch.tensor([1, 1, 0])
    # max(K_y - K_ybar + 0.5, 0): 0.9 - 0.2 + 0.5, max(0.1 - 0.8 + 0.5, 0), 0.6 - 0.5 + 0.5
    assert torch.allclose(duq_consistency(kernels, source, target), torch.tensor([1.2, 0.0, 0.6]))


def test_iso_and_lso_terms_equal_direct_sums():
    a, b = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    expected = torch.tensor(
        [sum((x - y) ** 2 for x, y in zip(a[i].flatten(), b[i].flatten(), strict=True)) for i in range(3)]
    )
    assert torch.allclose(image_space_distance(a, b), expected)
    f, g = torch.rand(3, 5), torch.rand(3, 5)
    # LSO: each layer's squared distance is averaged over its entries (32 and 5 here), then summed over layers
    expected_latent = torch.tensor(
        [
            sum((x - y) ** 2 for x, y in zip(a[i].flatten(), b[i].flatten(), strict=True)) / 32
            + sum((x - y) ** 2 for x, y in zip(f[i], g[i], strict=True)) / 5
            for i in range(3)
        ]
    )
    assert torch.allclose(latent_space_distance([a, f], [b, g]), expected_latent)


def test_objective_combines_terms_with_their_weights():
    classifier = HalfBrightness()
    predictor = LossPredictor(classifier.stage_channels, hidden=4)
    explainer = make_disc(
        LossPredictingClassifier(classifier, predictor),
        semantic_layers=[0, 1],
        manifold="dep",
        target_loss=0.1,
        lambda_semantic=0.7,
        lambda_manifold=0.3,
        lambda_class=2.0,
    )
    queries, candidates = left_bright_images(3), torch.rand(3, 1, SIZE, SIZE)
    targets = torch.tensor([1, 1, 0])
    logits, representations, predicted = explainer._forward(candidates)
    _, query_representations, _ = explainer._forward(queries)
    loss = explainer.objective(
        logits, representations, predicted, query_representations, torch.zeros(3, dtype=torch.long), targets, 0.7, 0.1
    )
    # independent reference: layers straight from the classifier, CE by hand, predictor on the stage maps
    _, maps = classifier.forward_features(candidates)
    _, query_maps = classifier.forward_features(queries)
    semantic = sum(((m - q) ** 2).mean((1, 2, 3)) for m, q in zip(maps, query_maps, strict=True))
    log_probs = classifier(candidates).log_softmax(1)
    cross_entropy = -log_probs[torch.arange(3), targets]
    manifold = (predictor(maps) - 0.1).abs()
    assert torch.allclose(loss, 0.7 * semantic + 0.3 * manifold + 2.0 * cross_entropy, atol=1e-5)

    penultimate = make_disc(classifier, semantic="latent", semantic_layers="features", lambda_class=1.0)
    logits, representations, _ = penultimate._forward(candidates)
    _, query_representations, _ = penultimate._forward(queries)
    features = classifier.forward_features(candidates)[0]
    query_features = classifier.forward_features(queries)[0]
    loss = penultimate.objective(logits, representations, None, query_representations, targets, targets, 1.0, 0.0)
    expected = ((features - query_features) ** 2).mean(1) + F.cross_entropy(
        classifier(candidates), targets, reduction="none"
    )
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("layers", [None, "all"])
def test_default_semantic_term_sums_every_stage_map(layers):
    classifier = HalfBrightness()
    explainer = make_disc(classifier, semantic_layers=layers)
    queries, candidates = left_bright_images(2), torch.rand(2, 1, SIZE, SIZE)
    _, representations, _ = explainer._forward(candidates)
    _, query_representations, _ = explainer._forward(queries)
    semantic = explainer.semantic_distance(representations, query_representations)
    # hand-written: stage 0 is the 8x8 image (64 entries), stage 1 the subsampled [x, 1 - x] (2 x 4 x 4 = 32)
    for i in range(2):
        image_term = sum((c - q) ** 2 for c, q in zip(candidates[i].flatten(), queries[i].flatten(), strict=True))
        sub_c, sub_q = candidates[i, 0, ::2, ::2].flatten(), queries[i, 0, ::2, ::2].flatten()
        second_term = sum((c - q) ** 2 + ((1 - c) - (1 - q)) ** 2 for c, q in zip(sub_c, sub_q, strict=True))
        assert semantic[i].item() == pytest.approx((image_term / 64 + second_term / 32).item(), rel=1e-5)


def test_duq_objective_uses_the_head_on_penultimate_features():
    classifier = HalfBrightness()
    head = DUQHead(feature_dim=2, num_classes=2, embedding_dim=3)
    explainer = make_disc(
        classifier, semantic="image", manifold="duq", duq_head=head, lambda_manifold=1.0, lambda_class=0.0
    )
    queries, candidates = left_bright_images(2), torch.rand(2, 1, SIZE, SIZE)
    sources, targets = torch.tensor([0, 0]), torch.tensor([1, 1])
    logits, representations, kernels = explainer._forward(candidates)
    _, query_representations, _ = explainer._forward(queries)
    loss = explainer.objective(logits, representations, kernels, query_representations, sources, targets, 1.0, 0.0)
    k = head(classifier.forward_features(candidates)[0])
    expected = ((candidates - queries) ** 2).sum((1, 2, 3)) + (k[:, 0] - k[:, 1] + 0.5).clamp(min=0)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_a_duq_model_as_classifier_brings_its_own_head():
    head = DUQHead(feature_dim=2, num_classes=2, embedding_dim=3)
    duq_model = DUQFeatureClassifier(HalfBrightness(), head)
    explainer = make_disc(duq_model, manifold="duq", max_iterations=3)
    assert explainer.duq_head is head
    queries = left_bright_images(2)
    result = explainer.explain(queries, 1 - duq_model(queries).argmax(1))
    assert result.counterfactuals.shape == queries.shape and torch.isfinite(result.counterfactuals).all()


def test_query_target_loss_is_each_querys_predicted_loss(monkeypatch):
    classifier = HalfBrightness()
    predictor = LossPredictor(classifier.stage_channels, hidden=4)
    explainer = make_disc(
        LossPredictingClassifier(classifier, predictor), manifold="dep", target_loss="query", max_iterations=2
    )
    seen = []
    objective = DISC.objective

    def recording_objective(self, *args):
        seen.append(args[-1])
        return objective(self, *args)

    monkeypatch.setattr(DISC, "objective", recording_objective)
    images = left_bright_images(3)
    explainer.explain(images, torch.tensor([1, 0, 1]))
    expected = predictor(classifier.forward_features(images[[0, 2]])[1])
    assert torch.allclose(seen[0], expected)


def capture_generators(monkeypatch) -> list:
    """Record each generator DISC builds and a copy of its parameters right after the reconstruction fit."""
    captured = []
    fit = disc_module.fit_reconstruction

    def recording_fit(generator, images, steps, lr):
        result = fit(generator, images, steps, lr)
        captured.append((generator, [[p.detach().clone() for p in group] for group in generator.layer_groups()]))
        return result

    monkeypatch.setattr(disc_module, "fit_reconstruction", recording_fit)
    return captured


@pytest.mark.parametrize("stages_run", [1, 2, 4])
def test_progressive_stage_trains_only_its_groups(monkeypatch, stages_run):
    captured = capture_generators(monkeypatch)
    # confidence 0.99 is out of reach for this classifier in 20 steps: every query runs to max_iterations
    explainer = make_disc(
        HalfBrightness(scale=1.0), stages=5, steps_per_stage=5, max_iterations=5 * stages_run, confidence=0.99
    )
    result = explainer.explain(left_bright_images(2), torch.tensor([1, 1]))
    assert not result.success.any() and (result.iterations == 5 * stages_run).all()
    generator, initial = captured[0]
    for position, (group, before) in enumerate(zip(generator.layer_groups(), initial, strict=True)):
        changed = any(not torch.equal(p.detach(), b) for p, b in zip(group, before, strict=True))
        assert changed == (position < stages_run), f"group {position} after {stages_run} stage(s)"  # 3 groups


def test_semantic_weight_relaxes_by_kappa_each_stage(monkeypatch):
    seen = []
    objective = DISC.objective

    def recording_objective(self, *args):
        seen.append(args[-2])
        return objective(self, *args)

    monkeypatch.setattr(DISC, "objective", recording_objective)
    explainer = make_disc(
        HalfBrightness(scale=1.0),
        lambda_semantic=0.8,
        kappa=0.5,
        stages=2,
        steps_per_stage=3,
        confidence=0.99,
        max_iterations=8,
    )
    explainer.explain(left_bright_images(1), torch.tensor([1]))
    assert seen == pytest.approx([0.8] * 3 + [0.4] * 5)


def test_reaches_target_on_easy_classifier_and_records_path():
    explainer = make_disc(semantic="image", lambda_semantic=0.01, path_every=10, max_iterations=200)
    images = left_bright_images(3)
    result = explainer.explain(images, torch.tensor([1, 1, 1]))
    assert result.success.all()
    assert (result.target_probability >= 0.5).all()
    assert (HalfBrightness()(result.counterfactuals).argmax(1) == 1).all()
    assert (result.original_prediction == 0).all()
    assert (result.iterations > 0).all()
    assert result.path.shape == (3, 21, 1, SIZE, SIZE)
    last_frame = (result.iterations // 10 + 1).clamp(max=20)
    for i in range(3):
        assert torch.equal(result.path[i, last_frame[i]], result.counterfactuals[i])
        assert torch.equal(result.path[i, -1], result.counterfactuals[i])


def test_query_already_at_target_is_returned_unchanged(monkeypatch):
    def no_generator(*args, **kwargs):
        raise AssertionError("no generator should be built")

    monkeypatch.setattr(disc_module, "make_generator", no_generator)
    images = left_bright_images(2)
    result = make_disc(path_every=50).explain(images, torch.tensor([0, 0]))
    assert torch.equal(result.counterfactuals, images)
    assert result.success.all() and (result.iterations == 0).all()
    assert torch.equal(result.path, images[:, None].expand(-1, 5, -1, -1, -1))


def test_mixed_batch_optimises_only_queries_off_target():
    images = left_bright_images(3)
    explainer = make_disc(semantic="image", lambda_semantic=0.01)
    result = explainer.explain(images, torch.tensor([0, 1, 0]))
    assert torch.equal(result.counterfactuals[[0, 2]], images[[0, 2]])
    assert result.iterations[0] == 0 and result.iterations[2] == 0 and result.iterations[1] > 0
    assert result.success.all()


def test_dep_reads_the_predictor_the_classifier_carries():
    classifier = HalfBrightness()
    predictor = LossPredictor(classifier.stage_channels, hidden=5)
    explainer = make_disc(LossPredictingClassifier(classifier, predictor), manifold="dep", semantic="image")
    candidates = torch.rand(2, 1, SIZE, SIZE)
    _, _, predicted = explainer._forward(candidates)
    torch.testing.assert_close(predicted, predictor(classifier.forward_features(candidates)[1]))
    with pytest.raises(ValueError, match=r"no loss_predictor: load a DEPTask checkpoint with cfx\.tasks\.load_"):
        make_disc(classifier, manifold="dep")


def test_generator_seeds_follow_the_per_sample_seed_rule(monkeypatch):
    captured = capture_generators(monkeypatch)
    images, indices = left_bright_images(3), torch.tensor([4, 9, 2])
    make_disc(seed=5, max_iterations=1).explain(images, torch.tensor([1, 0, 1]), indices)  # query 1 is at target
    torch.testing.assert_close(captured[0][0]._seeds, per_sample_seed(torch.tensor([4, 2]), 5))
    seeds_0, seeds_1 = per_sample_seed(torch.arange(1000), 0), per_sample_seed(torch.arange(1000), 1)
    assert not set(seeds_0.tolist()) & set(seeds_1.tolist())  # the old index + seed * 1_000_003 rule collided


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prior": "gan"}, "prior must be one of"),
        ({"semantic": "pixels"}, "semantic must be one of"),
        ({"manifold": "ddu"}, "manifold must be one of"),
        ({"semantic_layers": [2]}, "semantic_layers"),
        ({"semantic_layers": []}, "semantic_layers"),
        ({"semantic_layers": "pooled"}, "semantic_layers"),
        ({"semantic": "image", "semantic_layers": [0]}, "only applies"),
        ({"semantic": "image", "semantic_layers": "features"}, "only applies"),
        ({"manifold_form": "squared"}, "manifold_form must be one of"),
        ({"stop": "never"}, "stop must be one of"),
        ({"best_by": "random"}, "best_by must be one of"),
        ({"stop": "schedule", "confidence": 0.9, "stop_confidence": 0.8}, "stop_confidence"),
        ({"stop": "schedule", "stop_confidence": 1.5}, "stop_confidence"),
        ({"target_loss_quantile": 1.5}, "target_loss_quantile"),
        ({"target_loss": torch.zeros(3)}, "2 finite floats"),
        ({"target_loss": torch.tensor([0.0, float("nan")])}, "2 finite floats"),
        ({"manifold": "dep"}, "no loss_predictor"),
        ({"manifold": "duq"}, "needs a duq_head"),
        ({"lambda_semantic": -1.0}, "lambda_semantic"),
        ({"kappa": 0.0}, "kappa"),
        ({"max_iterations": -1}, "max_iterations"),
        ({"confidence": 0.0}, "confidence"),
        ({"path_every": 0}, "path_every"),
        ({"stages": 0}, "stages"),
        ({"target_loss": "low"}, "target_loss"),
    ],
)
def test_bad_configuration_raises(options, message):
    with pytest.raises(ValueError, match=message):
        make_disc(**options)


def test_bf16_autocast_reaches_target():
    result = make_disc(semantic="image", lambda_semantic=0.01, bf16=True).explain(
        left_bright_images(2), torch.tensor([1, 1])
    )
    assert result.success.all()
    assert result.counterfactuals.dtype == torch.float32
    assert (HalfBrightness()(result.counterfactuals).argmax(1) == 1).all()


class BrightnessBand(FeatureClassifier):
    """Class 1 while an image's mean brightness lies strictly inside (0.5, 0.6), class 0 otherwise."""

    in_channels, num_classes, feature_dim, stage_channels, image_size = 1, 2, 1, (1,), SIZE

    def forward_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        return images.mean((1, 2, 3))[:, None], [images]

    def classify(self, features: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(features), 100.0 * (features - 0.5) * (0.6 - features)], 1)


def darkening_disc(**options) -> DISC:
    """Pixel DISC whose only force is the l2 prior: every pixel darkens by about ``lr`` per step (Adam)."""
    settings = dict(
        prior="pixel",
        prior_options={"tv_weight": 0.0, "l2_weight": 1.0},
        semantic="image",
        lambda_semantic=0.0,
        lambda_class=0.0,
        lr=0.02,
        stages=1,
        steps_per_stage=40,
        reconstruction_steps=0,
        max_iterations=60,
        path_every=1,
    )
    settings.update(options)
    return DISC(BrightnessBand(), **settings)


def band_queries() -> Tensor:
    return 0.8 + 0.05 * torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("best_by", ["latest", "l1", "semantic"])
def test_schedule_returns_the_best_valid_iterate(best_by):
    queries = band_queries()
    result = darkening_disc(stop="schedule", stop_confidence=None, best_by=best_by).explain(queries, [1, 1])
    assert (result.iterations == 40).all()  # the schedule's end (1 stage x 40 steps), before max_iterations
    for i in range(2):
        path = result.path[i, :41]  # the iterate after every step 0..40
        probability = BrightnessBand()(path).softmax(1)[:, 1]
        valid = probability >= 0.5
        # brightness falls through the band: valid iterates in the middle, none at either end
        assert valid.any() and not valid[0] and not valid[-1]
        if best_by == "latest":
            score = -torch.arange(41.0)
        elif best_by == "l1":
            score = (path - queries[i]).abs().sum((1, 2, 3))
        else:
            score = (path - queries[i]).square().sum((1, 2, 3))
        best = int(torch.where(valid, score, torch.inf).argmin())  # brute force; argmin takes the first tie
        first, last = int(valid.nonzero()[0]), int(valid.nonzero()[-1])
        assert best == (last if best_by == "latest" else first)
        assert result.success[i] and result.details["counterfactual_iteration"][i] == best
        torch.testing.assert_close(result.counterfactuals[i], path[best])
        torch.testing.assert_close(result.target_probability[i], probability[best])


def test_first_valid_stops_at_the_first_valid_iterate_and_schedule_can_stop_early():
    queries = band_queries()
    first_valid = darkening_disc().explain(queries, [1, 1])
    schedule = darkening_disc(stop="schedule", stop_confidence=0.5, best_by="latest").explain(queries, [1, 1])
    for result in (first_valid, schedule):  # stop_confidence = confidence: the first valid iterate ends it
        assert result.success.all()
        torch.testing.assert_close(result.details["counterfactual_iteration"], result.iterations)
        for i in range(2):
            probabilities = BrightnessBand()(result.path[i]).softmax(1)[:, 1]
            assert result.iterations[i] == int((probabilities >= 0.5).nonzero()[0])
    torch.testing.assert_close(schedule.counterfactuals, first_valid.counterfactuals)


def test_a_schedule_without_valid_iterate_fails_with_its_last_iterate():
    # lr 0.002: the brightness never reaches the band within the 40 steps
    result = darkening_disc(stop="schedule", stop_confidence=None, lr=0.002).explain(band_queries(), [1, 1])
    assert not result.success.any() and (result.iterations == 40).all()
    torch.testing.assert_close(result.counterfactuals, result.path[:, 40])
    assert (result.details["counterfactual_iteration"] == 40).all()


def test_schedule_run_to_its_end_trains_every_stage(monkeypatch):
    captured = capture_generators(monkeypatch)
    gradients_seen = {}
    step = DISC.step

    def recording_step(self, search, gradients, iteration):
        gradients_seen[iteration] = [g is not None and bool(g.abs().sum() > 0) for g in gradients]
        return step(self, search, gradients, iteration)

    monkeypatch.setattr(DISC, "step", recording_step)
    # INR of depth 2: 3 layer groups = 3 stages of 4 steps; confidence 0.99 is out of reach at scale 1
    explainer = make_disc(
        HalfBrightness(scale=1.0), stop="schedule", stop_confidence=None, steps_per_stage=4, confidence=0.99
    )
    result = explainer.explain(left_bright_images(2), torch.tensor([1, 1]))
    assert (result.iterations == 12).all() and (result.details["stage"] == 2).all()
    generator, initial = captured[0]
    groups = generator.layer_groups()
    parameter_count = sum(len(group) for group in groups)
    for iteration in (8, 9, 10, 11):  # the last stage: every parameter has a non-zero gradient
        assert len(gradients_seen[iteration]) == parameter_count and all(gradients_seen[iteration])
    assert len(gradients_seen[0]) == len(groups[0])  # the first stage trains the first group only
    for group, before in zip(groups, initial, strict=True):
        assert all(not torch.equal(p.detach(), b) for p, b in zip(group, before, strict=True))


def test_details_say_the_stage_and_the_distances_to_the_reconstruction_start(monkeypatch):
    starts = []
    fit = disc_module.fit_reconstruction

    def recording_fit(generator, images, steps, lr):
        result = fit(generator, images, steps, lr)
        with torch.no_grad():
            starts.append(generator().detach().clone())
        return result

    monkeypatch.setattr(disc_module, "fit_reconstruction", recording_fit)
    explainer = make_disc(semantic="image", lambda_semantic=0.01, steps_per_stage=5)
    images = left_bright_images(3)
    result = explainer.explain(images, torch.tensor([1, 0, 1]))  # query 1 is at its target already
    assert set(result.details) == set(explainer.detail_fields())
    assert result.success.all() and result.iterations[1] == 0
    changed = torch.tensor([0, 2])
    start = starts[0]  # the reconstructions of queries 0 and 2
    assert not torch.equal(start, images[changed])  # an INR reconstruction is not the query
    difference = (result.counterfactuals[changed] - start).flatten(1)
    torch.testing.assert_close(result.details["l1_from_start"][changed], difference.abs().sum(1))
    torch.testing.assert_close(result.details["l2_from_start"][changed], difference.norm(dim=1))
    # INR depth 2: 3 groups, so stages 0..2; the stage of the last step taken
    expected_stage = ((result.iterations[changed] - 1) // 5).clamp(max=2)
    torch.testing.assert_close(result.details["stage"][changed], expected_stage)
    assert result.details["stage"][1] == -1 and result.details["counterfactual_iteration"][1] == 0
    assert result.details["l1_from_start"][1].isnan() and result.details["l2_from_start"][1].isnan()


def test_target_loss_tensor_is_indexed_by_the_target_class(monkeypatch):
    classifier = HalfBrightness()
    predictor = LossPredictor(classifier.stage_channels, hidden=4)
    explainer = make_disc(
        LossPredictingClassifier(classifier, predictor),
        manifold="dep",
        target_loss=torch.tensor([0.3, -0.7], dtype=torch.float64),
        max_iterations=1,
    )
    seen = []
    objective = DISC.objective

    def recording_objective(self, *args):
        seen.append(args[-1])
        return objective(self, *args)

    monkeypatch.setattr(DISC, "objective", recording_objective)
    left = left_bright_images(2)
    queries = torch.stack([left[0], left[1].flip(-1), left[1]])  # predicted 0, 1, 0: every query is searched
    explainer.explain(queries, torch.tensor([1, 0, 1]))
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], torch.tensor([-0.7, 0.3, -0.7]))


def test_quantile_target_loss_must_be_handed_in():
    classifier = HalfBrightness()
    predictor = LossPredictor(classifier.stage_channels, hidden=4)
    explainer = make_disc(LossPredictingClassifier(classifier, predictor), manifold="dep", target_loss="quantile")
    assert explainer.target_loss_quantile == 0.5
    with pytest.raises(ValueError, match="filled in by the CounterfactualTask"):
        explainer.explain(left_bright_images(1), torch.tensor([1]))


@pytest.mark.parametrize("form", ["hinge", "absolute"])
def test_hinge_form_does_not_push_a_query_below_target_loss_up(form):
    classifier = HalfBrightness(scale=1.0)
    predictor = LossPredictor(classifier.stage_channels, hidden=4)
    model = LossPredictingClassifier(classifier, predictor)
    queries = left_bright_images(2)
    with torch.no_grad():
        query_losses = predictor(classifier.forward_features(queries)[1])
    target_loss = torch.stack([query_losses.max() - 5.0, query_losses.max() + 1.0])  # s* of target class 1 above
    explainer = DISC(
        model,
        prior="pixel",
        prior_options={"tv_weight": 0.0, "l2_weight": 0.0},
        semantic="image",
        manifold="dep",
        manifold_form=form,
        target_loss=target_loss,
        lambda_semantic=0.0,
        lambda_class=0.0,
        lambda_manifold=1.0,
        lr=0.05,
        reconstruction_steps=0,
        confidence=0.99,  # out of reach at scale 1: every query runs max_iterations steps
        max_iterations=5,
    )
    result = explainer.explain(queries, torch.tensor([1, 1]))
    assert (result.iterations == 5).all()
    with torch.no_grad():
        losses = predictor(classifier.forward_features(result.counterfactuals)[1])
    if form == "hinge":  # below s*: no force at all, the query comes back as it went in
        torch.testing.assert_close(result.counterfactuals, queries)
    else:  # |G - s*| pulls the predicted loss up towards s*
        assert (losses > query_losses + 1e-3).all()
