"""Training the generative auxiliaries: GANTask (WGAN, manual optimisation), VAETask, AutoencoderTask.

Each task writes a PNG grid per epoch into ``<trainer.log_dir>/samples/`` (GAN: images of fixed seeded latents,
after every training epoch) or ``<trainer.log_dir>/reconstructions/`` (VAE, autoencoder: the first validation
images above their reconstructions, after every validation epoch), on rank 0, atomically; not when the Trainer
has no logger.

Exact resumption: everything random in a training step (the GAN's latents and interpolation weights, the VAE's
reparameterisation noise) is drawn from a ``torch.Generator`` seeded by :func:`cfx.seeding.per_sample_seed` from
the task's ``seed`` and the number of training batches seen so far (times the world size, plus the rank, so
processes draw differently). That count is a buffer (``training_batches``), so it travels in the checkpoint; the
GAN's critic / generator alternation is a function of it. Together with what :class:`~cfx.tasks.base.CfxTask` and
Lightning restore (global random states, both optimisers, loops), a fit resumed from an epoch's ``last.ckpt`` ends
with the weights of an uninterrupted one.

Under DDP, GANTask needs ``strategy: ddp_find_unused_parameters_true`` (the critic step does not use the generator's
parameters).
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchvision.utils import make_grid

from cfx.data.base import rank_and_world_size
from cfx.nn.duq import gradient_penalty
from cfx.nn.evaluation import evaluation_mode
from cfx.nn.generative import GAN, kl_divergence
from cfx.results.pictures import save_png, upscale
from cfx.seeding import per_sample_seed, torch_generator
from cfx.tasks.base import CfxTask
from cfx.tasks.classification import STAGES, build_task, checkpoint_class_path, checkpoint_task_class, read_checkpoint

GRID_COLUMNS = 8
GRID_TILE_SIZE = 56


def check_image_data_matches(network: nn.Module, channels: int, datamodule: Any) -> None:
    """Raise ``ValueError`` when the data's channels or image size differ from the network's.

    Args:
        network: the network (its ``image_size`` is compared; named in the error).
        channels: the channels the network reads or makes.
        datamodule: a DataModule with ``in_channels`` and ``image_size``.
    """
    problems = []
    if datamodule.in_channels != channels:
        problems.append(f"the data has {datamodule.in_channels} channel(s), the network expects {channels}")
    if datamodule.image_size != network.image_size:
        problems.append(f"the data is {datamodule.image_size} px, the network was built for {network.image_size} px")
    if problems:
        raise ValueError(f"{type(datamodule).__name__} does not match {type(network).__name__}: " + "; ".join(problems))


def image_grid(images: Tensor, columns: int = GRID_COLUMNS, tile_size: int = GRID_TILE_SIZE) -> Tensor:
    """Images in [0, 1] as one ``(3, H, W)`` RGB grid of upscaled tiles, ``columns`` per row, white gaps.

    Images with other than 1 or 3 channels are shown as the grey mean of their channels.
    """
    if images.shape[1] not in (1, 3):
        images = images.mean(dim=1, keepdim=True)
    return make_grid(upscale(images.detach().cpu(), tile_size), nrow=columns, padding=2, pad_value=1.0)


class GenerativeTask(CfxTask):
    """Base of the generative tasks: network configs in the hyper-parameters, seeded batch noise, PNG grids.

    Args:
        seed: seed of everything random the task draws itself.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.register_buffer("training_batches", torch.zeros((), dtype=torch.long))

    def save_network_configs(self, *names: str) -> None:
        """Replace each network built in Python in the hyper-parameters by the config that rebuilds it.

        As in :class:`~cfx.tasks.ClassificationTask`: spectrally normalised (parametrised) modules cannot be
        pickled, so a checkpoint names them by ``init_config``. Networks given by the CLI are configs already.
        """
        for name in names:
            network = self.hparams.get(name)
            config = getattr(network, "init_config", None) if isinstance(network, nn.Module) else None
            if config is not None:
                self.save_hyperparameters({name: config})

    def batch_generator(self) -> torch.Generator:
        """The generator of this training batch's random draws: a function of ``seed``, batch count and rank."""
        rank, world_size = rank_and_world_size()
        stream = self.training_batches.detach().cpu().view(1) * world_size + rank
        return torch_generator(per_sample_seed(stream, self.seed)[0], self.device)

    def count_training_batch(self) -> None:
        """Advance ``training_batches`` (call once at the end of every training step)."""
        self.training_batches += 1

    def write_grid(self, images: Tensor, folder: str, columns: int) -> None:
        """Write ``image_grid(images, columns)`` to ``<log_dir>/<folder>/epoch_<epoch>.png`` on rank 0.

        Every rank calls it (``trainer.log_dir`` is a collective under DDP). A Trainer without a logger
        (``logger=False``) gets no grids.
        """
        if not self.trainer.loggers:
            return
        path = Path(self.trainer.log_dir) / folder / f"epoch_{self.current_epoch:03d}.png"
        if self.trainer.is_global_zero:
            save_png(image_grid(images, columns), path)

    def generative_model(self) -> nn.Module:
        """The trained model :func:`load_generative` returns."""
        return self.network


