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


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_inspect_of_a_missing_factory_is_a_one_line_error():
    line = _one_line_error(_cli("inspect", "glu_fusion.demo:nope"))
    assert "glu_fusion.demo has no attribute 'nope'" in line


def test_inspect_of_a_missing_module_is_a_one_line_error():
    line = _one_line_error(_cli("inspect", "no_such_module_here:factory"))
    assert "no module named 'no_such_module_here'" in line


def test_inspect_without_a_colon_exits_2(capsys):
    assert main(["inspect", "no_colon_here"]) == 2
    assert "expected MODULE:FACTORY" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--dtype", "float16"], ["--device", "cpu"], ["--layers", "3"]])
def test_inspect_refuses_the_demo_options(flag, monkeypatch, capsys):
    import glu_fusion.__main__ as cli
    monkeypatch.setattr(cli, "_run", lambda *args, **kwargs: pytest.fail("ran although an option is ignored"))
    assert main([*flag, "inspect", "glu_fusion.demo:build"]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} apply to the demo only" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("interpreting, dtype, says", [
    (True, torch.float32, "run Triton's interpreter there,"),
    (True, torch.bfloat16, "except the GEMM ops, which take the plain-torch reference in bf16"),
    (False, torch.float32, "run their plain-torch reference there"),
])
def test_the_cpu_note_says_what_the_ops_run(interpreting, dtype, says, monkeypatch, capsys):
    import glu_fusion.__main__ as cli
    from glu_fusion import config
    from glu_fusion.ops import dispatch
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: interpreting)
    monkeypatch.setattr(config, "rewrite_devices", ("cuda",))
    cli._allow_cpu_if_needed("cpu", dtype)
    assert says in capsys.readouterr().out
