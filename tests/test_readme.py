"""README.md claims only what runs: its Python snippets run as written, its `cfx` command lines parse."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cfx.cli import main as cfx_main
from cfx.data.hdf5 import pack_main
from cfx.results.report import main as report_main
from cfx.tasks.ddu import gaussians_main
from cfx.tasks.prototypes import prototypes_main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
ENTRY_POINTS = {
    "cfx-pack": pack_main,
    "cfx-gaussians": gaussians_main,
    "cfx-prototypes": prototypes_main,
    "cfx-report": report_main,
}
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def fenced_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def command_lines() -> list[list[str]]:
    """Every command of the README's bash blocks (comments removed, continuation lines joined)."""
    commands = []
    for block in fenced_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_the_readme_has_python_snippets_and_commands():
    assert len(fenced_blocks("python")) >= 3
    programs = {words[0] for words in command_lines()}
    assert programs <= {"make", "cfx", *ENTRY_POINTS}, programs


def test_every_python_snippet_runs_in_order(tmp_path):
    """The snippets share one session (as a reader runs them one after another) in an empty working folder."""
    script = "\n\n".join(fenced_blocks("python"))
    (tmp_path / "readme.py").write_text(script)
    completed = subprocess.run(
        [sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (tmp_path / "checkpoints" / "quickstart" / "class_gaussians.pt").is_file()
    assert "cfx.counterfactual.DeDUCE" in completed.stdout


@pytest.mark.parametrize(
    "words", [w for w in command_lines() if w[0] == "cfx" and w[1:2] != ["report"]], ids=lambda w: " ".join(w[1:4])
)
def test_every_cfx_command_line_parses(words, monkeypatch, capsys):
    """Each `cfx` line of the README parses with the shipped configs (``--print_config`` stops before running)."""
    monkeypatch.chdir(REPO)
    arguments = words[1:]
    if "--help" not in arguments and "--version" not in arguments and "--print_config" not in arguments:
        arguments = [*arguments, "--print_config"]
    with pytest.raises(SystemExit) as stop:
        cfx_main(arguments)
    assert stop.value.code in (0, None), capsys.readouterr().err
    assert capsys.readouterr().out.strip()


def other_programs() -> list[str]:
    """The README's console scripts besides ``cfx`` itself (``cfx report`` is ``cfx-report``)."""
    named = {"cfx-report" if words[:2] == ["cfx", "report"] else words[0] for words in command_lines()}
    return sorted(named & set(ENTRY_POINTS))


@pytest.mark.parametrize("program", other_programs())
def test_every_other_console_script_of_the_readme_exists(program, capsys):
    """The README's other commands are declared console scripts (their runs are tested in their own test files)."""
    with pytest.raises(SystemExit) as stop:
        ENTRY_POINTS[program](["--help"])
    assert stop.value.code == 0
    assert "--output" in capsys.readouterr().out
