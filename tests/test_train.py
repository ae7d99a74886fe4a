"""Training: sharded steps equal single-device steps, resume is exact, two hosts agree, the loop runs."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharded_step_worker.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the workers' configs, imported by the tests below


def _run_python(args, devices=1, extra_env=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(extra_env or {}))
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow  # 1.5-2.5 min on 2 CPU cores with a cold compile cache: CI's slow step
def test_step_on_four_devices_equals_one_device(tmp_path):
    """Same global batch, same init: data parallelism over 4 devices changes nothing but the layout."""
    procs = {n: _run_python([WORKER, str(tmp_path / f"{n}.npz")], devices=n) for n in (1, 4)}
    for proc in procs.values():
        _finish(proc)
    one, four = np.load(tmp_path / "1.npz"), np.load(tmp_path / "4.npz")
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    assert sorted(one.files) == sorted(four.files)
    assert float(one["metric/disc_loss"]) > 0 and float(one["metric/d_weight"]) > 0  # the GAN is on
    assert float(one["metric/p_loss"]) > 0  # and LPIPS
    lr = float(one["metric/learning_rate"])
    compared = total = 0
    for key in set(one.files) - {"devices"}:
        kind, _, path = key.partition("/")
        if kind not in ("gen_params", "disc_params", "ema_params"):  # losses, optimiser moments, stats
            scale = max(1.0, float(np.max(np.abs(one[key]))))  # moments are gradients: of order 10 here
            np.testing.assert_allclose(four[key], one[key], rtol=1e-5, atol=1e-5 * scale, err_msg=key)
            continue
        # Adam's first step moves each parameter by ~lr * sign(gradient). Where the gradient is rounding
        # noise (a bias right before a normalisation, attention key biases: exactly zero in exact arithmetic)
        # its sign depends on the reduction order, so those entries are only bounded by the step size.
        moment = one[f"{'disc' if kind == 'disc_params' else 'gen'}_opt_state/[0]/mu/{path}"]  # 0.5 * grad
        real = np.abs(moment) > 1e-6
        compared, total = compared + real.sum(), total + real.size
        np.testing.assert_allclose(four[key][real], one[key][real], rtol=1e-5, atol=1e-5, err_msg=key)
        bound = 2 * lr * (0.1 if kind == "ema_params" else 1.0) * 1.001  # EMA keeps 0.1 of the step
        assert np.all(np.abs(four[key] - one[key]) <= bound), key
    assert compared > 0.95 * total  # nearly every parameter is held to 1e-5


@pytest.mark.slow  # 1.5-2 min on 2 CPU cores with a cold compile cache: two VQGAN steps and their references
def test_vqgan_step_updates_are_the_gradients_of_its_losses():
    """With SGD at learning rate 1 an update is minus the gradient. The generator's is that of
    nll + d_weight * disc_factor * g_loss + codebook_weight * q_loss, d_weight the ratio of the first two
    terms' gradient norms at the decoder's last layer; the discriminator's that of
    disc_factor * (hinge + lecam_weight * LeCAM), LeCAM's EMAs first moved by this batch's mean logits. A
    discriminator with disc_train_from_start learns before disc_start, with the full factor."""
    import jax.numpy as jnp
    import optax

    from sharded_step_worker import tiny_config

    from vqgan_jax import losses
    from vqgan_jax.train.state import build_models, init_state
    from vqgan_jax.train.steps import make_train_step, phase

    c = tiny_config(lpips=False)
    c.loss.update(disc_factor=0.5, codebook_weight=2.0, lecam_weight=0.1, lecam_decay=0.9)
    c.codebook.restart_dead, c.optim.ema_decay = 0, 0.0
    models = build_models(c).replace(gen_tx=optax.sgd(1.0), disc_tx=optax.sgd(1.0))
    state = init_state(models, c, jax.random.PRNGKey(0)).replace(lecam=jnp.array([0.3, -0.2]))
    x = jax.random.uniform(jax.random.PRNGKey(1), (c.batch_size, 16, 16, 3), minval=-1, maxval=1)
    after, metrics = jax.jit(make_train_step(models, c, True, True))(state, {"image": x}, None)

    def disc(params, images):  # BatchNorm normalises with the batch's statistics in training
        return models.disc.apply({"params": params, "batch_stats": state.disc_batch_stats}, images, train=True,
                                 mutable=["batch_stats"])[0]

    def terms(params):
        x_rec, q = models.vq.apply({"params": params}, x, train=True)
        nll = losses.reconstruction_loss(x, x_rec, jnp.zeros(x.shape[:1]), 0.0, c.loss.pixelloss_weight)
        return nll, losses.generator_loss(disc(state.disc_params, x_rec)), q.loss

    # Jitted, as each eager op of the reference would compile on its own.
    grads = jax.jit(jax.jacrev(lambda p: jnp.stack(terms(p))))(state.gen_params)  # [3, ...] per leaf
    last = grads["decoder"]["conv_out"]["kernel"]
    d_weight = losses.adaptive_weight(last[0], last[1], c.loss.disc_weight)
    np.testing.assert_allclose(metrics["d_weight"], d_weight, rtol=1e-5)
    total = jax.tree.map(lambda g: g[0] + d_weight * 0.5 * g[1] + 2.0 * g[2], grads)

    def assert_moved_by(before, moved, grads):
        for a, b, g in zip(jax.tree.leaves(before), jax.tree.leaves(moved), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a - b, g, rtol=2e-4, atol=1e-6)

    assert_moved_by(state.gen_params, after.gen_params, total)

    fake = models.vq.apply({"params": state.gen_params}, x, train=True)[0]

    def disc_total(params, factor=0.5):
        real_logits, fake_logits = disc(params, x), disc(params, fake)
        means = jax.lax.stop_gradient(jnp.stack([real_logits.mean(), fake_logits.mean()]))
        ema = 0.9 * state.lecam + 0.1 * means
        reg = losses.lecam_regularizer(real_logits, fake_logits, ema[0], ema[1])
        return factor * (losses.hinge_d_loss(real_logits, fake_logits) + 0.1 * reg), ema

    (d_loss, ema), d_grads = jax.jit(jax.value_and_grad(disc_total, has_aux=True))(state.disc_params)
    np.testing.assert_allclose(metrics["disc_loss"], d_loss, rtol=1e-5)
    np.testing.assert_allclose(after.lecam, ema, rtol=1e-5)
    assert_moved_by(state.disc_params, after.disc_params, d_grads)

    c.loss.update(disc_start=5, disc_train_from_start=True)
    assert phase(0, c.loss) == (False, True)
    after, metrics = jax.jit(make_train_step(models, c, *phase(0, c.loss)))(state, {"image": x}, None)
    assert float(metrics["d_weight"]) == 0.0
    assert_moved_by(state.disc_params, after.disc_params, d_grads)  # the same factor, 0.5


def test_discriminator_adam_counts_from_the_global_step():
    """The original steps the discriminator's Adam on every batch, with zero gradients before disc_start;
    its first real update at step s is therefore bias-corrected as update s + 1 (torch.optim.Adam's formula
    below), not as a fresh Adam's first, which would move each weight by lr * sign(gradient)."""
    import jax.numpy as jnp

    from vqgan_jax.train.config import default_config
    from vqgan_jax.train.state import optimizer, with_count

    c = default_config()
    c.batch_size = 1
    lr, g = c.optim.base_learning_rate, np.array([0.3, -2.0, 5.0], np.float32)
    tx, params = optimizer(c), {"w": jnp.zeros(3)}
    updates, _ = tx.update({"w": jnp.asarray(g)}, with_count(tx.init(params), jnp.int32(100)), params)
    t = 101  # torch's step counter at this update: 100 earlier zero-gradient steps
    m, v = 0.5 * g / (1 - 0.5 ** t), 0.1 * g * g / (1 - 0.9 ** t)
    np.testing.assert_allclose(updates["w"], -lr * m / (np.sqrt(v) + 1e-8), rtol=1e-5)
    assert np.all(np.abs(updates["w"]) > 1.5 * lr)  # 0.5 / sqrt(0.1) = 1.58 lr; a fresh Adam's first step is lr