class GANTask(GenerativeTask):
    """Wasserstein GAN training with manual optimisation: ``critic_steps`` critic updates per generator update.

    Every training batch updates the critic on ``mean C(G(z)) - mean C(x)`` (plus ``gradient_penalty`` times the
    two-sided WGAN-GP penalty at random interpolates of real and generated images, when positive; with 0 the
    critic's spectral norm alone keeps it Lipschitz). After every ``critic_steps``-th batch the generator is updated
    on ``-mean C(G(z))`` with fresh latents. Both use Adam with ``betas``. Logs ``train/critic_loss``,
    ``train/wasserstein`` (``mean C(x) - mean C(G(z))``, the critic's estimate), ``train/generator_loss`` and, with a
    penalty, ``train/gradient_penalty``; sample-weighted epoch means, exact under DDP. No validation step. (With
    the reference critic's batch norm, the penalty's per-image input gradients also depend on the rest of the
    batch; DeDUCE relies on the spectral norm alone.)

    Lightning's ``global_step`` counts the steps of both optimisers here; the alternation uses the task's own
    ``training_batches`` count, which the checkpoint holds.

    Args:
        generator: a :class:`~cfx.nn.generative.WGANGenerator` (or a module with ``latent_dim``, ``out_channels``,
            ``image_size``).
        critic: a :class:`~cfx.nn.generative.WGANCritic` for the generator's images.
        lr_generator: Adam learning rate of the generator.
        lr_critic: Adam learning rate of the critic.
        betas: Adam's betas of both optimisers.
        critic_steps: critic updates per generator update (>= 1).
        gradient_penalty: weight of the gradient penalty (>= 0; 0 disables it).
        seed: seed of the latents, interpolation weights and sample-grid latents.
        grid_samples: images in the per-epoch sample grid (drawn from fixed latents).
    """

    def __init__(
        self,
        generator: nn.Module,
        critic: nn.Module,
        lr_generator: float = 1e-4,
        lr_critic: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        critic_steps: int = 5,
        gradient_penalty: float = 0.0,
        seed: int = 0,
        grid_samples: int = 64,
    ):
        super().__init__(seed)
        if isinstance(critic_steps, bool) or not isinstance(critic_steps, int) or critic_steps < 1:
            raise ValueError(f"critic_steps must be a positive integer, got {critic_steps!r}")
        if gradient_penalty < 0:
            raise ValueError(f"gradient_penalty must be >= 0, got {gradient_penalty}")
        if grid_samples < 1:
            raise ValueError(f"grid_samples must be >= 1, got {grid_samples}")
        self.save_hyperparameters()
        self.save_network_configs("generator", "critic")
        self.automatic_optimization = False
        self.network = GAN(generator, critic)
        self.lr_generator, self.lr_critic, self.betas = lr_generator, lr_critic, tuple(betas)
        self.critic_steps, self.gradient_penalty = critic_steps, gradient_penalty
        grid_latents = torch.randn(grid_samples, generator.latent_dim, generator=torch_generator(seed))
        self.register_buffer("grid_latents", grid_latents)
        terms = ["critic_loss", "wasserstein", "generator_loss"] + (["gradient_penalty"] if gradient_penalty else [])
        self.means = nn.ModuleDict({term: MeanMetric() for term in terms})

    @property
    def generator(self) -> nn.Module:
        """The generator."""
        return self.network.generator

    @property
    def critic(self) -> nn.Module:
        """The critic."""
        return self.network.critic

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            check_image_data_matches(self.generator, self.generator.out_channels, datamodule)
            check_image_data_matches(self.critic, self.critic.in_channels, datamodule)

    def forward(self, latents: Tensor) -> Tensor:
        """The generator's images of ``(N, latent_dim)`` latents."""
        return self.generator(latents)

    def _log_mean(self, term: str, value: Tensor, count: int) -> None:
        mean = self.means[term]
        mean.update(value.detach(), weight=count)
        self.log(f"train/{term}", mean, prog_bar=term == "wasserstein", on_epoch=True, on_step=False)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizer_generator, optimizer_critic = self.optimizers()
        real = batch["image"]
        count = len(real)
        random = self.batch_generator()

        def latents() -> Tensor:
            return torch.randn(count, self.generator.latent_dim, generator=random, device=self.device)

        with torch.no_grad():
            fake = self.generator(latents())
        wasserstein = self.critic(real).mean() - self.critic(fake).mean()
        critic_loss = -wasserstein
        if self.gradient_penalty:
            weights = torch.rand(count, 1, 1, 1, generator=random, device=self.device, dtype=real.dtype)
            interpolates = (weights * real + (1 - weights) * fake).requires_grad_(True)
            penalty = gradient_penalty(interpolates, self.critic(interpolates))
            critic_loss = critic_loss + self.gradient_penalty * penalty
            self._log_mean("gradient_penalty", penalty, count)
        optimizer_critic.zero_grad()
        self.manual_backward(critic_loss)
        optimizer_critic.step()
        self._log_mean("critic_loss", critic_loss, count)
        self._log_mean("wasserstein", wasserstein, count)

        if (int(self.training_batches) + 1) % self.critic_steps == 0:
            with self.toggled_optimizer(optimizer_generator):  # no gradients for the critic's parameters
                generator_loss = -self.critic(self.generator(latents())).mean()
                optimizer_generator.zero_grad()
                self.manual_backward(generator_loss)
                optimizer_generator.step()
            self._log_mean("generator_loss", generator_loss, count)
        self.count_training_batch()

    def on_train_epoch_end(self) -> None:
        """Write the images of the fixed latents (generator in eval mode) to ``samples/epoch_<epoch>.png``."""
        with evaluation_mode(self.generator), torch.no_grad():
            images = self.generator(self.grid_latents)
        self.write_grid(images, "samples", min(GRID_COLUMNS, len(images)))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.lr_generator, betas=self.betas),
            torch.optim.Adam(self.critic.parameters(), lr=self.lr_critic, betas=self.betas),
        ]


