"""The user settings: validated on assignment, and a bad environment value never breaks
``import torch`` (the entry point logs it and leaves the pass off)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import glu_fusion
from glu_fusion import config


def _import_torch(env: dict) -> subprocess.CompletedProcess:
    """``import torch`` in a fresh process, then report whether the pass got installed."""
    code = ("import torch, torch._inductor.config as c; "
            "print('INSTALLED' if c.pre_grad_custom_pass is not None else 'OFF')")
    full = {k: v for k, v in os.environ.items() if not k.startswith("GLU_FUSION")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("variable", ["GLU_FUSION_FORWARD", "GLU_FUSION_ENGINE", "GLU_FUSION_TMA",
                                      "GLU_FUSION_CACHED_LAUNCH", "GLU_FUSION_GRAPH_OPS"])
def test_bogus_benchmark_switch_never_breaks_import_torch(variable):
    done = _import_torch({variable: "bogus", "GLU_FUSION": "1"})
    assert done.returncode == 0, done.stderr
    assert "INSTALLED" in done.stdout


def test_garbage_global_switch_is_rejected_and_the_pass_stays_off():
    done = _import_torch({"GLU_FUSION": "garbage"})
    assert done.returncode == 0, done.stderr
    assert "OFF" in done.stdout
    assert "GLU_FUSION must be one of" in done.stderr and "'garbage'" in done.stderr


def test_garbage_devices_named_with_the_allowed_values_and_the_pass_stays_off():
    done = _import_torch({"GLU_FUSION": "1", "GLU_FUSION_DEVICES": "garbage"})
    assert done.returncode == 0, done.stderr
    assert "OFF" in done.stdout
    assert "GLU_FUSION_DEVICES must name device types among cpu, cuda" in done.stderr


def test_valid_global_switch_installs_the_pass():
    done = _import_torch({"GLU_FUSION": "on", "GLU_FUSION_DEVICES": "cuda,cpu", "GLU_FUSION_RECOMPUTE": "0"})
    assert done.returncode == 0, done.stderr
    assert "INSTALLED" in done.stdout and "glu_fusion" not in done.stderr


@pytest.mark.parametrize("environ, expected, errors", [
    ({}, {"enabled": False, "rewrite_devices": ("cuda",), "recompute": False}, 0),
    ({"GLU_FUSION": "YES", "GLU_FUSION_DEVICES": " CPU , cuda", "GLU_FUSION_RECOMPUTE": "true"},
     {"enabled": True, "rewrite_devices": ("cpu", "cuda"), "recompute": True}, 0),
    ({"GLU_FUSION": "2", "GLU_FUSION_DEVICES": "tpu", "GLU_FUSION_RECOMPUTE": "maybe"},
     {"enabled": False, "rewrite_devices": ("cuda",), "recompute": False}, 3),
])
def test_read_environment(environ, expected, errors):
    values, messages = config.read_environment(environ)
    assert values == expected and len(messages) == errors


def test_assignment_validates(monkeypatch):
    monkeypatch.setattr(config, "rewrite_devices", "cpu")
    assert config.rewrite_devices == ("cpu",)
    monkeypatch.setattr(glu_fusion.config, "recompute", "on")
    assert config.recompute is True
    with pytest.raises(config.SettingError, match="among cpu, cuda"):
        config.rewrite_devices = ("garbage",)
    with pytest.raises(config.SettingError, match="recompute must be one of"):
        config.recompute = "sometimes"
    assert config.rewrite_devices == ("cpu",) and config.recompute is True  # unchanged by the errors


def test_cache_key_names_the_settings_that_change_graphs(monkeypatch):
    from glu_fusion.compile.cache_key import settings_key
    before = settings_key()
    monkeypatch.setattr(config, "recompute", not config.recompute)
    assert settings_key() != before
    monkeypatch.setattr(config, "enabled", not config.enabled)  # decides only whether a pass runs
    assert "enabled" not in settings_key()


def test_unknown_setting_is_refused():
    with pytest.raises(AttributeError, match="no setting 'forward_tma'"):
        config.forward_tma = False


@pytest.mark.parametrize("typed, expected", [(1, True), (0, False), (True, True), (False, False),
                                             ("1", True), ("0", False), ("true", True), (" Off ", False)])
@pytest.mark.parametrize("setting", ["recompute", "enabled"])
def test_on_off_settings_take_what_users_type(setting, typed, expected, monkeypatch):
    monkeypatch.setattr(config, setting, typed)
    assert getattr(config, setting) is expected


@pytest.mark.parametrize("typed", [2, -1, 1.0, None, "maybe"])
def test_on_off_settings_reject_other_values(typed, monkeypatch):
    monkeypatch.setattr(config, "recompute", False)
    with pytest.raises(config.SettingError, match=r"recompute must be one of 1, true, .*0, false.*True or False"):
        config.recompute = typed
    assert config.recompute is False


_IMPORT_TORCH_THEN_PACKAGE = ("import sys, torch; print('PACKAGE' if 'glu_fusion' in sys.modules else 'LIGHT'); "
                              "print('TORCH IMPORTED', file=sys.stderr, flush=True); "
                              "import glu_fusion; print('ERRORS', len(glu_fusion.config.env_errors))")


@pytest.mark.parametrize("switch", [None, "1"], ids=["switch-unset", "switch-on"])
def test_a_bad_environment_value_warns_once_at_import_torch(switch):
    """Warned by the entry point at ``import torch`` (without importing the package), and not
    again when the package is imported afterwards."""
    env = {"GLU_FUSION_DEVICES": "tpu"}
    if switch is not None:
        env["GLU_FUSION"] = switch
    full = {k: v for k, v in os.environ.items() if not k.startswith("GLU_FUSION")}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", _IMPORT_TORCH_THEN_PACKAGE], env=full, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LIGHT" in done.stdout and "ERRORS 1" in done.stdout
    at_import_torch, after = done.stderr.split("TORCH IMPORTED")
    warnings = [line for line in at_import_torch.splitlines() if "glu_fusion" in line]
    assert len(warnings) == 1 and "glu_fusion" not in after, done.stderr
    assert "GLU_FUSION_DEVICES" in warnings[0] and "among cpu, cuda" in warnings[0] and "'tpu'" in warnings[0]


def test_the_warning_says_what_still_works():
    text = config.read_environment({"GLU_FUSION_RECOMPUTE": "maybe"})[1]
    from glu_fusion_entry_points import environment_warning
    message = environment_warning(text)
    assert "GLU_FUSION_RECOMPUTE" in message and "'maybe'" in message
    assert "GLU_FUSION=1 stays off" in message
    assert "backend=glu_fusion.backend" in message and "still runs the pass" in message