def test_checkpoints_only_of_an_intact_finite_state(tmp_path):
    import jax.numpy as jnp

    from vqgan_jax.train.checkpoint import Checkpointer, Diverged

    checkpointer = Checkpointer(str(tmp_path))
    assert checkpointer.save_after_error({"w": jnp.ones(3)}, 3) and checkpointer.latest_step() == 3
    donated = jnp.ones(3)
    donated.delete()  # what a step that failed after taking the state leaves
    assert not checkpointer.save_after_error({"w": donated}, 4) and checkpointer.latest_step() == 3
    diverged = {"w": jnp.array([1.0, jnp.nan, 2.0]), "step": jnp.int32(5), "m": {"v": jnp.ones(2)}}
    with pytest.raises(Diverged, match="step 5 holds NaN or inf, and is not saved; the last checkpoint is step 3"):
        checkpointer.save(diverged, 5)
    assert not checkpointer.save_after_error(diverged, 5)
    with pytest.raises(Diverged, match="step 6"):  # inf too, in any leaf
        checkpointer.save({**diverged, "w": jnp.ones(3), "m": {"v": jnp.array([-jnp.inf, 0.0])}}, 6)
    assert list(checkpointer.manager.all_steps()) == [3]
    checkpointer.close()


def test_resume_names_fields_added_or_removed_since_the_run_started(tmp_path):
    from vqgan_jax.train.config import default_config
    from vqgan_jax.train.workdir import config_changes, write_config

    config = default_config()
    write_config(config, str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / "5")
    assert config_changes(config, str(tmp_path)) == {}
    newer = default_config()
    with newer.unlocked():
        newer.model.new_option = 3
        del newer.model.dropout
    assert config_changes(newer, str(tmp_path)) == {"model.dropout": (config.model.dropout, "<absent>"),
                                                    "model.new_option": ("<absent>", 3)}


