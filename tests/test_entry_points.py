"""The ways to turn the pass on: ``backend="glu_fusion"`` by name, ``GLU_FUSION=1`` with a plain
``torch.compile`` (through the ``torch.backends`` entry point), and the autoload's safety."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile import autoload as _autoload


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 24, bias=False)
        self.up = nn.Linear(16, 24, bias=False)

    def forward(self, x):
        return F.silu(self.gate(x)) * self.up(x)


def _installed(group: str) -> bool:
    return any(ep.name == "glu_fusion" for ep in entry_points(group=group))


needs_install = pytest.mark.skipif(not (_installed("torch_dynamo_backends") and _installed("torch.backends")),
                                   reason="glu_fusion is not installed (pip install -e .)")


@needs_install
def test_backend_by_name(cpu_rewrites):
    assert "glu_fusion" in torch._dynamo.list_backends()
    model = MLP()
    x = torch.randn(4, 16)
    torch.testing.assert_close(torch.compile(model, backend="glu_fusion")(x), model(x))
    assert cpu_rewrites.counts() == {"swiglu": 1}


PLAIN_COMPILE = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn, torch.nn.functional as F
    heavy_after_import = "torch._inductor" in sys.modules
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 24, bias=False)
            self.up = nn.Linear(16, 24, bias=False)
        def forward(self, x):
            return F.silu(self.gate(x)) * self.up(x)
    model = MLP()
    x = torch.randn(4, 16)
    with torch.no_grad():
        ok = torch.allclose(torch.compile(model)(x), model(x), atol=1e-5)
    import glu_fusion
    print(json.dumps({"ok": ok, "rewrites": glu_fusion.report().total,
                      "installed": repr(torch._inductor.config.pre_grad_custom_pass),
                      "heavy_after_import": heavy_after_import}))
""")


def _plain_compile(flag):
    env = dict(os.environ, GLU_FUSION_DEVICES="cpu", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1",
               TRITON_INTERPRET="0")
    env.pop("GLU_FUSION", None)
    if flag is not None:
        env["GLU_FUSION"] = flag
    done = subprocess.run([sys.executable, "-c", PLAIN_COMPILE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_install
@pytest.mark.parametrize("flag,rewrites", [("1", 1), (None, 0)], ids=["on", "unset"])
def test_environment_switch_with_plain_torch_compile(flag, rewrites):
    result = _plain_compile(flag)
    assert result["ok"] and result["rewrites"] == rewrites
    assert ("GluPass" in result["installed"]) == bool(rewrites)
    assert not result["heavy_after_import"]  # import torch stayed light, switch on or off


def test_autoload_never_raises(monkeypatch):
    from glu_fusion.compile import backend as backend_module

    def broken(*_):
        raise RuntimeError("boom")

    monkeypatch.setattr(backend_module, "install", broken)
    monkeypatch.setattr(glu_fusion.config, "enabled", True)
    monkeypatch.setattr(glu_fusion.config, "env_errors", ())
    _autoload.autoload()  # Inductor's config is already imported here: installs at once, fails, logs
    _autoload._install_into(object())


@pytest.mark.parametrize("value", [False, "", "0", "false", "off"])
def test_autoload_is_inert_without_a_true_value(value, monkeypatch):
    monkeypatch.setattr(glu_fusion.config, "enabled", value)
    monkeypatch.setattr(_autoload, "_install_into", lambda module: pytest.fail("installed"))
    before = list(sys.meta_path)
    _autoload.autoload()
    assert sys.meta_path == before


def test_autoload_stays_off_when_a_setting_was_rejected(monkeypatch, caplog):
    monkeypatch.setattr(glu_fusion.config, "enabled", True)
    monkeypatch.setattr(glu_fusion.config, "env_errors", ("glu_fusion: GLU_FUSION_DEVICES must name ...",))
    monkeypatch.setattr(_autoload, "_install_into", lambda module: pytest.fail("installed"))
    before = list(sys.meta_path)
    with caplog.at_level("WARNING", logger="glu_fusion"):
        _autoload.autoload()
    assert sys.meta_path == before
    assert "the pass stays off" in caplog.text


def test_import_hook_installs_when_the_config_module_loads(monkeypatch):
    """The one-shot finder wraps the config module's loader and removes itself."""
    calls = []
    monkeypatch.setattr(_autoload, "_install_into", lambda module: calls.append(module))
    finder = _autoload._OneShotFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    spec = finder.find_spec("torch._inductor.config", torch._inductor.__path__)
    assert finder not in sys.meta_path
    assert isinstance(spec.loader, _autoload._HookLoader)
    assert finder.find_spec("something.else", None) is None
    module = type(sys)("probe")
    spec.loader._loader = type("L", (), {"exec_module": lambda self, m: None,
                                         "create_module": lambda self, s: None})()
    spec.loader.exec_module(module)
    assert calls == [module]


def small_model():
    """A factory for ``python -m glu_fusion inspect``: (model, inputs)."""
    torch.manual_seed(0)
    return MLP(), (torch.randn(3, 16),)


def test_main_demo_on_cpu(cpu_rewrites, monkeypatch, capsys):
    from glu_fusion.__main__ import main
    monkeypatch.setattr(glu_fusion.config, "rewrite_devices", ("cuda",))  # as by default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU demo, also on a GPU machine
    assert main(["--layers", "2", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "rewriting graphs on 'cpu' for this run" in out
    assert "2 rewrite(s)" in out and "mlp_block=2" in out and "-> OK" in out


def test_main_inspect_factory(cpu_rewrites, capsys):
    from glu_fusion.__main__ import main
    assert main(["inspect", "test_entry_points:small_model", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "swiglu=1" in out and "-> OK" in out


def model_with_example_inputs():
    model = MLP()
    model.example_inputs = lambda: (torch.randn(2, 16),)
    return model


def test_main_inspect_model_with_example_inputs(cpu_rewrites, capsys):
    from glu_fusion.__main__ import main
    assert main(["inspect", "test_entry_points:model_with_example_inputs", "--no-timing"]) == 0
    assert "swiglu=1" in capsys.readouterr().out


def test_main_inspect_rejects_a_bad_factory(cpu_rewrites, capsys):
    from glu_fusion.__main__ import main
    assert main(["inspect", "no_colon_here"]) == 2
    assert "MODULE:FACTORY" in capsys.readouterr().err
    assert main(["inspect", "test_entry_points:MLP"]) == 2
    assert "must return (model, inputs) or a model with" in capsys.readouterr().err
