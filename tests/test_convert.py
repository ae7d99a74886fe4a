"""Checkpoint conversion: whole checkpoints, YAML configs, the CLI, and errors that name the problem."""

import jax
import numpy as np
import pytest
import yaml

import vqgan_jax as vj
from vqgan_jax.convert.__main__ import main as convert_main
from vqgan_jax.pretrained import load_pretrained


def _vqmodel_yaml(taming, path):
    config = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                        "params": dict(taming.vq_params(), lossconfig={
                            "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                            "params": {"disc_start": 10000, "disc_ndf": taming.meta["disc"]["ndf"],
                                       "disc_num_layers": taming.meta["disc"]["n_layers"]}})}}
    path.write_text(yaml.safe_dump(config))
    return path


def _net2net_yaml(taming, path):
    config = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_key": "class_label", "sos_token": 0,
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                               "params": taming.gpt_params()},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel", "params": taming.vq_params()},
        "cond_stage_config": {"target": "taming.modules.util.SOSProvider", "params": {"sos_token": 0}}}}}
    path.write_text(yaml.safe_dump(config))
    return path


def _vqmodel_checkpoint(taming):
    """A VQModel checkpoint's state_dict: the model, and the loss's discriminator and LPIPS beside it."""
    state = dict(taming.state("vq"))
    state.update({f"loss.discriminator.{k}": v for k, v in taming.state("disc").items()})
    state["loss.discriminator.main.3.num_batches_tracked"] = np.array(7)
    state["loss.perceptual_loss.lin0.model.1.weight"] = np.zeros((1, 64, 1, 1), np.float32)
    state["colorize"] = np.ones((3, 5, 1, 1), np.float32)  # VQSegmentationModel's label-drawing buffer
    return state


def _net2net_checkpoint(taming):
    """A Net2NetTransformer checkpoint: transformer (with its mask buffers) and first stage."""
    state = dict(taming.state("gpt"))
    size = taming.meta["gpt"]["block_size"]
    for i in range(taming.meta["gpt"]["n_layer"]):
        state[f"transformer.blocks.{i}.attn.mask"] = np.tril(np.ones((size, size), np.float32))[None, None]
    state.update({f"first_stage_model.{k}": v for k, v in taming.state("vq").items()})
    return state