def test_mesh_sharding_and_loop_settings_fail_early_with_their_names(monkeypatch):
    import types

    import jax.numpy as jnp

    from vqgan_jax.train import runner
    from vqgan_jax.train.config import default_config
    from vqgan_jax.train.sharding import make_mesh, tree_shardings

    one = jax.devices()[:1]
    with pytest.raises(ValueError, match="axis names must differ"):
        make_mesh((("data", 1), ("data", -1)), one)
    with pytest.raises(ValueError, match="positive integers"):
        make_mesh((("data", 0),), one)
    mesh = make_mesh((("data", -1), ("fsdp", 1)), one)
    tree = {"kernel": jnp.zeros((4, 4))}
    with pytest.raises(ValueError, match="sharding rule 'fdsp'"):
        tree_shardings(tree, mesh, ((".*", "fdsp"),))
    with pytest.raises(ValueError, match=r"names \['model'\], not axes of the mesh"):
        tree_shardings(tree, mesh, ((".*", ("model", None)),))
    # "fsdp" splits a dimension that divides by the axis; a large leaf with none stays whole, by name.
    three = jax.sharding.AbstractMesh((1, 3), ("data", "fsdp"))
    leaves = {n: jax.ShapeDtypeStruct(shape, jnp.float32)
              for n, shape in (("odd", (1024, 1024)), ("kernel", (1024, 1536)), ("bias", (1024,)))}
    with pytest.warns(UserWarning, match=r"1 large leaves .* fsdp=3 .*: odd \(1024, 1024\)$"):
        specs = {k: v.spec for k, v in tree_shardings(leaves, three, ((".*", "fsdp"),)).items()}
    P = jax.sharding.PartitionSpec
    assert specs == {"odd": P(), "kernel": P(None, "fsdp"), "bias": P()}
    # A rule matches a whole path: "kernel" is a top-level leaf's name, not every kernel below.
    nested = {"conv_out": {"kernel": jax.ShapeDtypeStruct((6, 6), jnp.float32)}}
    assert tree_shardings(nested, three, (("kernel", "fsdp"),))["conv_out"]["kernel"].spec == P()
    assert tree_shardings(nested, three, ((".*kernel", "fsdp"),))["conv_out"]["kernel"].spec == P(None, "fsdp")

    config = default_config()
    config.batch_size = 6
    four = types.SimpleNamespace(size=4, shape={"data": 4})
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
        runner.check_run(config, four)
    config.batch_size, config.checkpoint_every = 8, 0
    with pytest.raises(ValueError, match="checkpoint_every=0 must be >= 1"):
        runner.check_run(config, four)
    config.checkpoint_every, config.keep_checkpoints = 10, 0
    with pytest.raises(ValueError, match="keep_checkpoints=0 must be >= 1"):
        runner.check_run(config, four)
    assert bool(runner.any_process(True)) and not bool(runner.any_process(False))  # one process: its own flag

    calls = []  # from_environment: the launcher's variables, read by an argument-free initialize()
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    config.distributed.from_environment = True
    runner.initialize_distributed(config)
    assert calls == [((), {})]


