"""``python -m glu_fusion``'s command line: each command's own help, plain-text help, and clear
one-line errors instead of tracebacks."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from glu_fusion.__main__ import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glu_fusion", *args], capture_output=True, text=True,
                          timeout=180)


def test_inspect_help_is_inspects_own():
    done = _cli("inspect", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m glu_fusion inspect")
    assert "MODULE:FACTORY" in done.stdout and "--layers" not in done.stdout


def test_top_level_help_is_plain_text_and_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out
    assert "where the demo model runs" in out and "transformer blocks in the demo model" in out
    assert "inspect -h" in out  # points at the subcommand's own help


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_device_cuda_without_cuda_is_a_one_line_error():
    done = _cli("--device", "cuda", "--no-timing")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "no CUDA device" in lines[0]


def test_bad_layer_count_is_a_one_line_error(capsys):
    assert main(["--layers", "0"]) == 2
    assert "--layers must be at least 1" in capsys.readouterr().err


def test_options_before_the_subcommand_are_kept(monkeypatch, capsys):
    import glu_fusion.__main__ as cli
    runs = []
    monkeypatch.setattr(cli, "_run", lambda model, inputs, timing: runs.append((model, timing)) or 0)
    assert main(["--no-timing", "--device", "cpu", "demo", "--layers", "1"]) == 0
    (model, timing), = runs
    assert timing is False and len(model.layers) == 1
    assert "1 layers" in capsys.readouterr().out
