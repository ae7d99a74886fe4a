"""The benchmark harness's gpt_train_step and gpt_sample workloads, and the GPT changes made for the
training step's speed: the gradient materialisation is an exact identity, and it keeps XLA:CPU from
recomputing the residual stream's gradient once per consumer (the largest fusion of the backward pass
stays the same size however deep the model)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import run as bench_run
from bench import sampling as bench_sampling
from vqgan_jax.models import GPT
from vqgan_jax.models.gpt import gelu, materialize_grad

TINY_SPEC = {"model": {"vocab_size": 64, "block_size": 17, "n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0},
             "batch": 2, "seq_len": 16, "report": ["tokens_per_s", "step_ms", "compile_s", "peak_rss_mb"]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt_train_step_record(dtype):
    record = bench_run.bench_gpt_train_step(TINY_SPEC, {}, repeats=2, dtype=dtype)
    for field in TINY_SPEC["report"]:
        assert record[field] > 0, field
    assert record["workload"] == "gpt_train_step" and record["dtype"] == dtype
    assert record["tokens_per_s"] == pytest.approx(2 * 16 / (record["step_ms"] / 1e3))
    assert len(record["step_ms_all"]) == 2 and record["repeats"] == 2
    assert np.isfinite(record["last_loss"])
    assert record["flops_per_step"] is None or record["flops_per_step"] > 0


def test_workloads_are_the_shared_ones_and_main_prints_their_report(tmp_path, capsys):
    shared = os.path.normpath(os.path.join(bench_run.HERE, "..", "..", "shared", "bench", "workloads.json"))
    if not os.path.exists(shared):
        pytest.skip("no ../shared beside the checkout")
    kept = os.path.join(bench_run.HERE, "workloads.json")
    with open(shared) as a, open(kept) as b:
        assert json.load(a) == json.load(b), "bench/workloads.json drifted from the shared file: copy it again"
    assert set(bench_run.load_workloads()) - {"about"} == set(bench_run.BENCHMARKS)  # each one is run

    path = tmp_path / "workloads.json"
    path.write_text(json.dumps({"gpt_train_step": TINY_SPEC}))
    assert bench_run.main(["--workload", "gpt_train_step", "--repeats", "1", "--workloads-json", str(path)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(record[field] > 0 for field in TINY_SPEC["report"])
    assert record["workloads_file"] == str(path) and record["seq_len"] == 16
    assert record["cpu_cores"] >= 1


def test_gpt_sample_record_counts_the_bytes_a_step_reads():
    """Weights without the embedding tables, 12 C^2 + 13 C per layer + 2 C (ln_f) + C V (head); keys and
    values of the segment each of the 15 steps attends over (segments of 4, 8, 12, 16 positions for 1
    condition token + 15 codes: 3, 4, 4 and 4 steps)."""
    c, v, b = 32, 64, 2
    spec = {"model": dict(TINY_SPEC["model"]), "batch": b, "steps": 16}
    record = bench_sampling.bench_gpt_sample(spec, {}, repeats=1, dtype="float32")
    weights = 4 * (12 * c * c + 13 * c + 2 * c + c * v)
    kv = (3 * 4 + 4 * 8 + 4 * 12 + 4 * 16) * (2 * 1 * b * c * 4) / 15
    assert record["bytes_per_step"] == pytest.approx(weights + kv)
    assert record["gb_per_s"] > 0 and record["tokens_per_s"] > 0
    if jax.default_backend() == "cpu":  # no peak bandwidth is known for a CPU
        assert "memory_bandwidth_fraction" not in record


def test_materialize_grad_is_the_identity():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 4))
    f = lambda x: jnp.sum(jnp.sin(x) * w)  # noqa: E731
    np.testing.assert_array_equal(jax.jit(materialize_grad)(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: f(materialize_grad(x))))(x), jax.jit(jax.grad(f))(x))


def test_gelu_is_the_exact_erf_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x),
                               jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=1e-6)


def _largest_fusion(n_layer: int) -> int:
    """Operand count of the largest fusion in the compiled gradient of a GPT loss."""
    gpt = GPT(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)
    tokens = jnp.zeros((2, 16), jnp.int32)
    params = gpt.init(jax.random.PRNGKey(0), tokens)["params"]
    loss = lambda p: jnp.mean(gpt.apply({"params": p}, tokens) ** 2)  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    return max(len(re.findall(r"%[\w.\-]+", m.group(1))) for m in re.finditer(r"= \S+ fusion\((.*?)\), kind", text))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fusion property")
def test_backward_fusions_do_not_grow_with_depth():
    shallow, deep = _largest_fusion(2), _largest_fusion(8)
    assert deep <= shallow + 4, (shallow, deep)


def test_quality_record_on_a_tiny_model(tmp_path):
    """bench.quality end to end: split by sorted name, train, evaluate the held-out images."""
    from PIL import Image

    from bench import quality

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    workload = {"model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16,
                          "z_channels": 8, "embed_dim": 8, "n_embed": 32, "dropout": 0.0},
                "disc": {"ndf": 8, "n_layers": 2}, "image": [16, 16, 3]}
    record = quality.run_quality(workload, "l2_restart", str(tmp_path), n_train=4, steps=3, batch=2, seed=0)
    assert record["num_images"] == 2 and record["variant"] == "l2_restart"
    assert 0 < record["train_codes_used_last50"] <= 32 and 0 < record["codes_used"] <= 32
    assert np.isfinite([record["psnr"], record["lpips"], record["l1"], record["perplexity"]]).all()
    assert len(quality.write_lists(str(tmp_path), 4, str(tmp_path))) == 2


def test_quality_overrides_reach_top_level_and_nested_fields():
    from bench import quality
    from bench.run import load_workloads

    sets = [quality.parse_override(s) for s in ('param_init="flax"', "loss.perceptual_dropout=0",
                                                 "codebook.restart_dead=20")]
    c = quality.build_config(load_workloads()["vqgan_train_step"], "l2_restart", "t.txt", "e.txt", 10, 8, 0, sets)
    assert (c.param_init, c.loss.perceptual_dropout, c.codebook.restart_dead) == ("flax", 0, 20)
    assert c.model.l2_normalize and c.model.embed_dim == 8  # the variant's own settings stay


def test_original_cuda_harness_names_what_it_is_missing(tmp_path, monkeypatch):
    """bench/original_cuda.py runs the shared bench_original.py's builders: without that file, or without
    the original's source, it says which and where to point it."""
    from bench import original_cuda

    monkeypatch.setenv("BENCH_ORIGINAL", str(tmp_path / "absent.py"))
    with pytest.raises(FileNotFoundError, match="bench_original.py not found .*set BENCH_ORIGINAL"):
        original_cuda.load_bench_original()
    shared = next((p for p in original_cuda.ORIGINAL_PATHS if os.path.exists(p)), None)
    if shared is None:
        pytest.skip("no ../shared beside the checkout")
    monkeypatch.setenv("BENCH_ORIGINAL", shared)
    monkeypatch.setenv("TAMING_SRC", str(tmp_path))  # no taming/ in it
    with pytest.raises(SystemExit, match="TAMING_SRC"):
        original_cuda.load_bench_original()