def _images(folder, n=12, size=40):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size + 3 * i, size), Image.BILINEAR).save(os.path.join(folder, f"{i}.png"))
    return folder


def _tiny_run_config(data_path, total_steps):
    from sharded_step_worker import tiny_config

    c = tiny_config(lpips=False)
    c.data.path = data_path
    c.total_steps = total_steps
    c.loss.disc_start = 2          # both phases: without, then with the discriminator
    c.log_every = 1
    c.image_every = 0
    c.checkpoint_every = 100
    return c


def _final_params(workdir):
    from vqgan_jax.pretrained import load_pretrained

    return load_pretrained(os.path.join(workdir, "export", "vqgan"))[1]["params"]


@pytest.mark.slow  # 1.5-2.5 min on 2 CPU cores with a cold compile cache: CI's slow step
def test_resume_continues_exactly(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more steps (parameters, data order, RNG, optimiser)."""
    from vqgan_jax.train import evaluate, run

    data_path = _images(str(tmp_path / "images"))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run(_tiny_run_config(data_path, 6), straight)
    run(_tiny_run_config(data_path, 3), split)
    assert os.listdir(os.path.join(split, "checkpoints")) == ["3"]
    run(_tiny_run_config(data_path, 6), split)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                           _final_params(straight), _final_params(split))

    with open(os.path.join(straight, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[0]["disc_factor"] == 0 and logged[-1]["disc_factor"] == 1 and "disc_loss" in logged[-1]
    assert logged[-1]["p_loss"] == 0  # perceptual_weight 0: no LPIPS network in the step, as the original
    for key in ("total_loss", "psnr", "codebook_usage", "perplexity", "learning_rate", "d_weight", "steps_per_sec"):
        assert np.isfinite(logged[-1][key]), key

    result = evaluate(_tiny_run_config(data_path, 6), straight)
    assert result["num_images"] == 12 and result["step"] == 6
    assert 0 < result["codebook_usage"] <= 1 and np.isfinite(result["psnr"]) and result["lpips"] > 0
    assert os.path.exists(os.path.join(straight, "eval_6.json"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(_tiny_run_config(data_path, 6), str(tmp_path / "empty"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_to_identical_parameters(tmp_path):
    """Two local CPU processes (jax.distributed, gloo collectives) each read their half of the batch; a
    SIGTERM to one stops both at the same step."""
    data_path = _images(str(tmp_path / "images"))
    port = _free_port()
    script = os.path.join(ROOT, "tests", "multihost_worker.py")
    workdir = str(tmp_path / "run")  # one workdir, as on a cluster's shared filesystem
    procs = [_run_python([script, data_path, workdir, f"127.0.0.1:{port}", str(i)]) for i in range(2)]
    for proc in procs:
        _finish(proc)
    for i in range(2):  # the signal reached one process; both stopped at the same step, and resumed
        with open(os.path.join(workdir, f"stopped_{i}.txt")) as f:
            assert f.read() == "2"
    a, b = (np.load(os.path.join(workdir, f"params_{i}.npz")) for i in range(2))
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