def _assert_tree_equal(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_whole_vqmodel_checkpoint_and_yaml_path(taming, tmp_path):
    yaml_path = _vqmodel_yaml(taming, tmp_path / "model.yaml")
    state = _vqmodel_checkpoint(taming)
    model, params = vj.convert.vqgan_from_taming(state, str(yaml_path))
    _, expected = vj.convert.vqgan_from_taming(taming.state("vq"), taming.vq_params())
    _assert_tree_equal(params, expected)
    assert model.n_embed == taming.meta["vq"]["n_embed"] and model.ch_mult == (1, 2, 2)
    disc, variables = vj.convert.discriminator_from_taming(state, **taming.meta["disc"])
    assert set(variables) == {"params", "batch_stats"}


def test_net2net_checkpoint_takes_the_right_parts(taming, tmp_path):
    state = _net2net_checkpoint(taming)
    yaml_path = _net2net_yaml(taming, tmp_path / "net2net.yaml")
    gpt, params = vj.convert.gpt_from_taming(state, str(yaml_path))
    assert gpt.block_size == taming.meta["gpt"]["block_size"]
    _, vq_params = vj.convert.vqgan_from_taming(state, taming.vq_params())  # finds first_stage_model.
    _, expected = vj.convert.vqgan_from_taming(taming.state("vq"), taming.vq_params())
    _assert_tree_equal(vq_params, expected)
    exported = vj.convert.gpt_to_taming(params, n_unmasked=0)
    assert sorted(exported) == sorted(k for k in state if k.startswith("transformer."))


def test_exported_mask_buffers_carry_n_unmasked(taming):
    _, params = vj.convert.gpt_from_taming(taming.state("gpt"), taming.gpt_params())
    exported = vj.convert.gpt_to_taming(params, n_unmasked=3)
    gpt, _ = vj.convert.gpt_from_taming(exported, {**taming.gpt_params(), "n_unmasked": 3})
    assert gpt.n_unmasked == 3
    with pytest.raises(ValueError, match="n_unmasked=0"):
        vj.convert.gpt_from_taming(exported, taming.gpt_params())


def test_wrong_mask_buffer_means_wrong_n_unmasked(taming):
    state = _net2net_checkpoint(taming)
    state["transformer.blocks.0.attn.mask"] = np.ones_like(state["transformer.blocks.0.attn.mask"])
    with pytest.raises(ValueError, match="n_unmasked=0"):
        vj.convert.gpt_from_taming(state, taming.gpt_params())


def test_missing_unexpected_and_misshaped_keys_are_named(taming):
    state = dict(taming.state("vq"))
    del state["decoder.conv_out.bias"]
    state["encoder.conv_in.weight"] = np.zeros((16, 3, 3, 3), np.float32)
    state["encoder.extra.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(ValueError) as error:
        vj.convert.vqgan_from_taming(state, taming.vq_params())
    message = str(error.value)
    assert "missing key 'decoder.conv_out.bias' (expected shape (3,))" in message
    assert "key 'encoder.conv_in.weight' has shape (16, 3, 3, 3), the model expects (32, 3, 3, 3)" in message
    assert "unexpected key 'encoder.extra.weight' with shape (2,)" in message


def test_config_errors(taming, tmp_path):
    with pytest.raises(ValueError, match="unknown ddconfig keys"):
        params = taming.vq_params()
        vj.convert.vqgan_from_taming(taming.state("vq"), dict(params, ddconfig=dict(params["ddconfig"], chh=3)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vj.convert.vqgan_from_taming(taming.state("vq"), str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vj.convert.vqgan_from_taming(str(tmp_path / "absent.ckpt"), taming.vq_params())
    with pytest.raises(ValueError, match="no GPT in this checkpoint"):
        vj.convert.gpt_from_taming(taming.state("vq"), taming.gpt_params())
    with pytest.raises(ValueError, match="GumbelVQ checkpoints are not supported"):
        vj.convert.vqgan_from_taming(taming.state("vq"), {"target": "taming.models.vqgan.GumbelVQ",
                                                          "params": taming.vq_params()})


def test_discriminator_of_another_input_width(taming):
    """The depth VQGAN's discriminator reads 1 channel (the loss's disc_in_channels)."""
    state = dict(taming.state("disc"))
    state["main.0.weight"] = state["main.0.weight"][:, :1]
    disc, variables = vj.convert.discriminator_from_taming(state, **taming.meta["disc"], in_channels=1)
    np.testing.assert_array_equal(variables["params"]["main_0"]["kernel"][..., 0, :],
                                  np.transpose(state["main.0.weight"][:, 0], (1, 2, 0)))
    with pytest.raises(ValueError, match="main.0.weight"):
        vj.convert.discriminator_from_taming(state, **taming.meta["disc"])


def test_cli_converts_a_torch_ckpt(taming, tmp_path):
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "last.ckpt"
    state = _vqmodel_checkpoint(taming)
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                "global_step": 5}, ckpt)
    yaml_path = _vqmodel_yaml(taming, tmp_path / "model.yaml")
    assert convert_main([str(ckpt), str(yaml_path), str(tmp_path / "out")]) == 0

    model, variables = load_pretrained(str(tmp_path / "out" / "vqgan"))
    _, expected = vj.convert.vqgan_from_taming(taming.state("vq"), taming.vq_params())
    _assert_tree_equal(variables["params"], expected)
    z_q, indices, _ = model.apply(variables, taming.nhwc("vq/x"), method=model.encode)
    np.testing.assert_array_equal(indices, taming["vq/indices"])
    disc, disc_vars = load_pretrained(str(tmp_path / "out" / "discriminator"))
    assert disc.n_layers == taming.meta["disc"]["n_layers"] and "batch_stats" in disc_vars

    (tmp_path / "damaged.ckpt").write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read .* as a PyTorch checkpoint"):
        vj.convert.load_state_dict(str(tmp_path / "damaged.ckpt"))


def test_a_lightning_1x_checkpoint_is_read_without_lightning(taming, tmp_path, monkeypatch):
    """Lightning 1.x, the original's trainer, keys its callback states by the callback's class: weights-only
    loading refused such a file, and full unpickling needs Lightning installed. The weights are read with
    inert stand-ins for those classes; weights that would need one are refused, naming it."""
    import sys
    import types

    torch = pytest.importorskip("torch")
    module = types.ModuleType("absent_lightning.callbacks")
    module.ModelCheckpoint = ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    monkeypatch.setitem(sys.modules, "absent_lightning", types.ModuleType("absent_lightning"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in taming.state("vq").items()}
    torch.save({"state_dict": tensors, "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                "pytorch-lightning_version": "1.0.8"}, tmp_path / "last.ckpt")
    torch.save({"state_dict": dict(tensors, extra=ModelCheckpoint())}, tmp_path / "object.ckpt")
    for name in ("absent_lightning", module.__name__):  # a machine without that package
        monkeypatch.delitem(sys.modules, name)

    _, params = vj.convert.vqgan_from_taming(str(tmp_path / "last.ckpt"), taming.vq_params())
    _assert_tree_equal(params, vj.convert.vqgan_from_taming(taming.state("vq"), taming.vq_params())[1])
    with pytest.raises(ValueError, match="needs a module that is not installed"):
        vj.convert.load_state_dict(str(tmp_path / "last.ckpt"), trust=True)
    with pytest.raises(ValueError, match="'extra': 'absent_lightning.callbacks.ModelCheckpoint'.*trust=True"):
        vj.convert.load_state_dict(str(tmp_path / "object.ckpt"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole module, not a state dict
    with pytest.raises(ValueError, match="holds a torch.nn.modules.linear.Linear, not a mapping of weights"):
        vj.convert.load_state_dict(str(tmp_path / "module.pt"))


def test_cli_net2net_and_bad_input(taming, tmp_path, capsys):
    npz = tmp_path / "net2net.npz"
    np.savez(npz, **_net2net_checkpoint(taming))
    yaml_path = _net2net_yaml(taming, tmp_path / "net2net.yaml")
    assert convert_main([str(npz), str(yaml_path), str(tmp_path / "out")]) == 0
    gpt, variables = load_pretrained(str(tmp_path / "out" / "transformer"))
    logits = gpt.apply(variables, taming["gpt/idx"].astype(np.int32))
    assert np.max(np.abs(logits - taming["gpt/logits"])) <= 1e-4 * np.max(np.abs(taming["gpt/logits"]))
    assert load_pretrained(str(tmp_path / "out" / "first_stage"))[0].n_embed == taming.meta["vq"]["n_embed"]

    assert convert_main([str(tmp_path / "absent.ckpt"), str(yaml_path), str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err

    # `unconditional` replaces the conditioning stage by an SOS token, whatever cond_stage_config says.
    config = yaml.safe_load(yaml_path.read_text())
    params = config["model"]["params"]
    params.update(unconditional=True, cond_stage_config={"target": "taming.models.vqgan.VQModel",
                                                         "params": taming.vq_params()})
    (tmp_path / "uncond.yaml").write_text(yaml.safe_dump(config))
    assert convert_main([str(npz), str(tmp_path / "uncond.yaml"), str(tmp_path / "uncond")]) == 0
    assert not (tmp_path / "uncond" / "cond_stage").exists()
    # What would be lost without a word is refused: a permuter that reorders the codes, stray weights.
    params.update(unconditional=False, cond_stage_config="__is_unconditional__",
                  permuter_config={"target": "taming.modules.transformer.permuter.Subsample", "params": {"H": 4, "W": 4}})
    (tmp_path / "permuted.yaml").write_text(yaml.safe_dump(config))
    assert convert_main([str(npz), str(tmp_path / "permuted.yaml"), str(tmp_path / "p")]) == 1
    assert "Subsample' reorders the code sequence" in capsys.readouterr().err
    np.savez(tmp_path / "stray.npz", **_net2net_checkpoint(taming), **{"ema.weight": np.zeros(2)})
    assert convert_main([str(tmp_path / "stray.npz"), str(yaml_path), str(tmp_path / "s")]) == 1
    assert "belong to no part that converts: ['ema.weight']" in capsys.readouterr().err


def test_sampling_takes_a_converted_net2nets_condition_from_its_manifest(taming, tmp_path):
    """sample.py --gpt DIR/transformer: the converter's manifest says the condition (the SOS token of an
    unconditional model, a class count), a different --cond_kind is refused, and the window is the largest
    square the GPT's block_size holds (80 positions: 8 x 8 codes after one token, 32 px at f=4)."""
    from vqgan_jax.sampling.generate import load

    npz = tmp_path / "net2net.npz"
    np.savez(npz, **_net2net_checkpoint(taming))
    config = yaml.safe_load(_net2net_yaml(taming, tmp_path / "net2net.yaml").read_text())
    params = config["model"]["params"]
    variants = {"sos5": dict(unconditional=True, sos_token=5),
                "cin": dict(cond_stage_config={"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}})}
    for name, update in variants.items():
        variant = {"model": dict(config["model"], params=dict(params, **update))}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(variant))
        assert convert_main([str(npz), str(tmp_path / f"{name}.yaml"), str(tmp_path / name)]) == 0

    def parts(name):
        return dict(gpt_dir=str(tmp_path / name / "transformer"), first_stage=str(tmp_path / name / "first_stage"))

    sos = load(**parts("sos5"))
    assert (sos.cond_kind, sos.cond_config["sos_token"], sos.train_size, sos.window) == ("sos", 5, 32, 8)
    cin = load(**parts("cin"))
    assert (cin.cond_kind, cin.cond_config["n_classes"]) == ("class", 10)
    with pytest.raises(ValueError, match="converted from a class-conditioned Net2Net .manifest.json., not sos"):
        load(**parts("cin"), cond_kind="sos")

    # A VQ conditioning stage: the original's cond_stage_key (default "depth") says which, unless given.
    from vqgan_jax.sampling.generate import converted_condition

    (tmp_path / "vqcond").mkdir()
    (tmp_path / "vqcond" / "manifest.json").write_text('{"parts": {"cond_stage": "VQGAN"}, "net2net": {}}')
    stage = str(tmp_path / "vqcond" / "cond_stage")
    assert converted_condition(str(tmp_path / "vqcond" / "transformer")) == {"kind": "depth", "cond_stage": stage}
    assert converted_condition(str(tmp_path / "vqcond" / "transformer"), "segmentation")["kind"] == "segmentation"


def test_a_stage_is_read_from_a_net2net_checkpoint_with_either_yaml(taming, tmp_path):
    """first_stage/cond_stage.checkpoint = a Net2Net's .ckpt: the stage's part of it, with the Net2Net's
    YAML (the stage's config is taken from it) or the stage's own; never the other stage's weights."""
    from vqgan_jax.train.stages import load_vqgan

    doubled = {k: 2 * v for k, v in taming.state("vq").items()}
    state = dict(_net2net_checkpoint(taming), **{f"cond_stage_model.{k}": v for k, v in doubled.items()})
    np.savez(tmp_path / "net2net.npz", **state)
    config = yaml.safe_load(_net2net_yaml(taming, tmp_path / "net2net.yaml").read_text())
    config["model"]["params"]["cond_stage_config"] = {"target": "taming.models.vqgan.VQModel",
                                                      "params": taming.vq_params()}
    (tmp_path / "net2net.yaml").write_text(yaml.safe_dump(config))
    vq_yaml = _vqmodel_yaml(taming, tmp_path / "vq.yaml")
    first = vj.convert.vqgan_from_taming(taming.state("vq"), taming.vq_params())[1]
    cond = vj.convert.vqgan_from_taming(doubled, taming.vq_params())[1]
    for yaml_path in (tmp_path / "net2net.yaml", vq_yaml):
        _assert_tree_equal(load_vqgan(str(tmp_path / "net2net.npz"), str(yaml_path), "first_stage")[1], first)
        _assert_tree_equal(load_vqgan(str(tmp_path / "net2net.npz"), str(yaml_path), "cond_stage")[1], cond)
    config["model"]["params"]["cond_stage_config"] = "__is_unconditional__"
    (tmp_path / "net2net.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="is a Net2Net config whose cond_stage_config is '__is_unconditional__'"):
        load_vqgan(str(tmp_path / "net2net.npz"), str(tmp_path / "net2net.yaml"), "cond_stage")
