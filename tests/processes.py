"""Killing a run mid-way, as a crash would: shared by the resume tests of training and of counterfactual runs."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def kill_when(command: list[str], cwd: Path, environment: dict[str, str], ready: Callable[[], bool]) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` holds (it must not end on its own before)."""
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ready():
            assert process.poll() is None, f"{command[:4]} ended before it could be killed mid-way"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
