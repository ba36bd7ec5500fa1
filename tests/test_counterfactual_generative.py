"""CounterfactualTask with generative auxiliaries: the AnoGAN realism scores (``realism``) and the VAE /
autoencoder / class prototypes handed to explainers (``generative``)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cfx.counterfactual import REVISE, VLK
from cfx.counterfactual.base import CounterfactualResult, Explainer
from cfx.counterfactual.vlk import ClassEncodings, fit_class_encodings
from cfx.data import SyntheticImages
from cfx.metrics.functional.anogan import ANOGAN_KEYS, anogan_score
from cfx.metrics.functional.counterfactual import PAIR_SCHEMA, record_keys
from cfx.nn import SmallCNN
from cfx.nn.generative import GAN, ConvAutoencoder, ConvVAE, WGANCritic, WGANGenerator
from cfx.results import open_results
from cfx.tasks import AutoencoderTask, ClassificationTask, CounterfactualTask, GANTask, VAETask, load_classifier
from cfx.tasks.generative import load_generative
from tests.test_counterfactual_task import PatchExplainer
from tests.trainers import quiet_trainer

NUM_CLASSES = 3
REALISM_OPTIONS = {"steps": 4, "restarts": 2, "step_size": 0.05}


def _synthetic(channels: int = 1, size: int = 28, **kwargs) -> SyntheticImages:
    return SyntheticImages(
        num_samples=60, num_classes=NUM_CLASSES, in_channels=channels, image_size=size, noise=0.3, batch_size=8,
        **kwargs,
    )  # fmt: skip


def _fit(task, folder: Path, channels: int = 1, steps: int = 2) -> Path:
    """``task`` trained for ``steps`` steps on 28 px SyntheticImages, saved as ``folder/last.ckpt``."""
    folder.mkdir(parents=True)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=str(folder))
    trainer.fit(task, _synthetic(channels))
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A 1-channel classifier (any size), a WGAN, a 3-channel WGAN, a VAE, and an autoencoder with its prototypes."""
    root = tmp_path_factory.mktemp("generative")
    torch.manual_seed(0)
    paths = {
        "classifier": _fit(
            ClassificationTask(SmallCNN(in_channels=1, num_classes=NUM_CLASSES, channels=(4, 8), hidden=16)),
            root / "classifier",
        ),
        "gan": _fit(GANTask(WGANGenerator(latent_dim=8), WGANCritic(), critic_steps=1, grid_samples=4), root / "gan"),
        "rgb_gan": _fit(
            GANTask(WGANGenerator(8, out_channels=3), WGANCritic(in_channels=3), critic_steps=1, grid_samples=4),
            root / "rgb_gan",
            channels=3,
        ),
        "vae": _fit(VAETask(ConvVAE(latent_dim=4), grid_images=4), root / "vae", steps=1),
        "autoencoder": _fit(AutoencoderTask(ConvAutoencoder(latent_dim=4), grid_images=4), root / "ae", steps=1),
    }
    datamodule = _synthetic()
    datamodule.setup()
    encodings = fit_class_encodings(
        load_generative(paths["autoencoder"]),
        load_classifier(paths["classifier"]),
        datamodule.eval_dataloader("train"),
        NUM_CLASSES,
    )
    encodings.save(root / "ae" / "class_prototypes.pt")
    return paths


def _run(task: CounterfactualTask, eval_batch_size: int = 3) -> dict:
    metrics = quiet_trainer(inference_mode=False).test(task, _synthetic(eval_batch_size=eval_batch_size), verbose=False)
    results = open_results(task.output_dir)
    assert results.finished
    return {**results.record(), "metadata": results.metadata, "summary": results.summary(), "metrics": metrics[0]}


