"""Second stage: sequence construction and corruptions, conditioning tokens, AdamW's decay mask, gradient
accumulation, fsdp sharding, the code cache, and the training loop (resume, loss going down)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import net2net
from vqgan_jax.data.codes import CodeCache, CodeWriter, code_batches, code_dtype, code_eval_batches
from vqgan_jax.models import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from gpt_step_worker import tiny_batch, tiny_config  # noqa: E402

GPT_TINY = GPT(vocab_size=32, block_size=24, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def gpt_params():
    return GPT_TINY.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]


def test_sequence_logits_align_each_code_with_its_prediction(gpt_params):
    codes = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 32)
    cond = jnp.array([[3, 4, 5], [6, 7, 8]])
    logits, targets = net2net.sequence_logits(GPT_TINY, gpt_params, codes, cond, jax.random.PRNGKey(2))
    full = GPT_TINY.apply({"params": gpt_params}, jnp.concatenate([cond, codes], 1))
    # The logits for code i come from the position just before it: the condition's last token for i = 0.
    np.testing.assert_allclose(logits, full[:, 2:-1], atol=1e-6)
    np.testing.assert_array_equal(targets, codes)
    assert logits.shape == (2, 12, 32)


def test_pkeep_corrupts_inputs_not_targets_and_cond_drop_uses_the_null_token(gpt_params):
    codes = jnp.zeros((64, 12), jnp.int32) + 5
    cond = jnp.full((64, 3), 7)
    seen = {}

    def spy(variables, sequence, **kwargs):
        seen["sequence"] = sequence
        return GPT_TINY.apply(variables, sequence, **kwargs)

    class Spy:
        vocab_size = GPT_TINY.vocab_size
        apply = staticmethod(spy)

    # Probabilities away from 1/2, so that keeping with 1 - pkeep or dropping with 1 - cond_drop would show.
    _, targets = net2net.sequence_logits(Spy, gpt_params, codes, cond, jax.random.PRNGKey(3), pkeep=0.9,
                                         cond_drop=0.2, train=True)
    np.testing.assert_array_equal(targets, codes)
    images = np.asarray(seen["sequence"][:, 3:])
    conds = np.asarray(seen["sequence"][:, :3])
    kept = np.mean(images == 5)
    assert 0.85 < kept < 0.95  # 0.9 kept + random tokens that happen to be 5 (704 inputs: 4.5 sd either side)
    dropped = np.all(conds == net2net.null_token(GPT_TINY), axis=1)
    assert np.all(dropped | np.all(conds == 7, axis=1))  # whole conditions are dropped, never parts
    assert 3 < dropped.sum() < 26  # 12.8 of 64 expected
    _, _ = net2net.sequence_logits(Spy, gpt_params, codes, cond, jax.random.PRNGKey(3), pkeep=0.5,
                                   cond_drop=0.5, train=False)
    np.testing.assert_array_equal(seen["sequence"][:, 3:], 5)  # no corruption outside training


def test_coord_tokens_match_the_original_coord_stage():
    # The original: coord = arange(H*W).reshape(H, W) / (H*W) over the resized image, cropped, then
    # interpolate(mode="area") by 1/down_factor, clamp to [0, 1], round(n_embed * c).
    height, width, size, down, n = 40, 56, 32, 8, 1024
    crops = np.array([[0, 0, height, width], [8, 24, height, width], [5, 3, height, width]])
    tokens = np.asarray(net2net.coord_tokens(crops, size, n, down))
    grid = np.arange(height * width).reshape(height, width) / (height * width)
    for crop, got in zip(crops, tokens):
        window = grid[crop[0]:crop[0] + size, crop[1]:crop[1] + size]
        pooled = window.reshape(size // down, down, size // down, down).mean(axis=(1, 3))
        np.testing.assert_array_equal(got, np.round(n * np.clip(pooled, 0, 1)).reshape(-1))
    with pytest.raises(ValueError, match="not a multiple of down_factor"):
        net2net.coord_tokens(crops, 30, n, down)


def test_weight_decay_applies_to_linear_kernels_only(gpt_params):
    from vqgan_jax.train.transformer import decay_mask

    flags = {"/".join(k.key for k in path): v
             for path, v in jax.tree_util.tree_flatten_with_path(decay_mask(gpt_params))[0]}
    assert flags["blocks_0/mlp_0/kernel"] and flags["head/kernel"] and flags["blocks_0/attn/key/kernel"]
    assert not any(flags[k] for k in ("tok_emb/embedding", "pos_emb", "blocks_0/ln1/scale", "blocks_0/mlp_0/bias"))


def test_gradient_accumulation_equals_the_full_batch_update():
    from vqgan_jax.train.sharding import make_mesh
    from vqgan_jax.train.transformer import build_gpt, create_state, make_train_step, optimizer

    results = []
    for accum in (1, 4):
        config = tiny_config()
        config.mesh = [("data", 1), ("fsdp", 1)]
        config.optim.grad_accum = accum
        gpt, tx = build_gpt(config), optimizer(config)
        state, _ = create_state(gpt, tx, config, make_mesh(config.mesh, jax.devices()[:1]), jax.random.PRNGKey(0))
        results.append(jax.jit(make_train_step(gpt, tx, config))(state, tiny_batch(config)))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.opt_state), jax.tree.leaves(s4.opt_state)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_each_step_draws_its_own_corruption():
    """The step's randomness is the run's key folded with the step: the same state and batch at another
    step corrupt other codes (a step that reused one key would train on one corruption pattern forever)."""
    from vqgan_jax.train.sharding import make_mesh
    from vqgan_jax.train.transformer import build_gpt, create_state, make_train_step, optimizer

    config = tiny_config()
    config.mesh, config.pkeep, config.optim.grad_accum = [("data", 1), ("fsdp", 1)], 0.5, 1
    gpt, tx = build_gpt(config), optimizer(config)
    state, _ = create_state(gpt, tx, config, make_mesh(config.mesh, jax.devices()[:1]), jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(gpt, tx, config))
    losses = [float(step(state.replace(step=jnp.asarray(i, state.step.dtype)), tiny_batch(config))[1]["loss"])
              for i in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]


def test_eval_step_counts_only_the_masked_in_rows():
    from vqgan_jax.train.transformer import build_gpt, make_eval_step

    config = tiny_config()
    gpt = build_gpt(config)
    params = gpt.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = {k: v[:3] for k, v in tiny_batch(config).items()}
    evaluate = jax.jit(make_eval_step(gpt, config))
    nll, tokens = evaluate(params, {**batch, "mask": np.array([True, True, False])})
    nll_two, tokens_two = evaluate(params, {k: v[:2] for k, v in batch.items()})
    assert int(tokens) == int(tokens_two) == 2 * 32
    np.testing.assert_allclose(nll, nll_two, rtol=1e-6)


def test_gpt_split_over_four_devices_equals_one_device(tmp_path):
    """fsdp=4: kernels, embeddings and their Adam moments in 4 pieces; same loss and update as 1 device, each
    device doing a quarter of the arithmetic (every micro-batch of the accumulation is split over them)."""
    worker = os.path.join(ROOT, "tests", "gpt_step_worker.py")
    procs = {}
    for n in (1, 4):
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        procs[n] = subprocess.Popen([sys.executable, worker, str(tmp_path / f"{n}.npz")], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for proc in procs.values():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    one, four = np.load(tmp_path / "1.npz"), np.load(tmp_path / "4.npz")
    assert int(four["devices"]) == 4 and int(four["kernel_pieces"]) == 4 and int(one["kernel_pieces"]) == 1
    assert float(four["flops_per_device"]) < 0.28 * float(one["flops_per_device"])  # 0.32 before the fix
    lr = float(one["metric/learning_rate"])
    for key in set(one.files) - {"devices", "kernel_pieces", "flops_per_device"}:
        kind, _, path = key.partition("/")
        if kind != "params":
            scale = max(1.0, float(np.max(np.abs(one[key]))))
            np.testing.assert_allclose(four[key], one[key], rtol=1e-5, atol=1e-5 * scale, err_msg=key)
            continue
        # Attention key biases get a gradient that is rounding noise (softmax ignores a shift shared by all
        # keys): AdamW's first step moves them by +-lr whatever its sign, so they are only bounded.
        real = np.abs(one[f"opt_state/0/mu/{path}"]) > 1e-6
        np.testing.assert_allclose(four[key][real], one[key][real], rtol=1e-5, atol=1e-5, err_msg=key)
        assert np.all(np.abs(four[key] - one[key]) <= 2.001 * lr), key


def _write_cache(directory, n=10, shard_size=4, vocab=32):
    writer = CodeWriter(str(directory), vocab, shard_size=shard_size)
    codes = np.arange(n * 6).reshape(n, 2, 3) % vocab
    cond = np.stack([np.arange(n), np.arange(n) + 1], 1) % vocab
    for i in range(0, n, 3):
        writer.add(codes[i:i + 3], cond[i:i + 3])
    writer.close()
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"num_examples": n, "code_shape": [2, 3], "cond_length": 2, "vocab_size": vocab, "cond_kind": "sos",
                   "first_stage_codes": vocab, "cond_tokens": vocab}, f)
    return codes, cond


def test_code_cache_epochs_hosts_and_resume(tmp_path):
    codes, cond = _write_cache(tmp_path)
    cache = CodeCache(str(tmp_path))
    assert cache.num_examples == 10 and len(list(tmp_path.glob("codes-*.npy"))) == 2  # 6 + 4
    got = cache.gather([9, 0, 4])
    np.testing.assert_array_equal(got["codes"], codes[[9, 0, 4]])
    np.testing.assert_array_equal(got["cond"], cond[[9, 0, 4]])
    assert got["codes"].dtype == np.int32

    # Two hosts, batch 4 (2 each): 5 steps = 2 epochs; each epoch shows every example exactly once.
    hosts = [code_batches(str(tmp_path), 4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    rows = [np.concatenate([next(h)["cond"][:, 0] for h in hosts]) for _ in range(5)]
    order = np.concatenate(rows)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert list(order[:10]) != list(order[10:])  # each epoch is reshuffled
    resumed = code_batches(str(tmp_path), 4, seed=3, start_step=3, process_index=1, process_count=2)
    np.testing.assert_array_equal(next(resumed)["cond"][:, 0], rows[3][2:])

    evals = list(code_eval_batches(str(tmp_path), 4, process_index=0, process_count=1))
    assert [int(b["mask"].sum()) for b in evals] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["cond"][b["mask"]] for b in evals]), cond)
    # Two hosts: as many batches each, and their rows of each global batch, put together, are every example once.
    hosts = [list(code_eval_batches(str(tmp_path), 4, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(hosts[0]) == len(hosts[1]) == 3
    rows = [b["cond"][b["mask"]] for pair in zip(*hosts) for b in pair]
    np.testing.assert_array_equal(np.concatenate(rows), cond)
    assert code_dtype(65536) == np.uint16 and code_dtype(65537) == np.int32  # codes up to vocab - 1


def test_code_cache_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no code cache"):
        CodeCache(str(tmp_path))
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no codes-"):
        CodeCache(str(tmp_path))


def test_code_cache_refuses_stale_or_mismatched_caches(tmp_path):
    from vqgan_jax.train.stages import check_code_cache

    directory = tmp_path / "codes-v1"  # a directory name with the shards' prefix in it
    _write_cache(directory, n=6)
    cache = CodeCache(str(directory))
    assert cache.num_examples == 6
    with pytest.raises(ValueError, match="batch size 3 must be a positive multiple of the number of processes"):
        next(code_eval_batches(str(directory), 3, process_index=0, process_count=2))

    config = tiny_config()
    config.data.codes = str(directory)
    config.model.vocab_size = 32
    check_code_cache(config, cache.meta, "codes")
    config.cond_stage.kind = "class"
    with pytest.raises(ValueError, match="holds 'sos' conditions, but cond_stage.kind is 'class'"):
        check_code_cache(config, cache.meta, "codes")
    config.cond_stage.kind = "sos"
    config.cond_drop = 0.1  # the cache's 32 codes leave no room for the null token
    with pytest.raises(ValueError, match="vocab_size=32 is too small"):
        check_code_cache(config, cache.meta, "codes")
    with pytest.raises(ValueError, match="older `vqgan_jax.data.encode`.*encode it again"):
        check_code_cache(config, {"num_examples": 6, "vocab_size": 32}, "codes")

    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, "num_examples": 9}))
    with pytest.raises(ValueError, match="shards hold 6 examples, its meta.json says 9"):
        CodeCache(str(directory))
    (directory / "meta.json").write_text(json.dumps(meta))
    (cond_shard,) = directory.glob("cond-*.npy")  # a shard's conditions one row short of its codes
    np.save(cond_shard, np.load(cond_shard)[:-1])
    with pytest.raises(ValueError, match="a shard holds 6 code grids but 5 conditions"):
        CodeCache(str(directory))


def test_conditions_need_their_source_and_coordinates_no_flips():
    from vqgan_jax.train.stages import check_config

    config = tiny_config()
    config.cond_stage.kind, config.data.path = "class", "/images"
    with pytest.raises(ValueError, match="set data.label_key .* or data.class_folders=True"):
        check_config(config)
    config.data.class_folders = True
    check_config(config)
    config.cond_stage.kind = "segmentation"
    with pytest.raises(ValueError, match="segmentation conditioning reads label maps: set data.segmentation_path"):
        check_config(config)
    config.data.segmentation_path = "/labels"
    check_config(config)
    config.cond_stage.kind, config.data.flip = "coord", True
    with pytest.raises(ValueError, match="coord conditioning with data.flip=True"):
        check_config(config)
    config.data.flip = False
    check_config(config)


def test_vocabulary_check_refuses_codes_the_gpt_cannot_embed():
    from vqgan_jax.train.stages import check_vocabulary

    config = tiny_config()
    config.cond_drop = 0.1
    check_vocabulary(config, n_first=63, n_cond=0)
    with pytest.raises(ValueError, match="vocab_size=64 is too small.*null token"):
        check_vocabulary(config, n_first=64, n_cond=0)


def test_stage_fingerprints_tell_weights_apart_and_caches_of_other_stages_are_refused(tmp_path):
    from vqgan_jax.train.stages import fingerprint
    from vqgan_jax.train.transformer_loop import _stages

    params = {"conv": {"kernel": np.zeros((2, 3), np.float32), "bias": np.ones(3, np.float32)}}
    same = {"conv": {"kernel": jnp.zeros((2, 3)), "bias": jnp.ones(3)}}
    assert fingerprint(params) == fingerprint(same) and fingerprint(None) is None
    nudged = {"conv": {"kernel": params["conv"]["kernel"], "bias": params["conv"]["bias"] + 1e-7}}
    renamed = {"conv": {"w": params["conv"]["kernel"], "bias": params["conv"]["bias"]}}
    assert len({fingerprint(params), fingerprint(nudged), fingerprint(renamed)}) == 3

    for name, stage in (("train", "a1"), ("eval", "b2")):
        _write_cache(tmp_path / name)
        with open(tmp_path / name / "meta.json") as f:
            meta = json.load(f)
        with open(tmp_path / name / "meta.json", "w") as f:
            json.dump(dict(meta, first_stage_fingerprint=stage), f)
    config = _loop_config(tmp_path / "train", 1)
    config.data.eval_codes = str(tmp_path / "eval")
    with pytest.raises(ValueError, match="encoded by different first_stage weights .fingerprints a1 and b2"):
        _stages(config)


def _loop_config(cache, steps):
    config = tiny_config()
    config.mesh = [("data", -1), ("fsdp", 1)]
    config.sharding_rules = [(".*", "replicate")]
    config.data.codes = config.data.eval_codes = str(cache)
    config.model.vocab_size = 32
    config.batch_size, config.total_steps, config.log_every, config.checkpoint_every = 4, steps, 1, 3
    config.optim.base_learning_rate = 2.5e-4
    return config


def test_training_from_a_code_cache_learns_and_resumes_exactly(tmp_path, monkeypatch):
    """6 steps straight == 3 steps stopped by SIGTERM, then resumed; a resume with another config is
    refused, and a damaged checkpoint is named."""
    import signal

    from vqgan_jax.train import Interrupted, evaluate, run, runner
    from vqgan_jax.train.logging import read_jsonl

    _write_cache(tmp_path / "cache", n=16)
    straight = run(_loop_config(tmp_path / "cache", 6), str(tmp_path / "a"))

    step_fn, calls = runner.run_step, []

    def preempted_after_three(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(*args)

    monkeypatch.setattr(runner, "run_step", preempted_after_three)
    with pytest.raises(Interrupted, match="SIGTERM at step 3") as stopped:
        run(_loop_config(tmp_path / "cache", 6), str(tmp_path / "b"))
    assert stopped.value.step == 3 and stopped.value.signum == signal.SIGTERM
    monkeypatch.setattr(runner, "run_step", step_fn)

    changed = _loop_config(tmp_path / "cache", 6)
    changed.batch_size, changed.pkeep = 8, 0.5
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 8; pkeep: 1.0 -> 0.5\). Resuming"):
        run(changed, str(tmp_path / "b"))
    cosine = _loop_config(tmp_path / "cache", 6)  # a cosine schedule's length is total_steps
    cosine.optim.schedule = "cosine"
    with pytest.raises(ValueError, match="total_steps: 6 -> 9"):
        cosine.total_steps = 9
        run(cosine, str(tmp_path / "b"))

    resumed = run(_loop_config(tmp_path / "cache", 6), str(tmp_path / "b"))
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    log = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]  # the cache's codes are a simple pattern
    assert any("val_bits_per_token" in r for r in log)
    evaluated = evaluate(_loop_config(tmp_path / "cache", 6), str(tmp_path / "a"))
    last_val = [r for r in log if "val_bits_per_token" in r][-1]  # written by the run's end, at step 6
    assert evaluated["step"] == last_val["step"] == 6 and evaluated["val_tokens"] == last_val["val_tokens"]
    np.testing.assert_allclose(evaluated["val_bits_per_token"], last_val["val_bits_per_token"], rtol=1e-5)
    assert os.path.exists(tmp_path / "a" / "eval_6.json")
    assert os.path.exists(tmp_path / "a" / "export" / "gpt" / "config.json")
    assert [r["step"] for r in read_jsonl(str(tmp_path / "b" / "metrics.jsonl")) if "loss" in r] == [1, 2, 3, 4, 5, 6]

    for root, _, files in os.walk(tmp_path / "b" / "checkpoints" / "6"):  # a disk that lost the last save
        for name in files:
            open(os.path.join(root, name), "w").close()
    with pytest.raises(RuntimeError, match=r"checkpoints/6' could not be restored .* remove it to resume from step 3"):
        run(_loop_config(tmp_path / "cache", 8), str(tmp_path / "b"))


def test_a_loop_stopped_by_a_data_error_keeps_its_last_step(tmp_path, monkeypatch):
    from vqgan_jax.train import run, transformer_loop
    from vqgan_jax.train.checkpoint import Checkpointer

    _write_cache(tmp_path / "cache", n=16)
    batches = transformer_loop._train_batches

    def failing(config, start):
        source = batches(config, start)
        for _ in range(2):
            yield next(source)
        raise OSError("the data went away")

    monkeypatch.setattr(transformer_loop, "_train_batches", failing)
    config = _loop_config(tmp_path / "cache", 6)
    config.checkpoint_every = 100
    with pytest.raises(OSError, match="the data went away"):
        run(config, str(tmp_path / "run"))
    checkpointer = Checkpointer(str(tmp_path / "run"))
    assert checkpointer.latest_step() == 2  # both completed steps kept, none of the periodic saves ran
    checkpointer.close()


def test_a_diverged_run_stops_at_its_next_log_step_and_keeps_its_good_checkpoints(tmp_path, monkeypatch):
    from vqgan_jax.train import Diverged, run, runner
    from vqgan_jax.train.checkpoint import Checkpointer
    from vqgan_jax.train.logging import read_jsonl

    _write_cache(tmp_path / "cache", n=16)
    step_fn, calls = runner.run_step, []

    def nan_at_four(*args):
        calls.append(1)
        state, metrics, seconds = step_fn(*args)
        if len(calls) == 4:  # what an exploding update leaves
            state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return state, metrics, seconds

    monkeypatch.setattr(runner, "run_step", nan_at_four)
    config = _loop_config(tmp_path / "cache", 8)
    config.log_every, config.checkpoint_every = 5, 2  # the save at step 4 finds it first, then log step 5
    with pytest.raises(Diverged, match="state at step 4 holds NaN or inf, and is not saved; the last checkpoint is "
                                       "step 2") as diverged:
        run(config, str(tmp_path / "run"))
    assert (diverged.value.step, diverged.value.last_saved) == (4, 2)
    checkpointer = Checkpointer(str(tmp_path / "run"))
    assert list(checkpointer.manager.all_steps()) == [2]
    checkpointer.close()

    calls.clear()
    config.checkpoint_every, config.total_steps = 100, 12
    with pytest.raises(Diverged, match="state at step 10 .* the last checkpoint is step 2"):
        run(config, str(tmp_path / "run"))  # resumed at 2, diverged at 6: no save until the end, log step 10
    logged = {r["step"]: r["loss"] for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if "loss" in r}
    assert sorted(logged) == [5, 10] and np.isfinite(logged[5]) and np.isnan(logged[10])


@pytest.fixture(scope="module")
def tiny_first_stage(tmp_path_factory):
    """A random tiny VQGAN saved as training exports it, and a folder of 6 images."""
    from PIL import Image

    from vqgan_jax.models import VQGAN
    from vqgan_jax.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("first_stage")
    vq = VQGAN(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), resolution=16, z_channels=8,
               embed_dim=8, n_embed=24)
    params = vq.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    save_pretrained(str(root / "vq"), vq, {"params": params})
    rng = np.random.default_rng(0)
    os.makedirs(root / "images")
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / "images" / f"{i}.png")
    return root, vq, params


def _image_config(root):
    from vqgan_jax.train.gpt_config import default_config

    c = default_config()
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 2, 2, 1, 2
    c.data.path, c.data.size = str(root / "images"), 16
    c.first_stage.checkpoint = str(root / "vq")
    c.model.update(vocab_size=24, block_size=64, n_layer=1, n_head=2, n_embd=16)
    return c


def test_encode_writes_the_first_stage_codes_and_training_reads_images_or_codes(tiny_first_stage, tmp_path):
    from vqgan_jax import data
    from vqgan_jax.data.encode import encode
    from vqgan_jax.train import run

    root, vq, params = tiny_first_stage
    config = _image_config(root)
    config.cond_drop, config.model.vocab_size = 0.1, 25  # 24 codes and the null token
    # What an earlier encode into the same directory left: a shard of this host, one of a host this run lacks.
    os.makedirs(tmp_path / "codes")
    for name in ("000-00007", "003-00000"):
        for prefix in ("codes", "cond"):
            np.save(tmp_path / "codes" / f"{prefix}-{name}.npy", np.zeros((5, 8, 8) if prefix == "codes" else (5, 1)))
    padded = config.copy_and_resolve_references()
    padded.batch_size = 4  # 6 images: the second batch holds 2 padding rows, which the cache must leave out
    meta = encode(padded, str(tmp_path / "codes"), split="eval")
    assert meta["num_examples"] == 6 and meta["code_shape"] == [8, 8] and meta["cond_length"] == 1
    assert (meta["first_stage_codes"], meta["cond_tokens"]) == (24, 1)
    assert sorted(p.name for p in (tmp_path / "codes").glob("c*-*.npy")) == ["codes-000-00000.npy", "cond-000-00000.npy"]
    cache = CodeCache(str(tmp_path / "codes"))
    images = np.concatenate([b["image"][b["mask"]] for b in data.eval_iterator(config.data, batch_size=2)])
    expected = vq.apply({"params": params}, jnp.asarray(images), method=vq.encode)[1]
    np.testing.assert_array_equal(cache.gather(np.arange(6))["codes"], expected)
    np.testing.assert_array_equal(cache.gather(np.arange(6))["cond"], 0)  # the SOS token
    with pytest.raises(FileExistsError, match="--overwrite"):
        encode(config, str(tmp_path / "codes"), split="eval")

    from vqgan_jax.pretrained import save_pretrained
    from vqgan_jax.train.stages import fingerprint

    save_pretrained(str(tmp_path / "vq"), vq, {"params": params})  # a copy this test may replace
    config.first_stage.checkpoint = str(tmp_path / "vq")
    run(config, str(tmp_path / "from_images"))  # frozen first stage inside the step
    images_config = config.copy_and_resolve_references()
    config.data.codes = str(tmp_path / "codes")
    state = run(config, str(tmp_path / "from_codes"))
    assert int(state.step) == 2
    for workdir in ("from_images", "from_codes"):  # sample grids decoded by the first stage, at the end
        assert (tmp_path / workdir / "images" / "samples_0000002.png").exists()
        with open(tmp_path / workdir / "stages.json") as f:  # from the weights, or from the cache's meta
            assert json.load(f) == {"first_stage": fingerprint(params), "cond_stage": None}
    assert meta["first_stage_fingerprint"] == fingerprint(params) and meta["cond_stage_fingerprint"] is None

    # The first stage retrained under the same path: the run's tokens would change, so resuming is refused.
    retrained = jax.tree.map(lambda p: p + 1e-3, params)
    save_pretrained(str(tmp_path / "vq"), vq, {"params": retrained})
    with pytest.raises(ValueError, match=f"other frozen stage weights .first_stage: '{fingerprint(params)}' -> '{fingerprint(retrained)}'"):
        run(images_config, str(tmp_path / "from_images"))
    run(images_config, str(tmp_path / "from_images"), allow_config_changes=True)
    with open(tmp_path / "from_images" / "stages.json") as f:
        assert json.load(f)["first_stage"] == fingerprint(retrained)
    # A cache's codes decoded (sample grids, the export) by a first stage other than the one that encoded them.
    config.first_stage.checkpoint = str(tmp_path / "vq")
    with pytest.raises(ValueError, match="holds other weights .* than the first stage data.codes was encoded with"):
        run(config, str(tmp_path / "codes_other_vq"))
    # The cache encoded again by the retrained stage: a run on the old cache's codes refuses it the same way.
    encode(config, str(tmp_path / "codes"), split="eval", overwrite=True)
    with pytest.raises(ValueError, match=f"other frozen stage weights .first_stage: '{fingerprint(params)}'"):
        run(config, str(tmp_path / "from_codes"))


def test_export_meta_names_the_stages_by_absolute_path(tiny_first_stage, tmp_path, monkeypatch):
    from vqgan_jax.train.transformer_loop import export_meta

    config = _image_config(tiny_first_stage[0])
    config.cond_drop = 0.1
    monkeypatch.chdir(tiny_first_stage[0])
    config.first_stage.checkpoint = "vq"
    meta = export_meta(config)
    assert meta["first_stage"]["checkpoint"] == str(tiny_first_stage[0] / "vq")
    assert (meta["cond_drop"], meta["data_size"], meta["cond_stage"]["kind"]) == (0.1, 16, "sos")


def test_missing_first_stage_is_named(tiny_first_stage, tmp_path):
    from vqgan_jax.train import evaluate, run

    config = _image_config(tiny_first_stage[0])
    config.first_stage.checkpoint = str(tmp_path / "nowhere.ckpt")
    with pytest.raises(FileNotFoundError, match="first_stage.checkpoint"):
        run(config, str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* to evaluate"):  # named before the stages
        evaluate(config, str(tmp_path / "run"))
    config.first_stage.checkpoint = ""
    with pytest.raises(ValueError, match="first_stage.checkpoint is not set"):
        run(config, str(tmp_path / "run"))


def test_condition_tokens_for_each_kind():
    import ml_collections

    from vqgan_jax.models import VQGAN

    b = 2
    batch = {"image": jnp.zeros((b, 16, 16, 3)), "label": jnp.array([7, 3]),
             "crop": jnp.array([[0, 0, 16, 16], [0, 0, 16, 16]]),
             "segmentation": jnp.array(np.random.default_rng(0).integers(0, 5, (b, 16, 16)), jnp.uint8),
             "depth": jnp.zeros((b, 16, 16, 1))}
    cfg = lambda kind: ml_collections.ConfigDict(dict(kind=kind, sos_token=4, n_embed=64, down_factor=8))  # noqa: E731
    np.testing.assert_array_equal(net2net.cond_tokens(cfg("sos"), batch), [[4], [4]])
    np.testing.assert_array_equal(net2net.cond_tokens(cfg("class"), batch), [[7], [3]])
    assert net2net.cond_tokens(cfg("coord"), batch).shape == (b, 4)
    seg_vq = VQGAN(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), resolution=16, z_channels=4,
                   embed_dim=4, n_embed=16, in_channels=5, out_ch=5)
    params = seg_vq.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 5)))["params"]
    tokens = net2net.cond_tokens(cfg("segmentation"), batch, seg_vq, params)
    onehot = jax.nn.one_hot(batch["segmentation"], 5)
    np.testing.assert_array_equal(tokens, seg_vq.apply({"params": params}, onehot, method=seg_vq.encode)[1].reshape(b, -1))
    with pytest.raises(ValueError, match="unknown cond_stage.kind"):
        net2net.cond_tokens(cfg("text"), batch)
