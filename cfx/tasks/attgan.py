"""AttGANTask: training an attribute-conditioned AttGAN (WGAN-GP, attribute classification, reconstruction).

Built on :class:`~cfx.tasks.generative.GenerativeTask`: everything random in a training step (the target attributes
and the gradient penalty's interpolation weights) comes from the task's seeded batch generator, and the
discriminator / generator alternation is a function of the ``training_batches`` count, so a fit resumed from an
epoch's ``last.ckpt`` ends with the weights of an uninterrupted one. The data's attribute names (those the AttGAN
was trained on) are stored with the AttGAN in the checkpoint; :func:`~cfx.tasks.generative.load_generative` returns
the :class:`~cfx.nn.attgan.AttGAN` knowing them.

Under DDP it needs ``strategy: ddp_find_unused_parameters_true`` (the discriminator step does not use the
generator's parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from cfx.nn.attgan import AttGAN
from cfx.nn.duq import gradient_penalty
from cfx.nn.evaluation import evaluation_mode
from cfx.tasks.classification import STAGES
from cfx.tasks.generative import GenerativeTask, check_image_data_matches

TRAINING_TERMS = (
    "discriminator_loss",
    "wasserstein",
    "discriminator_attribute_loss",
    "generator_loss",
    "generator_adversarial_loss",
    "generator_attribute_loss",
    "reconstruction_loss",
)
EVALUATION_TERMS = ("reconstruction_l1", "attribute_accuracy")


def _check_weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


class AttGANTask(GenerativeTask):
    """AttGAN training with manual optimisation: ``critic_steps`` discriminator updates per generator update.

    Each training batch of images ``x`` with attributes ``a`` draws target attributes ``b`` = the batch's
    attributes permuted (seeded). The discriminator ``D = (critic, attribute head)`` is updated on every batch on
    ``mean critic(G(x, b)) - mean critic(x) + gradient_penalty * GP + discriminator_attribute_weight *
    BCE(head(x), a)`` (GP: the two-sided WGAN-GP penalty at random interpolates of ``x`` and ``G(x, b)``; 0 disables
    it). After every ``critic_steps``-th batch the generator is updated on ``-mean critic(G(x, b)) +
    generator_attribute_weight * BCE(head(G(x, b)), b) + reconstruction_weight * mean |G(x, a) - x|`` (the
    reconstruction decodes the same encoding with the image's own attributes). Both use Adam with ``lr`` and
    ``betas``.

    Logs (sample-weighted epoch means, exact under DDP) ``train/<term>`` for ``discriminator_loss``,
    ``wasserstein`` (``mean critic(x) - mean critic(G(x, b))``), ``discriminator_attribute_loss``,
    ``gradient_penalty`` (with a penalty), ``generator_loss`` and its parts ``generator_adversarial_loss``,
    ``generator_attribute_loss`` and ``reconstruction_loss`` (mean absolute error per pixel); in validation / test
    ``{stage}/reconstruction_l1`` (per image: the sum of ``|G(x, a) - x|`` over its pixels, as
    :class:`~cfx.tasks.generative.ReconstructionTask`) and ``{stage}/attribute_accuracy`` (per image: the share of
    its attributes the discriminator's head gets right on the real image).

    After every validation epoch it writes ``<log_dir>/attributes/epoch_<epoch>.png`` (rank 0, not without a
    logger): one row per validation image of the first batch: the image, its reconstruction, then the image with
    each attribute flipped (one column per attribute, in order).

    The data must carry attributes (``sample["attributes"]`` and ``datamodule.attribute_names``, e.g.
    ``attributes: morphometric`` on embedded MNIST, or CelebA's own). ``attributes`` selects some of them by name
    (CelebA's 13 of its 40); by default all are used. Their count must be the networks' ``num_attributes``.

    Args:
        generator: an :class:`~cfx.nn.attgan.AttGANGenerator`.
        discriminator: an :class:`~cfx.nn.attgan.AttGANDiscriminator` for the same attributes and images.
        lr: Adam's learning rate of both networks (2e-4 in AttGAN).
        betas: Adam's betas of both networks.
        critic_steps: discriminator updates per generator update (>= 1; 5 in AttGAN).
        gradient_penalty: weight of the WGAN-GP penalty (>= 0; 10 in AttGAN).
        reconstruction_weight: weight of the generator's reconstruction loss (100 in AttGAN).
        generator_attribute_weight: weight of the generator's attribute loss (10 in AttGAN).
        discriminator_attribute_weight: weight of the discriminator's attribute loss (1 in AttGAN).
        attributes: names of the data's attributes to model, in this order; ``None`` = all of the data's.
        seed: seed of the target attributes and the penalty's interpolation weights.
        grid_images: validation images (rows) in the per-epoch attribute grid.

    Raises:
        ValueError: an argument outside the ranges above, or ``attributes`` not ``num_attributes`` distinct names.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        critic_steps: int = 5,
        gradient_penalty: float = 10.0,
        reconstruction_weight: float = 100.0,
        generator_attribute_weight: float = 10.0,
        discriminator_attribute_weight: float = 1.0,
        attributes: Sequence[str] | None = None,
        seed: int = 0,
        grid_images: int = 4,
    ):
        super().__init__(seed)
        if isinstance(critic_steps, bool) or not isinstance(critic_steps, int) or critic_steps < 1:
            raise ValueError(f"critic_steps must be a positive integer, got {critic_steps!r}")
        for name, value in (
            ("gradient_penalty", gradient_penalty),
            ("reconstruction_weight", reconstruction_weight),
            ("generator_attribute_weight", generator_attribute_weight),
            ("discriminator_attribute_weight", discriminator_attribute_weight),
        ):
            _check_weight(name, value)
        if isinstance(grid_images, bool) or not isinstance(grid_images, int) or grid_images < 1:
            raise ValueError(f"grid_images must be a positive integer, got {grid_images!r}")
        self.network = AttGAN(generator, discriminator)
        if attributes is not None:
            attributes = list(attributes)
            if len(attributes) != generator.num_attributes or len(set(attributes)) != len(attributes):
                raise ValueError(
                    f"attributes must name the generator's {generator.num_attributes} attributes (distinct), "
                    f"got {len(attributes)}: {attributes}"
                )
        self.save_hyperparameters()
        self.save_network_configs("generator", "discriminator")
        self.automatic_optimization = False
        self.lr, self.betas, self.critic_steps = lr, tuple(betas), critic_steps
        self.gradient_penalty = gradient_penalty
        self.reconstruction_weight = reconstruction_weight
        self.generator_attribute_weight = generator_attribute_weight
        self.discriminator_attribute_weight = discriminator_attribute_weight
        self.selected_attributes, self.grid_images = attributes, grid_images
        #: Columns of the batch's ``attributes`` that are the modelled ones (set by ``setup``; None = all).
        self.attribute_columns: list[int] | None = None
        terms = [*TRAINING_TERMS, *(["gradient_penalty"] if gradient_penalty else [])]
        evaluation = [f"{stage}_{term}" for stage in STAGES if stage != "train" for term in EVALUATION_TERMS]
        self.means = nn.ModuleDict({name: MeanMetric() for name in [*terms, *evaluation]})
        self._grid_batch: tuple[Tensor, Tensor] | None = None

    @property
    def generator(self) -> nn.Module:
        """The generator."""
        return self.network.generator

    @property
    def discriminator(self) -> nn.Module:
        """The discriminator."""
        return self.network.discriminator

    def setup(self, stage: str) -> None:
        """Check the data's images and attributes against the networks; record the attribute names and columns."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        check_image_data_matches(self.generator, self.generator.in_channels, datamodule)
        check_image_data_matches(self.discriminator, self.discriminator.in_channels, datamodule)
        names = tuple(getattr(datamodule, "attribute_names", ()))
        data = type(datamodule).__name__
        if not names:
            raise ValueError(
                f"AttGANTask needs data with attributes; {data} has none (attribute_names is empty: give the data "
                "`attributes: morphometric`, or use a data set with its own attributes such as CelebA)"
            )
        if self.selected_attributes is None:
            columns = None
            selected = names
        else:
            unknown = [name for name in self.selected_attributes if name not in names]
            if unknown:
                raise ValueError(f"{data} has no attribute(s) {unknown}; its attributes are {names}")
            columns = [names.index(name) for name in self.selected_attributes]
            selected = tuple(self.selected_attributes)
        if len(selected) != self.network.num_attributes:
            raise ValueError(
                f"{data} has {len(selected)} attributes {selected}, the AttGAN was built for "
                f"{self.network.num_attributes} (set num_attributes of both networks, or select attributes by name "
                "with the task's `attributes`)"
            )
        self.attribute_columns = columns
        self.network.attribute_names = selected

    def batch_attributes(self, batch: dict[str, Tensor]) -> Tensor:
        """The modelled ``(N, A)`` float attributes of a batch (the selected columns of ``batch["attributes"]``)."""
        if "attributes" not in batch:
            raise ValueError(
                "AttGANTask needs samples with `attributes` (e.g. the data's `attributes: morphometric`), got a batch "
                f"with {sorted(batch)}"
            )
        attributes = batch["attributes"]
        if self.attribute_columns is not None:
            attributes = attributes[:, self.attribute_columns]
        elif self.selected_attributes is not None:
            raise ValueError("AttGANTask selects attributes by name: run it with a DataModule (it names them)")
        expected = (len(batch["image"]), self.network.num_attributes)
        if tuple(attributes.shape) != expected:
            raise ValueError(f"AttGANTask expected batch attributes of shape {expected}, got {tuple(attributes.shape)}")
        return attributes.float()

    def forward(self, images: Tensor, attributes: Tensor) -> Tensor:
        """The generator's images: ``images`` edited to have ``attributes``."""
        return self.generator(images, attributes)

    def _log_mean(self, name: str, value: Tensor, count: int, stage: str = "train") -> None:
        mean = self.means[name if stage == "train" else f"{stage}_{name}"]
        mean.update(value.detach(), weight=count)
        progress = name in ("wasserstein", "reconstruction_l1")
        self.log(f"{stage}/{name}", mean, prog_bar=progress, on_epoch=True, on_step=False)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizer_generator, optimizer_discriminator = self.optimizers()
        real, own = batch["image"], self.batch_attributes(batch)
        count = len(real)
        random = self.batch_generator()
        target = own[torch.randperm(count, generator=random, device=self.device)]

        with torch.no_grad():
            fake = self.generator(real, target)
        critic_real, logits_real = self.discriminator(real)
        wasserstein = critic_real.mean() - self.discriminator(fake)[0].mean()
        attribute_loss = F.binary_cross_entropy_with_logits(logits_real, own)
        discriminator_loss = -wasserstein + self.discriminator_attribute_weight * attribute_loss
        if self.gradient_penalty:
            weights = torch.rand(count, 1, 1, 1, generator=random, device=self.device, dtype=real.dtype)
            interpolates = (weights * real + (1 - weights) * fake).requires_grad_(True)
            penalty = gradient_penalty(interpolates, self.discriminator(interpolates)[0])
            discriminator_loss = discriminator_loss + self.gradient_penalty * penalty
            self._log_mean("gradient_penalty", penalty, count)
        optimizer_discriminator.zero_grad()
        self.manual_backward(discriminator_loss)
        optimizer_discriminator.step()
        self._log_mean("discriminator_loss", discriminator_loss, count)
        self._log_mean("wasserstein", wasserstein, count)
        self._log_mean("discriminator_attribute_loss", attribute_loss, count)

        if (int(self.training_batches) + 1) % self.critic_steps == 0:
            with self.toggled_optimizer(optimizer_generator):  # no gradients for the discriminator's parameters
                features = self.generator.encode(real)
                critic_fake, logits_fake = self.discriminator(self.generator.decode(features, target))
                adversarial = -critic_fake.mean()
                generated_attributes = F.binary_cross_entropy_with_logits(logits_fake, target)
                reconstruction = (self.generator.decode(features, own) - real).abs().mean()
                generator_loss = (
                    adversarial
                    + self.generator_attribute_weight * generated_attributes
                    + self.reconstruction_weight * reconstruction
                )
                optimizer_generator.zero_grad()
                self.manual_backward(generator_loss)
                optimizer_generator.step()
            for name, value in (
                ("generator_loss", generator_loss),
                ("generator_adversarial_loss", adversarial),
                ("generator_attribute_loss", generated_attributes),
                ("reconstruction_loss", reconstruction),
            ):
                self._log_mean(name, value, count)
        self.count_training_batch()

    def _evaluate(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> None:
        images, own = batch["image"], self.batch_attributes(batch)
        reconstruction = self.generator(images, own)
        l1 = (reconstruction - images).flatten(1).abs().sum(dim=1)
        accuracy = ((self.discriminator(images)[1] > 0) == (own > 0.5)).float().mean(dim=1)
        for name, per_image in (("reconstruction_l1", l1), ("attribute_accuracy", accuracy)):
            mean = self.means[f"{stage}_{name}"]
            mean.update(per_image.detach())
            self.log(f"{stage}/{name}", mean, prog_bar=name == "reconstruction_l1", on_epoch=True, on_step=False)
        if stage == "val" and batch_idx == 0 and not self.trainer.sanity_checking:
            shown = slice(0, self.grid_images)
            self._grid_batch = (images[shown].detach(), own[shown].detach())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, "test")

    def attribute_grid(self, images: Tensor, attributes: Tensor) -> Tensor:
        """Per image: itself, its reconstruction and each attribute flipped, as ``(n * (A + 2), C, H, W)`` tiles.

        Args:
            images: ``(n, C, H, W)`` images in ``[0, 1]``.
            attributes: their ``(n, A)`` attributes in ``[0, 1]``; flipping attribute ``j`` sets it to ``1 - a_j``.
        """
        count, num_attributes = attributes.shape
        flips = torch.eye(num_attributes, dtype=torch.bool, device=attributes.device)
        own = attributes[:, None, :].expand(-1, num_attributes, -1)
        variants = torch.cat([attributes[:, None, :], torch.where(flips, 1 - own, own)], dim=1)  # (n, A + 1, A)
        repeated = images.repeat_interleave(num_attributes + 1, dim=0)
        with evaluation_mode(self.generator), torch.no_grad():
            edited = self.generator(repeated, variants.flatten(0, 1)).view(count, num_attributes + 1, *images.shape[1:])
        return torch.cat([images[:, None], edited], dim=1).flatten(0, 1)

    def on_validation_epoch_end(self) -> None:
        """Write the attribute grid of the first validation images to ``attributes/epoch_<epoch>.png``."""
        if self._grid_batch is None:
            return
        images, attributes = self._grid_batch
        self._grid_batch = None
        self.write_grid(self.attribute_grid(images, attributes), "attributes", attributes.shape[1] + 2)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas),
        ]

    def generative_model(self) -> nn.Module:
        """The :class:`~cfx.nn.attgan.AttGAN` (with the data's attribute names)."""
        return self.network