def test_realism_stores_the_anogan_scores_of_counterfactuals_and_queries(checkpoints, tmp_path):
    task = CounterfactualTask(
        str(checkpoints["classifier"]), PatchExplainer, realism=str(checkpoints["gan"]),
        realism_options=REALISM_OPTIONS, output_dir=str(tmp_path / "out"), max_queries=5,
    )  # fmt: skip
    results = _run(task)
    assert [key for key, value in results.items() if isinstance(value, torch.Tensor)] == list(record_keys(ANOGAN_KEYS))
    assert results["anogan"].dtype == PAIR_SCHEMA["anogan"].dtype == torch.float64
    # the reference: every pair's counterfactual and every query scored in one call of their own
    dataset = _synthetic().dataset("test")
    position = {int(dataset[i]["index"]): i for i in range(len(dataset))}
    queries = torch.stack([dataset[position[int(index)]]["image"] for index in results["index"]])
    counterfactuals = (
        PatchExplainer(load_classifier(checkpoints["classifier"]))
        .explain(queries, results["target"], results["index"])
        .counterfactuals
    )
    gan = load_generative(checkpoints["gan"])
    expected = anogan_score(counterfactuals, results["index"], gan.generator, gan.critic, **REALISM_OPTIONS)
    expected_queries = anogan_score(queries, results["index"], gan.generator, gan.critic, **REALISM_OPTIONS)
    torch.testing.assert_close(results["anogan"], expected.double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(results["query_anogan"], expected_queries.double(), rtol=1e-4, atol=0)
    assert not torch.allclose(results["anogan"], results["query_anogan"])  # the patch changes the score
    success, summary = results["success"], results["summary"]
    assert 0 < success.sum() < len(success)
    assert summary["anogan"] == pytest.approx(results["anogan"][success].mean().item(), rel=1e-12)
    assert summary["query_anogan"] == pytest.approx(results["query_anogan"][success].mean().item(), rel=1e-12)
    assert results["metrics"]["test/anogan"] == pytest.approx(summary["anogan"])
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["metrics"]["query_anogan"] == summary["query_anogan"]
    assert results["metadata"]["realism"] == {
        "path": str(checkpoints["gan"]),
        "sha256": hashlib.sha256(checkpoints["gan"].read_bytes()).hexdigest(),
    }
    assert results["metadata"]["task"]["realism_options"] == REALISM_OPTIONS


def _result(classifier: nn.Module, images, counterfactuals, targets) -> CounterfactualResult:
    with torch.no_grad():
        probabilities = classifier(counterfactuals).softmax(1)
        original_prediction = classifier(images).argmax(1)
    return CounterfactualResult(
        counterfactuals=counterfactuals,
        success=probabilities.argmax(1) == targets,
        target_probability=probabilities.gather(1, targets[:, None]).squeeze(1),
        original_prediction=original_prediction,
        iterations=torch.zeros_like(targets),
    )


class ReconstructingExplainer(Explainer):
    """A stand-in for REVISE: the counterfactual is the VAE's reconstruction of the query (from its mean)."""

    def __init__(self, classifier, vae: nn.Module, strength: float = 1.0):
        super().__init__(classifier)
        self.vae, self.strength = vae, strength

    def explain(self, images, targets, indices=None):
        self.check_query(images, targets)
        with torch.no_grad():
            counterfactuals = self.vae.decode(self.vae.encode(images)[0])
        return _result(self.classifier, images, counterfactuals, targets)


class PrototypeExplainer(Explainer):
    """A stand-in for VLK: takes an autoencoder and class prototypes; the counterfactual is the reconstruction."""

    def __init__(self, classifier, autoencoder: nn.Module, prototypes: ClassEncodings):
        super().__init__(classifier)
        self.autoencoder, self.prototypes = autoencoder, prototypes

    def explain(self, images, targets, indices=None):
        self.check_query(images, targets)
        with torch.no_grad():
            counterfactuals = self.autoencoder(images)
        return _result(self.classifier, images, counterfactuals, targets)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generative_models_and_prototypes_are_handed_to_the_explainer(checkpoints, tmp_path):
    task = CounterfactualTask(
        str(checkpoints["classifier"]), ReconstructingExplainer, generative=str(checkpoints["vae"]),
        output_dir=str(tmp_path / "vae"), max_queries=2,
    )  # fmt: skip
    vae = task.explainer.vae
    assert isinstance(vae, ConvVAE) and vae is task.generative_model and not vae.training
    assert not any(parameter.requires_grad for parameter in vae.parameters())
    reference = load_generative(checkpoints["vae"])
    assert all(
        torch.equal(a, b) for a, b in zip(vae.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    results = _run(task)
    assert len(results["index"]) == 4
    metadata = results["metadata"]
    assert metadata["explainer"]["init_args"]["vae"] == str(checkpoints["vae"])
    assert metadata["generative"] == {"path": str(checkpoints["vae"]), "sha256": _digest(checkpoints["vae"])}
    assert metadata["prototypes"] is None and metadata["realism"] is None

    task = CounterfactualTask(
        str(checkpoints["classifier"]), PrototypeExplainer, generative=str(checkpoints["autoencoder"]),
        output_dir=str(tmp_path / "prototypes"), max_queries=2,
    )  # fmt: skip
    assert isinstance(task.explainer.autoencoder, ConvAutoencoder)
    prototypes_file = checkpoints["autoencoder"].parent / "class_prototypes.pt"
    assert isinstance(task.explainer.prototypes, ClassEncodings)
    assert torch.equal(task.explainer.prototypes.encodings, torch.load(prototypes_file)["encodings"])
    metadata = _run(task)["metadata"]
    assert metadata["explainer"]["init_args"] == {
        "autoencoder": str(checkpoints["autoencoder"]),
        "prototypes": str(prototypes_file),
    }
    assert metadata["prototypes"] == {"path": str(prototypes_file), "sha256": _digest(prototypes_file)}


def test_revise_and_vlk_are_built_with_the_tasks_models(checkpoints):
    classifier = str(checkpoints["classifier"])
    revise = CounterfactualTask(
        classifier, functools.partial(REVISE, max_iterations=3), generative=str(checkpoints["vae"])
    )
    assert isinstance(revise.explainer, REVISE) and revise.explainer.vae is revise.generative_model
    vlk = CounterfactualTask(classifier, VLK, generative=str(checkpoints["autoencoder"]))
    assert vlk.explainer.autoencoder is vlk.generative_model and isinstance(vlk.explainer.prototypes, ClassEncodings)


def test_missing_mismatched_and_doubly_named_auxiliaries_are_clear_errors(checkpoints, tmp_path):
    classifier = str(checkpoints["classifier"])
    with pytest.raises(
        ValueError, match=r"ReconstructingExplainer needs a VAE: set the CounterfactualTask's `generative:`"
    ):
        CounterfactualTask(classifier, ReconstructingExplainer)
    with pytest.raises(ValueError, match=r"needs a VAE: .* \(it is .*ae/last.ckpt, which holds a ConvAutoencoder\)"):
        CounterfactualTask(classifier, ReconstructingExplainer, generative=str(checkpoints["autoencoder"]))
    with pytest.raises(
        ValueError, match=r"PrototypeExplainer needs an autoencoder: .*`generative:` to an AutoencoderTask"
    ):
        CounterfactualTask(classifier, PrototypeExplainer, generative=str(checkpoints["vae"]))
    with pytest.raises(ValueError, match="the VAE is named twice: set only the CounterfactualTask's `generative:`"):
        CounterfactualTask(
            classifier, functools.partial(ReconstructingExplainer, vae=ConvVAE()), generative=str(checkpoints["vae"])
        )
    with pytest.raises(ValueError, match=r"`generative:` is set .* but PatchExplainer takes none of \['vae'"):
        CounterfactualTask(classifier, PatchExplainer, generative=str(checkpoints["vae"]))
    lonely = tmp_path / "lonely"  # an autoencoder checkpoint without prototypes beside it
    lonely.mkdir()
    (lonely / "last.ckpt").write_bytes(checkpoints["autoencoder"].read_bytes())
    with pytest.raises(FileNotFoundError, match="no class prototypes at"):
        CounterfactualTask(classifier, PrototypeExplainer, generative=str(lonely / "last.ckpt"))
    with pytest.raises(
        ValueError, match=r"`realism:` must be the checkpoint of a GAN \(a GANTask\); .* holds a ConvVAE"
    ):
        CounterfactualTask(classifier, PatchExplainer, realism=str(checkpoints["vae"]))
    with pytest.raises(
        ValueError, match=r"ReconstructingExplainer needs a VAE: .* \(it is .*gan/last.ckpt, which holds a GAN\)"
    ):
        CounterfactualTask(classifier, ReconstructingExplainer, generative=str(checkpoints["gan"]))
    with pytest.raises(ValueError, match="the realism model .* does not fit the classifier .*: it takes 3 channel"):
        CounterfactualTask(classifier, PatchExplainer, realism=str(checkpoints["rgb_gan"]))
    with pytest.raises(ValueError, match="realism_options go with realism"):
        CounterfactualTask(classifier, PatchExplainer, realism_options={"steps": 3})
    with pytest.raises(ValueError, match=r"the AnoGAN settings are .* unknown \['iterations'\]"):
        CounterfactualTask(
            classifier, PatchExplainer, realism=str(checkpoints["gan"]), realism_options={"iterations": 3}
        )
    task = CounterfactualTask(
        classifier, PatchExplainer, realism=str(checkpoints["gan"]), output_dir=str(tmp_path / "o")
    )
    with pytest.raises(
        ValueError, match="SyntheticImages does not match GAN: the data is 32 px, the network was built for 28"
    ):
        quiet_trainer(inference_mode=False).test(task, _synthetic(size=32), verbose=False)
    assert isinstance(task.realism_model, GAN)


@pytest.mark.parametrize("method", ["revise", "vlk"])
def test_the_shipped_revise_and_vlk_configs_run_on_tiny_checkpoints(checkpoints, method, tmp_path, monkeypatch):
    from cfx.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "counterfactual" / f"embedded_mnist_{method}.yaml"
    generative = checkpoints["vae" if method == "revise" else "autoencoder"]
    if method == "vlk":  # the 2-step classifier predicts one class: encodings labelled by class instead
        generative = tmp_path / "ae" / "last.ckpt"
        generative.parent.mkdir()
        generative.write_bytes(checkpoints["autoencoder"].read_bytes())
        encodings = torch.randn(3 * NUM_CLASSES, 4, generator=torch.Generator().manual_seed(0))
        ClassEncodings(encodings, torch.arange(3 * NUM_CLASSES) % NUM_CLASSES, NUM_CLASSES).save(
            generative.parent / "class_prototypes.pt"
        )
    cli = main(
        [
            "test",
            "-c",
            str(config),
            f"--model.classifier={checkpoints['classifier']}",
            f"--model.generative={generative}",
            "--model.max_queries=2",
            "--model.explainer.init_args.max_iterations=6",
            "--data=cfx.data.SyntheticImages",
            "--data.init_args.num_samples=60",
            f"--data.init_args.num_classes={NUM_CLASSES}",
            "--data.init_args.image_size=28",
            "--data.init_args.eval_batch_size=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    results = open_results(tmp_path / "runs" / "counterfactual" / f"embedded_mnist_{method}")
    assert results.finished and len(results) == 2 * (NUM_CLASSES - 1)
    assert results.metadata["explainer"]["class_path"] == f"cfx.counterfactual.{method.upper()}"
    assert cli.trainer.callback_metrics["test/pairs"] == len(results)
