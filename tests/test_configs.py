"""Experiment configs: every one loads, its runlocal variant is small, bad overrides fail before any work."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["vqgan_imagenet_f16_1024", "vqgan_imagenet_f16_16384", "vqgan_faceshq", "vqgan_custom", "demo"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_its_models(name):
    from vqgan_jax.models import VQGAN, NLayerDiscriminator

    for arg in (None, "runlocal"):
        c = _load(name).get_config(arg)
        VQGAN(**c.model.to_dict())
        NLayerDiscriminator(ndf=c.loss.disc_ndf, n_layers=c.loss.disc_num_layers)
        assert c.data.size % 2 ** (len(c.model.ch_mult) - 1) == 0
        if arg == "runlocal":
            assert c.total_steps <= 50 and c.data.size <= 64


def test_original_hyperparameters():
    c = _load("vqgan_imagenet_f16_16384").get_config()
    assert (c.model.n_embed, c.model.ch_mult, c.model.attn_resolutions) == (16384, (1, 1, 2, 2, 4), (16,))
    assert (c.optim.base_learning_rate, c.optim.b1, c.optim.b2) == (4.5e-6, 0.5, 0.9)
    assert _load("vqgan_faceshq").get_config().loss.disc_start == 30001


@pytest.mark.parametrize("override, message", [("--config.data.pth=/x", "pth"),
                                               ("--config.total_steps=many", "total_steps")])
def test_bad_override_fails_before_anything_runs(tmp_path, override, message):
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/vqgan_custom.py:runlocal",
                             override, "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "w").exists()
