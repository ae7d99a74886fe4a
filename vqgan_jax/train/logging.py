"""Training logs: scalars to JSONL and TensorBoard, image grids to PNG and TensorBoard, a progress line.

Files under `workdir`:
  metrics.jsonl                      one JSON object a line: {"step": k, "<name>": float, ...}
  tb/                                TensorBoard event files (scalars and images)
  images/{name}_{step:07d}.png       image grids, rows of up to 8
"""

import collections
import io
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image

# Cheap: TensorFlow itself is imported on the first write (it costs seconds), with the GPUs hidden.
from vqgan_jax.data._tf import tf as _tensorflow

__all__ = ["MetricWriter", "Progress", "save_image_grid", "image_grid", "read_jsonl"]


def _to_uint8(images) -> np.ndarray:
    """[..., C] in [-1, 1] -> uint8 in [0, 255]; NaN (a diverged model) becomes black, not an error."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.nan_to_num(x.round(), nan=0.0).clip(0, 255).astype(np.uint8)


def image_grid(images, ncol: int = 8) -> np.ndarray:
    """images: [N, H, W, C] in [-1, 1] -> uint8 [rows * H, min(N, ncol) * W, C], filled row by row;
    cells past the N-th image in the last row are black. No padding between images."""
    images = _to_uint8(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, H, W, C] batch, got shape {images.shape}")
    n, h, w, c = images.shape
    cols = min(n, ncol)
    rows = -(-n // cols)
    cells = np.zeros((rows * cols, h, w, c), np.uint8)
    cells[:n] = images
    # [rows, cols, H, W, C] -> [rows, H, cols, W, C]: each grid row is its images side by side.
    return cells.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _png_bytes(grid: np.ndarray) -> bytes:
    """uint8 [H, W, 1 or 3] -> PNG file contents."""
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def _write_png(png: bytes, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png)


def save_image_grid(images, path: str, ncol: int = 8) -> np.ndarray:
    """Writes `image_grid(images, ncol)` ([N, H, W, 1 or 3] in [-1, 1]) to the PNG `path`, creating its
    folder; returns the uint8 grid [rows * H, cols * W, C]."""
    grid = image_grid(images, ncol)
    _write_png(_png_bytes(grid), path)
    return grid


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file, in order (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_log(path: str, last_step: int) -> int:
    """Keeps the records of metrics.jsonl up to `last_step`; rewritten by rename, so a crash leaves either
    log whole. -> the last `skipped_files` kept (0 if none): validation records carry none."""
    kept, skipped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
                skipped = int(record.get("skipped_files", skipped))
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return skipped


def _truncate_tb(tb_dir: str, last_step: int) -> None:
    """Drops the TensorBoard events past `last_step` from the event files in `tb_dir`, as `_truncate_log`
    does for metrics.jsonl (TensorBoard would draw both runs' values of those steps); a file is rewritten
    by rename, and only when it holds such events. A record cut short by the kill ends its file."""
    tf = _tensorflow()
    from tensorflow.core.util import event_pb2
    from tensorflow.python.lib.io import tf_record

    for path in tf.io.gfile.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
        records = []
        try:
            for raw in tf_record.tf_record_iterator(path):
                records.append(raw)
        except tf.errors.DataLossError:
            pass
        kept = [raw for raw in records if event_pb2.Event.FromString(raw).step <= last_step]
        if len(kept) < len(records) or os.path.getsize(path) > sum(len(r) + 16 for r in records):
            with tf.io.TFRecordWriter(path + ".tmp") as f:
                for raw in kept:
                    f.write(raw)
            os.replace(path + ".tmp", path)


def _tb_write(writer, tag: str, tensor, step: int, plugin: str, data_class: str) -> None:
    """Writes `tensor` with the SummaryMetadata TensorBoard's own `tf.summary.scalar` / `image` attach
    (their plugin data, version 0, serialises to b""). Done by hand because tensorflow-cpu does not
    ship the `tensorboard` package those functions live in; it is only needed to view the logs."""
    tf = _tensorflow()  # first, so that TF is imported with the GPUs hidden
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=b""),
        data_class=summary_pb2.DataClass.Value(data_class))
    with writer.as_default():
        tf.summary.write(tag, tensor, step=step, metadata=meta)


class MetricWriter:
    """Writes scalars and images under `workdir`; with `enabled=False` (every process but the first in
    a multi-host run) each method does nothing and nothing is created.

    TensorBoard's writer is created at the first write: importing TensorFlow costs seconds.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
        """resume_step: the step a run resumes from. Records past it (logged by a run killed after its last
        checkpoint, and about to be logged again) are dropped from metrics.jsonl and TensorBoard's event
        files, as is a line or a record cut short."""
        self.workdir = workdir
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._skipped_before = 0  # the input's skipped-file count last logged before a resume: it goes on from there
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if resume_step is not None and os.path.exists(path):
                self._skipped_before = _truncate_log(path, resume_step)
            if resume_step is not None and os.path.isdir(os.path.join(workdir, "tb")):
                _truncate_tb(os.path.join(workdir, "tb"), resume_step)
            # Append: a resumed run continues the same log.
            self._jsonl = open(path, "a")

    def _summary_writer(self):
        if self._tb is None:
            self._tb = _tensorflow().summary.create_file_writer(os.path.join(self.workdir, "tb"))
        return self._tb

    def write_scalars(self, step: int, scalars: dict) -> None:
        """Appends {"step": step, **scalars} to metrics.jsonl (flushed) and writes each to TensorBoard.
        Values: Python numbers or size-1 numpy/jax arrays. NaN/inf are kept (JSON's NaN/Infinity
        extension, which Python reads back): a diverging loss must show in the log."""
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("'step' is reserved for the step number")
        # reshape(()) accepts any size-1 array ([1], [1, 1], jax or numpy) and rejects larger ones.
        values = {k: float(np.asarray(v).reshape(())) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        writer = self._summary_writer()
        for name, value in values.items():
            _tb_write(writer, name, np.float32(value), int(step), "scalars", "DATA_CLASS_SCALAR")
        writer.flush()

    def write_step(self, step: int, metrics, step_time: float, progress, source) -> None:
        """A training step's metrics (device arrays) with its time, the run's steps/s and the input's
        skipped-file count since the run began (across resumes: from the last count logged before it, so
        the files met between that log step and the checkpoint are not in it, and those of the batches read
        ahead at the stop are counted again)."""
        import jax

        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(step_time=step_time, steps_per_sec=progress.steps_per_sec,
                       skipped_files=self._skipped_before + getattr(source, "skipped", 0))
        self.write_scalars(step, scalars)

    def write_images(self, step: int, name: str, images) -> None:
        """images: [N, H, W, 3] in [-1, 1] -> one grid (rows of up to 8) saved to
        images/{name}_{step:07d}.png and to TensorBoard under `name`."""
        if not self.enabled:
            return
        grid = image_grid(images, ncol=8)
        png = _png_bytes(grid)
        _write_png(png, os.path.join(self.workdir, "images", f"{name}_{int(step):07d}.png"))
        writer = self._summary_writer()
        # The image plugin's layout: [width, height, png, ...] as one string vector.
        blob = np.array([str(grid.shape[1]).encode(), str(grid.shape[0]).encode(), png], dtype=object)
        _tb_write(writer, name, blob, int(step), "images", "DATA_CLASS_BLOB_SEQUENCE")
        writer.flush()

    def close(self) -> None:
        """Flushes and closes the files; safe to call more than once."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_duration(seconds: float) -> str:
    """Seconds -> "hh:mm:ss" (hours may exceed 99); "--:--:--" when unknown (NaN or inf)."""
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Prints `step k/N (p%) | x.xx steps/s | ETA hh:mm:ss` to `stream` (stderr) as training goes.

    A line is printed every `every_steps` steps if given, else at most every `every_seconds` seconds,
    and always at the last step. Speed is measured over roughly the last `window_seconds` between calls
    to `update`; the first call after construction only starts the clock, so the first step's time
    (which includes compilation) never counts. `clock` is injectable for tests.
    """

    def __init__(self, total_steps: int, start_step: int = 0, every_seconds: float = 10.0,
                 every_steps: int | None = None, window_seconds: float = 30.0, stream=None,
                 clock=time.monotonic):
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.every_seconds = every_seconds
        self.every_steps = every_steps
        self.window_seconds = window_seconds
        self.stream = stream
        self._clock = clock
        self._samples: collections.deque[tuple[int, float]] = collections.deque()
        self._last_print = clock()
        self.step = self.start_step

    @property
    def steps_per_sec(self) -> float:
        """Recent steps per second; NaN until two `update` calls have been made."""
        if len(self._samples) < 2:
            return float("nan")
        (s0, t0), (s1, t1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else float("nan")

    @property
    def eta_seconds(self) -> float:
        rate = self.steps_per_sec
        return (self.total_steps - self.step) / rate if rate > 0 else float("nan")

    def line(self) -> str:
        """The report for the latest step, e.g. `step 120/1000 (12.0%) | 3.45 steps/s | ETA 00:04:15`."""
        pct = 100.0 * self.step / self.total_steps if self.total_steps else 100.0
        rate = self.steps_per_sec
        rate_str = f"{rate:.2f}" if math.isfinite(rate) else "-"
        return (f"step {self.step}/{self.total_steps} ({pct:.1f}%) | {rate_str} steps/s | "
                f"ETA {format_duration(self.eta_seconds)}")

    def update(self, step: int) -> None:
        """Records that `step` steps are done; prints a line when one is due."""
        now = self._clock()
        self.step = int(step)
        self._samples.append((self.step, now))
        # Drop the oldest sample while the rest still span the window: the rate follows recent speed
        # (after a recompilation, e.g. when the discriminator starts) within about a window.
        while len(self._samples) > 2 and now - self._samples[1][1] >= self.window_seconds:
            self._samples.popleft()
        if self.every_steps:
            due = self.step % self.every_steps == 0
        else:
            due = now - self._last_print >= self.every_seconds
        if due or self.step >= self.total_steps:
            self._last_print = now
            print(self.line(), file=self.stream or sys.stderr, flush=True)
