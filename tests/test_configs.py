"""Experiment configs: every one loads, its runlocal variant is small, bad overrides fail before any work."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAITHFUL = ["vqgan_imagenet_f16_1024", "vqgan_imagenet_f16_16384", "vqgan_faceshq", "vqgan_custom"]
CONFIGS = FAITHFUL + [f"{name}_l2" for name in FAITHFUL] + ["demo", "vqgan_sflckr_seg"]
TRANSFORMER_CONFIGS = ["transformer_faceshq", "transformer_imagenet_cin", "transformer_sflckr", "transformer_custom"]


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


@pytest.mark.parametrize("name", ["transformer_imagenet_cin", "vqgan_imagenet_f16_16384"])
def test_full_size_state_splits_over_fsdp_by_the_default_rules(name):
    """At full size on a mesh of data 2 x fsdp 4 (abstract: nothing is created), every leaf of the training
    state of at least a million elements is split over fsdp: parameters and optimiser moments alike."""
    import warnings

    import jax
    from jax.sharding import AbstractMesh

    from vqgan_jax.train.sharding import LARGE_LEAF

    c = _load(name).get_config()
    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning for a large leaf that stays whole
        if name.startswith("transformer"):
            from vqgan_jax.train import transformer

            gpt, tx = transformer.build_gpt(c), transformer.optimizer(c)
            abstract, shardings = transformer.state_shapes(gpt, tx, c, mesh, jax.random.PRNGKey(0))
        else:
            from vqgan_jax.train.state import build_models, state_shapes

            abstract, shardings = state_shapes(build_models(c), c, mesh, jax.random.PRNGKey(0))
    leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
    large = [(leaf.shape, sharding.spec) for leaf, sharding in leaves if leaf.size >= LARGE_LEAF]
    assert len(large) > 10 and all("fsdp" in spec for _, spec in large), [x for x in large if "fsdp" not in x[1]]


@pytest.mark.parametrize("name", TRANSFORMER_CONFIGS)
def test_transformer_config_fits_its_sequence(name):
    """condition + image codes - 1 positions fit block_size at the crop size, for the :runlocal VQGANs
    (f=2) and the full ones (f=16); the checks every run makes pass."""
    from vqgan_jax.train.stages import check_config
    from vqgan_jax.train.transformer import build_gpt

    cond_length = {"sos": lambda c, g: 1, "class": lambda c, g: 1, "segmentation": lambda c, g: g * g,
                   "coord": lambda c, g: (c.data.size // c.cond_stage.down_factor) ** 2}
    for arg, factor in ((None, 16), ("runlocal", 2)):
        c = _load(name).get_config(arg)
        assert c.stage == "transformer"
        build_gpt(c)
        if c.cond_stage.kind == "segmentation":
            c.data.segmentation_path = "/labels"  # given on the command line (see the config's docstring)
        check_config(c)
        g = c.data.size // factor
        assert cond_length[c.cond_stage.kind](c, g) + g * g - 1 <= c.model.block_size
        if arg == "runlocal":
            assert c.total_steps <= 50 and c.model.n_layer <= 2


def test_original_hyperparameters():
    c = _load("vqgan_imagenet_f16_16384").get_config()
    assert (c.model.n_embed, c.model.ch_mult, c.model.attn_resolutions) == (16384, (1, 1, 2, 2, 4), (16,))
    assert (c.optim.base_learning_rate, c.optim.b1, c.optim.b2) == (4.5e-6, 0.5, 0.9)
    assert _load("vqgan_faceshq").get_config().loss.disc_start == 30001
    assert (c.param_init, c.loss.perceptual_dropout) == ("torch", 0.5)  # PyTorch's init; LPIPS in train mode
    cin = _load("transformer_imagenet_cin").get_config().model
    assert (cin.vocab_size, cin.block_size, cin.n_layer, cin.n_head, cin.n_embd) == (16384, 256, 48, 24, 1536)
    faces = _load("transformer_faceshq").get_config()
    assert (faces.model.n_layer, faces.cond_stage.kind, faces.cond_stage.down_factor) == (24, "coord", 16)
    assert (faces.optim.b1, faces.optim.b2, faces.optim.weight_decay) == (0.9, 0.95, 0.01)
    seg = _load("vqgan_sflckr_seg").get_config()
    assert (seg.model.in_channels, seg.model.out_ch, seg.loss.kind) == (182, 182, "segmentation")


@pytest.mark.parametrize("name", FAITHFUL)
def test_improved_configs_change_only_the_recipe(name):
    """Each _l2 config is its faithful one with LlamaGen's codebook and optimiser, and nothing else."""
    faithful, improved = _load(name).get_config().to_dict(), _load(f"{name}_l2").get_config().to_dict()
    changed = {f"{section}.{k}" for section in faithful if isinstance(faithful[section], dict)
               for k in faithful[section] if faithful[section][k] != improved[section][k]}
    changed |= {k for k in faithful if not isinstance(faithful[k], dict) and faithful[k] != improved[k]}
    recipe = {"model.l2_normalize", "model.embed_dim", "model.legacy", "codebook.restart_dead",
              "optim.base_learning_rate", "optim.b1",
              "optim.b2", "optim.grad_clip", "loss.pixel_loss", "loss.disc_weight", "loss.adaptive_weight"}
    assert recipe <= changed <= recipe | {"batch_size", "loss.disc_start"}
    assert improved["model"]["embed_dim"] == 8 and improved["model"]["l2_normalize"]
    assert improved["optim"]["base_learning_rate"] * 128 == pytest.approx(1e-4)


def test_unknown_param_init_is_named():
    import jax

    from vqgan_jax.train.config import default_config, runlocal
    from vqgan_jax.train.state import build_models, init_state

    c = runlocal(default_config())
    c.param_init = "xavier"
    with pytest.raises(ValueError, match="param_init 'xavier'"):
        jax.eval_shape(lambda key: init_state(build_models(c), c, key), jax.random.PRNGKey(0))


@pytest.mark.parametrize("override, message", [("--config.data.pth=/x", "pth"),
                                               ("--config.total_steps=many", "total_steps")])
def test_bad_override_fails_before_anything_runs(tmp_path, override, message):
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/vqgan_custom.py:runlocal",
                             override, "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "w").exists()


def test_tuple_fields_override_from_the_command_line_and_a_misspelt_argument_fails():
    show = ("from absl import app; from ml_collections import config_flags; "
            "F = config_flags.DEFINE_config_file('config', lock_config=True); "
            "app.run(lambda _: print(F.value.mesh, F.value.sharding_rules))")
    result = subprocess.run([sys.executable, "-c", show, "--config=configs/transformer_custom.py:runlocal",
                             '--config.mesh=(("data", 1), ("fsdp", -1))',
                             '--config.sharding_rules=((".*kernel", "fsdp"),)'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(('data', 1), ('fsdp', -1)) (('.*kernel', 'fsdp'),)"
    with pytest.raises(ValueError, match="unknown config argument 'runlocl'"):
        _load("demo").get_config("runlocl")
