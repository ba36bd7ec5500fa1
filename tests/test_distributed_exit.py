"""A process that ran a cfx task under a gloo process group destroys the group when it exits.

Without that, the gloo worker threads can outlive the interpreter and abort the process at exit (SIGABRT,
"terminate called without an active exception", pytorch/pytorch#190489): Lightning destroys the group at exit
only for NCCL.
"""

from __future__ import annotations

import atexit
import functools
import tempfile

import h5py
import pytest
import torch
import torch.distributed as dist

from cfx.counterfactual import JSMA
from cfx.data import SyntheticImages
from cfx.nn import SmallCNN
from cfx.tasks import ClassificationTask, CounterfactualTask, load_classifier
from tests.distributed import run_distributed
from tests.trainers import quiet_trainer


def _group_alive_after_exit_handlers(rank: int, world_size: int, checkpoint: str, task_kind: str) -> dict[str, bool]:
    atexit._run_exitfuncs()  # what the interpreter does at exit, before any task ran here
    alive_without_a_task = dist.is_initialized()
    # Running every exit handler also unregistered h5py's type converters (its own exit handler), which the result
    # store of a counterfactual run needs: put them back, as a live interpreter has them.
    h5py._register_converters()
    atexit.register(h5py._unregister_converters)
    datamodule = SyntheticImages(num_samples=60, num_classes=3, batch_size=8, eval_batch_size=8)
    trainer = quiet_trainer(inference_mode=False)
    with tempfile.TemporaryDirectory() as output_dir:
        if task_kind == "classification":
            trainer.validate(ClassificationTask(load_classifier(checkpoint)), datamodule, verbose=False)
        else:
            explainer = functools.partial(JSMA, max_iterations=2)
            task = CounterfactualTask(checkpoint, explainer, max_queries=2, output_dir=output_dir)
            trainer.test(task, datamodule, verbose=False)
    alive_after_the_run = dist.is_initialized()
    atexit._run_exitfuncs()
    return {
        "without_a_task": alive_without_a_task,
        "after_the_run": alive_after_the_run,
        "after_exit_handlers": dist.is_initialized(),
    }


@pytest.mark.ddp
@pytest.mark.parametrize("task_kind", ["classification", "counterfactual"])
def test_a_task_run_under_a_gloo_group_destroys_the_group_at_exit(tmp_path, task_kind):
    torch.manual_seed(0)
    trainer = quiet_trainer()
    task = ClassificationTask(SmallCNN(in_channels=1, num_classes=3, channels=(4, 8), hidden=16))
    trainer.validate(task, SyntheticImages(num_samples=60, num_classes=3, batch_size=8), verbose=False)
    trainer.save_checkpoint(tmp_path / "classifier.ckpt")
    for alive in run_distributed(_group_alive_after_exit_handlers, str(tmp_path / "classifier.ckpt"), task_kind):
        assert alive == {"without_a_task": True, "after_the_run": True, "after_exit_handlers": False}
