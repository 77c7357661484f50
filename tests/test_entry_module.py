"""The entry points torch loads by name live in ``glu_fusion_entry_points``, a module outside the
package, so that ``import torch`` survives a package that cannot be imported, and so that a folder
named ``glu_fusion`` shadowing the package is named in the error instead of a bare
``cannot import name '__version__'``."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

import glu_fusion_entry_points as entry


def _entry_value(group: str):
    return next((ep.value for ep in entry_points(group=group) if ep.name == "glu_fusion"), None)


def test_both_entry_points_name_the_small_module():
    if _entry_value("torch.backends") is None:
        pytest.skip("glu_fusion is not installed (pip install -e .)")
    assert _entry_value("torch.backends") == "glu_fusion_entry_points:autoload"
    assert _entry_value("torch_dynamo_backends") == "glu_fusion_entry_points:backend"


def _python(code: str, cwd: str, extra_path: str = "", **env_vars) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLU_FUSION")}
    env.update(env_vars)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_import_torch_survives_a_package_that_fails_to_import(tmp_path):
    """A package whose import raises (here: a copy whose __init__ raises ImportError, first on
    the path) must leave ``import torch`` working, with one warning."""
    broken = tmp_path / "glu_fusion"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated: a dependency is missing')\n")
    code = "import torch; print('IMPORTED', torch.ones(2).sum().item())"
    done = _python(code, cwd=str(tmp_path), extra_path=str(tmp_path), GLU_FUSION="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORTED 2.0" in done.stdout
    assert done.stderr.count("could not be loaded") == 1, done.stderr
    assert "simulated: a dependency is missing" in done.stderr


def test_import_torch_without_the_switch_imports_nothing_of_ours(tmp_path):
    broken = tmp_path / "glu_fusion"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    code = "import sys, torch; print('LOADED' if 'glu_fusion' in sys.modules else 'NOT LOADED')"
    done = _python(code, cwd=str(tmp_path), extra_path=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT LOADED" in done.stdout and "glu_fusion" not in done.stderr


def test_a_shadowing_folder_is_named_by_both_entry_points(tmp_path):
    if _entry_value("torch_dynamo_backends") is None:
        pytest.skip("glu_fusion is not installed (pip install -e .)")
    (tmp_path / "glu_fusion").mkdir()  # e.g. a clone directory, no __init__.py
    code = textwrap.dedent("""
        import torch
        print("IMPORTED")
        try:
            torch.compile(lambda x: x + 1, backend="glu_fusion")(torch.randn(2))
        except Exception as err:
            print("RAISED", err)
    """)
    done = _python(code, cwd=str(tmp_path), GLU_FUSION="1", TORCHDYNAMO_VERBOSE="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORTED" in done.stdout
    folder = str(tmp_path / "glu_fusion")
    assert f"the folder {folder} has no __init__.py" in done.stderr  # autoload's warning
    assert f"the folder {folder} has no __init__.py" in done.stdout  # the backend's error
    assert "cannot import name" not in done.stdout + done.stderr

    cli = subprocess.run([sys.executable, "-m", "glu_fusion", "--no-timing"], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=180,
                         env={k: v for k, v in os.environ.items() if not k.startswith("GLU_FUSION")})
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr[-3000:]
    assert f"the folder {folder} has no __init__.py" in cli.stderr


def test_autoload_swallows_everything(monkeypatch):
    def explode():
        raise KeyboardInterrupt  # not even a BaseException may escape into import torch

    monkeypatch.setenv("GLU_FUSION", "1")
    monkeypatch.setattr(entry, "_import_package", explode)
    monkeypatch.setattr(entry, "_warned", False)
    entry.autoload()
    entry.autoload()


def test_shadowing_folder_is_none_for_the_real_package():
    assert entry.shadowing_folder() is None