class ReconstructionTask(GenerativeTask, abc.ABC):
    """Base of VAETask and AutoencoderTask: Adam, data check, per-stage reconstruction metrics and grids.

    Logs per stage ``{stage}/reconstruction_l1`` (per image: the sum of ``|x' - x|`` over its pixels, as
    REFERENCE's L1) and ``{stage}/reconstruction_mse`` (per image: the mean of ``(x' - x)^2`` over its pixels),
    plus the terms a subclass adds; all sample-weighted epoch means, exact under DDP (torchmetrics sums).

    Args:
        network: the model (``in_channels``, ``image_size``).
        lr: Adam's learning rate.
        seed: seed of the task's random draws.
        grid_images: validation images shown (above their reconstructions) in the per-epoch grid.
        terms: names of the subclass's additional logged terms.
    """

    def __init__(self, network: nn.Module, lr: float, seed: int, grid_images: int, terms: tuple[str, ...] = ()):
        super().__init__(seed)
        if grid_images < 1:
            raise ValueError(f"grid_images must be >= 1, got {grid_images}")
        self.network, self.lr, self.grid_images = network, lr, grid_images
        names = ("loss", "reconstruction_l1", "reconstruction_mse", *terms)
        self.means = nn.ModuleDict({f"{stage}_{name}": MeanMetric() for stage in STAGES for name in names})
        self._grid_batch: tuple[Tensor, Tensor] | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            check_image_data_matches(self.network, self.network.in_channels, datamodule)

    @abc.abstractmethod
    def reconstruct(
        self, batch: dict[str, Tensor], batch_idx: int, stage: str
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(reconstruction, (N,) loss, {term: (N,) value})`` of a batch: the per-image loss and extra terms."""

    def _step(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> Tensor:
        images = batch["image"]
        reconstruction, losses, terms = self.reconstruct(batch, batch_idx, stage)
        errors = (reconstruction - images).flatten(1)
        values = {
            "loss": losses,
            "reconstruction_l1": errors.abs().sum(dim=1),
            "reconstruction_mse": errors.square().mean(dim=1),
            **terms,
        }
        for name, per_image in values.items():
            mean = self.means[f"{stage}_{name}"]
            mean.update(per_image.detach())
            self.log(f"{stage}/{name}", mean, prog_bar=name == "loss", on_epoch=True, on_step=False)
        if stage == "val" and batch_idx == 0 and not self.trainer.sanity_checking:
            shown = slice(0, self.grid_images)
            self._grid_batch = (images[shown].detach(), reconstruction[shown].detach())
        return losses.mean()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, batch_idx, "train")
        self.count_training_batch()
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        """Write the first validation images, each row of originals above its reconstructions (blank tiles pad)."""
        if self._grid_batch is None:
            return
        originals, reconstructions = self._grid_batch
        self._grid_batch = None
        columns = min(GRID_COLUMNS, len(originals))
        blank = originals.new_ones(-len(originals) % columns, *originals.shape[1:])
        originals, reconstructions = torch.cat([originals, blank]), torch.cat([reconstructions, blank])
        rows = [
            part[start : start + columns]
            for start in range(0, len(originals), columns)
            for part in (originals, reconstructions)
        ]
        self.write_grid(torch.cat(rows), "reconstructions", columns)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class VAETask(ReconstructionTask):
    """VAE training: per image ``sum_pixels (x' - x)^2 + beta * KL(q(z|x) || N(0, I))``, averaged over the batch.

    ``beta`` rises linearly from 0 to ``kl_weight`` over the first ``kl_warmup_epochs`` epochs (per batch:
    ``beta = kl_weight * min(1, (epoch + batch / batches_per_epoch) / kl_warmup_epochs)``; 0 = no warm-up).
    Training reconstructs a reparameterised sample (noise from the task's seeded batch generator), evaluation the
    posterior mean. Logs ``{stage}/kl`` (per image) besides the reconstruction metrics; ``train/kl_weight`` is
    beta; ``{stage}/loss`` is the per-image objective (with beta in training, ``kl_weight`` in val / test).

    Args:
        vae: a :class:`~cfx.nn.generative.ConvVAE` (``forward(images, generator)`` returning
            ``(reconstruction, mean, log_variance)``).
        lr: Adam's learning rate (1e-3 in REVISE's reference).
        kl_weight: the final beta.
        kl_warmup_epochs: epochs of the linear warm-up of beta (>= 0).
        seed: seed of the reparameterisation noise.
        grid_images: validation images in the per-epoch reconstruction grid.
    """

    def __init__(
        self,
        vae: nn.Module,
        lr: float = 1e-3,
        kl_weight: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        seed: int = 0,
        grid_images: int = 16,
    ):
        if kl_weight < 0 or kl_warmup_epochs < 0:
            raise ValueError(f"kl_weight and kl_warmup_epochs must be >= 0, got {kl_weight}, {kl_warmup_epochs}")
        super().__init__(vae, lr, seed, grid_images, terms=("kl",))
        self.save_hyperparameters()
        self.save_network_configs("vae")
        self.kl_weight, self.kl_warmup_epochs = kl_weight, kl_warmup_epochs

    def current_kl_weight(self, batch_idx: int) -> float:
        """Beta of training batch ``batch_idx`` of the current epoch (the warm-up schedule)."""
        if self.kl_warmup_epochs == 0:
            return self.kl_weight
        batches = self.trainer.num_training_batches
        progress = self.current_epoch + (batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0)
        return self.kl_weight * min(1.0, progress / self.kl_warmup_epochs)

    def reconstruct(
        self, batch: dict[str, Tensor], batch_idx: int, stage: str
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        images = batch["image"]
        if stage == "train":
            reconstruction, mean, log_variance = self.network(images, generator=self.batch_generator())
            beta = self.current_kl_weight(batch_idx)
            self.log("train/kl_weight", beta, on_epoch=True, on_step=False)
        else:
            reconstruction, mean, log_variance = self.network(images)
            beta = self.kl_weight
        kl = kl_divergence(mean, log_variance)
        squared_error = (reconstruction - images).square().flatten(1).sum(dim=1)
        return reconstruction, squared_error + beta * kl, {"kl": kl}

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, mean, log_variance)`` of the VAE."""
        return self.network(images)


class AutoencoderTask(ReconstructionTask):
    """Autoencoder training on the mean squared reconstruction error (``{stage}/loss`` = per-image MSE).

    Args:
        autoencoder: a :class:`~cfx.nn.generative.ConvAutoencoder` (``forward(images)`` = reconstruction).
        lr: Adam's learning rate.
        grid_images: validation images in the per-epoch reconstruction grid.
    """

    def __init__(self, autoencoder: nn.Module, lr: float = 1e-3, grid_images: int = 16):
        super().__init__(autoencoder, lr, seed=0, grid_images=grid_images)
        self.save_hyperparameters()
        self.save_network_configs("autoencoder")

    def reconstruct(
        self, batch: dict[str, Tensor], batch_idx: int, stage: str
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        images = batch["image"]
        reconstruction = self.network(images)
        return reconstruction, F.mse_loss(reconstruction, images, reduction="none").flatten(1).mean(dim=1), {}

    def forward(self, images: Tensor) -> Tensor:
        """The reconstruction of ``images``."""
        return self.network(images)


#: Names of the :class:`GenerativeTask` subclasses, whose checkpoints :func:`load_generative` reads (AttGANTask
#: lives in cfx.tasks.attgan, which builds on this module: the check is by base class, not by this list).
GENERATIVE_TASKS = ("GANTask", "VAETask", "AutoencoderTask", "AttGANTask")


def load_generative(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load the trained model of a generative task checkpoint (the file is read once).

    Args:
        checkpoint: a ``.ckpt`` of a :class:`GenerativeTask`: :class:`GANTask`, :class:`VAETask`,
            :class:`AutoencoderTask` or :class:`~cfx.tasks.attgan.AttGANTask`.
        map_location: device to load onto.

    Returns:
        In eval mode with gradients of its parameters disabled: the :class:`~cfx.nn.generative.GAN` (generator and
        critic) of a GANTask, the VAE of a VAETask, the autoencoder of an AutoencoderTask, the
        :class:`~cfx.nn.attgan.AttGAN` (with the attribute names it was trained on) of an AttGANTask.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is unreadable, a checkpoint of another task, or does not rebuild its task.
    """
    payload = read_checkpoint(checkpoint, map_location)
    if not issubclass(checkpoint_task_class(payload, checkpoint), GenerativeTask):
        raise ValueError(
            f"{checkpoint} is a checkpoint of {checkpoint_class_path(payload)}, expected one of "
            f"{', '.join(GENERATIVE_TASKS)} (a generative model)"
        )
    model = build_task(payload, checkpoint).generative_model().eval()
    model.requires_grad_(False)
    return model
