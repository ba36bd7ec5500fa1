"""Killing a run mid-way, as a crash would: shared by the resume tests of training and of counterfactual runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def kill_when(command: list[str], cwd: Path, environment: dict[str, str], ready: Callable[[], bool]) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` holds (it must not end on its own before).

    The command runs in its own process group and the whole group is killed, as a crash of the machine or a job
    scheduler's kill would: a DDP run's other ranks (Lightning's launcher starts them as child processes) die
    with it instead of lingering on the rendezvous port.
    """
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while not ready():
            assert process.poll() is None, f"{command[:4]} ended before it could be killed mid-way"
            time.sleep(0.005)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone already
            pass
        process.wait()
    assert process.returncode == -signal.SIGKILL
