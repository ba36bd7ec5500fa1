"""CfxTask: the LightningModule every cfx task subclasses (process-group cleanup, declared Trainer needs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning as L

from cfx.distributed import destroy_process_group_at_exit
from cfx.tasks.resume import RANDOM_STATES_KEY, collect_random_states, restore_random_states


def _set_inference_mode(trainer: L.Trainer, value: bool) -> None:
    # The evaluation loops read `inference_mode` when they run (lightning.pytorch.loops.utilities._no_grad_context),
    # so setting it after the Trainer was built takes effect; fit's own validation already runs without it.
    for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop):
        loop.inference_mode = value


#: The Trainer arguments a task may declare in ``trainer_arguments``: each can be applied to a built Trainer.
TRAINER_ARGUMENT_SETTERS: dict[str, Callable[[L.Trainer, Any], None]] = {"inference_mode": _set_inference_mode}


class CfxTask(L.LightningModule):
    """Base class of every cfx LightningModule.

    It does, once for every task:

    * registers the gloo process-group cleanup (:func:`cfx.distributed.destroy_process_group_at_exit`) in
      ``setup``;
    * applies the Trainer arguments the task cannot run without, declared by a subclass in the class attribute
      ``trainer_arguments`` (e.g. ``{"inference_mode": False}`` for a task that needs gradients in
      ``test``/``predict``). They are requirements, not preferences, so they replace the Trainer's value: the
      ``cfx`` command writes them into the Trainer's config before the Trainer is built (the saved
      ``config.yaml`` shows them), and ``setup`` applies them to a Trainer built in Python (a value given
      explicitly cannot be told apart from Lightning's default, and the task could not run with another). Only
      the arguments in :data:`TRAINER_ARGUMENT_SETTERS` can be declared: they can be changed on a built Trainer;
    * records its class in the hyper-parameters as ``_class_path`` (the key LightningCLI already writes), so a
      checkpoint of a task built in Python also names the class that loads it
      (:func:`cfx.tasks.load_task`).

    Subclasses that override ``setup`` call ``super().setup(stage)`` first.
    """

    trainer_arguments: ClassVar[Mapping[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.trainer_arguments) - set(TRAINER_ARGUMENT_SETTERS))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.trainer_arguments declares {unknown}; a task can declare only "
                f"{sorted(TRAINER_ARGUMENT_SETTERS)} (Trainer arguments that can be applied to a built Trainer)"
            )

    def setup(self, stage: str) -> None:
        """Register the process-group cleanup, apply ``trainer_arguments`` and record the task's class path."""
        destroy_process_group_at_exit()
        for name, value in self.trainer_arguments.items():
            TRAINER_ARGUMENT_SETTERS[name](self.trainer, value)
        self.hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every process's global random generator states (see :mod:`cfx.tasks.resume`)."""
        checkpoint[RANDOM_STATES_KEY] = collect_random_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """When a fit resumes, put back the random states saved with the checkpoint (not when only loading it).

        Lightning calls this before the fit loop continues; in between only the sanity check runs, inside
        Lightning's ``isolate_rng``, so the next epoch starts from the states the interrupted run would have used.
        ``load_from_checkpoint`` and ``validate``/``test`` leave the generators alone.
        """
        resuming = self._trainer is not None and self._trainer.state.fn == "fit"
        if resuming and RANDOM_STATES_KEY in checkpoint:
            restore_random_states(checkpoint[RANDOM_STATES_KEY])
