"""`run(config, workdir)`: the VQGAN training loop; `evaluate(config, workdir)`: metrics over a split.

Sections: distributed set-up, mesh, models and state (born sharded, or restored), input, steps, loop with
logging, checkpoints (periodic, on SIGTERM/SIGINT, at the end) and the generator's export.
"""

import functools
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqgan_jax import data
from vqgan_jax.metrics import EvalAccumulator
from vqgan_jax.models import load_lpips_params
from vqgan_jax.pretrained import save_pretrained
from vqgan_jax.train import codebook
from vqgan_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from vqgan_jax.train.logging import MetricWriter, Progress
from vqgan_jax.train.sharding import batch_sharding, make_mesh, replicated
from vqgan_jax.train.state import build_models, create_state, state_shapes
from vqgan_jax.train.steps import jit_train_step, make_eval_step, model_input, phase
from vqgan_jax.train.workdir import check_resume, has_checkpoint, write_config


def label_colours(maps):
    """maps: [B, H, W, n_labels] one-hot or logits -> [B, H, W, 3] in [-1, 1]: each label's fixed colour
    (a random palette drawn once, as the original's random `colorize` projection)."""
    palette = jax.random.uniform(jax.random.PRNGKey(0), (maps.shape[-1], 3), minval=-1.0, maxval=1.0)
    return palette[jnp.argmax(maps, axis=-1)]


def initialize_distributed(config) -> None:
    d = config.distributed
    if jax.distributed.is_initialized():
        return
    if d.coordinator_address:
        jax.distributed.initialize(coordinator_address=d.coordinator_address,
                                   num_processes=d.num_processes, process_id=d.process_id)
    elif d.get("from_environment", False):
        jax.distributed.initialize()  # the cluster's address, size and rank from the launcher's variables


def check_run(config, mesh) -> None:
    """Loop settings that would otherwise fail only once training has started: ValueError naming them."""
    for field in ("log_every", "checkpoint_every"):
        if config[field] < 1:
            raise ValueError(f"{field}={config[field]} must be >= 1 (it is a step interval)")
    if config.keep_checkpoints < 1:  # orbax would delete every checkpoint, the last one included
        raise ValueError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1")
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the {mesh.size} devices of the mesh "
                         f"{dict(mesh.shape)}: the batch is split evenly over them")


def run_step(step_fn, state, args, timed: bool):
    """-> (state, metrics, seconds): with `timed`, the step's own time (the previous step is waited for
    first and this one after: dispatch is asynchronous, so the time around the call alone is the time to
    queue it), else None. Only log steps are timed, as each wait drains the queue of dispatched steps."""
    if timed:
        jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, *args)
    if timed:
        jax.block_until_ready(metrics)
    return state, metrics, time.perf_counter() - t0 if timed else None


def log_step(step: int, config) -> bool:
    """Whether the step that ends at `step` (1-based count) is logged."""
    return step % config.log_every == 0 or step == config.total_steps


class Interrupted(Exception):
    """Raised by `run` when SIGTERM or SIGINT stopped it before `total_steps`, after it saved the step it had
    reached: the run is not finished (a job scheduler must not take it for done), and running it again
    resumes it."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; its checkpoint is saved, "
                         f"and the same command resumes the run")
        self.step, self.signum = step, signum


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop reads at step boundaries, so it saves before leaving."""

    def __init__(self):
        self.event = threading.Event()
        self.signum = None
        self._previous = {}
        self._pending = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        self.event.set()

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.event.is_set()
        # Every host must stop at the same step, or the collective save would hang, so the hosts' flags
        # go through a collective. Reading it at once would wait for the step queued before it, every
        # step; it is read one call later instead, when that step is done and the next one is queued.
        previous, self._pending = self._pending, any_process(self.event.is_set())
        if previous is not None and bool(np.asarray(previous)):
            self.signum = self.signum or signal.SIGTERM  # another host's signal
            return True
        return False

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_process(flag: bool) -> jax.Array:
    """-> a replicated bool array: whether `flag` is set on any process (dispatched, not waited for)."""
    rows, any_fn = _any_process_fn()
    return any_fn(jax.make_array_from_process_local_data(rows, np.array([flag]), (jax.process_count(),)))


@functools.cache
def _any_process_fn():
    """-> (sharding of one row per process, jitted reduction to a replicated scalar)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices).reshape(jax.process_count(), -1), ("process", "local"))
    return NamedSharding(mesh, P("process")), jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))


def _setup(config, workdir, allow_config_changes: bool | None = None):
    """allow_config_changes: None (evaluation) reads the last checkpoint whatever the config; a bool checks
    that a resumed run's config is the run's (`workdir.check_resume`)."""
    codebook.check_config(config)
    initialize_distributed(config)
    mesh = make_mesh(config.mesh)
    check_run(config, mesh)
    if allow_config_changes is not None:
        check_resume(config, workdir, allow_config_changes)
    models = build_models(config)
    lpips_params = jax.device_put(load_lpips_params(config.lpips_path or None), replicated(mesh))
    checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    rng = jax.random.PRNGKey(config.seed)
    if checkpointer.latest_step() is not None:
        abstract, shardings = state_shapes(models, config, mesh, rng)
        state, _ = checkpointer.restore(abstract_with_shardings(abstract, shardings))
    else:
        state, shardings = create_state(models, config, mesh, rng)
    return mesh, models, lpips_params, shardings, checkpointer, state


def run(config, workdir: str, allow_config_changes: bool = False):
    """Trains until `config.total_steps`, resuming from the last checkpoint in `workdir` if there is one
    (refused if the config changed since, unless `allow_config_changes`). Raises `Interrupted` when a
    signal stopped it first."""
    os.makedirs(workdir, exist_ok=True)
    mesh, models, lpips_params, shardings, checkpointer, state = _setup(config, workdir, allow_config_changes)
    start = int(state.step)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
    write_config(config, workdir)

    source = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                 start_step=start)
    batches = data.prefetch_to_device(source, batch_sharding(mesh))
    repl = replicated(mesh)
    steps = {}

    def train_step(step):
        key = phase(step, config.loss)
        if key not in steps:
            steps[key] = jit_train_step(models, config, mesh, shardings, *key)
        return steps[key]

    # Inputs beside reconstructions, gathered onto every host: the batch is sharded across them.
    def reconstruct(params, batch):
        x = model_input(config, batch)[:8]
        pairs = jnp.concatenate([x, models.vq.apply({"params": params}, x)[0]])
        return label_colours(pairs) if config.image_key == "segmentation" else pairs

    reconstruct = jax.jit(reconstruct, out_shardings=repl)
    gather = jax.jit(lambda tree: tree, out_shardings=repl)
    progress = Progress(config.total_steps, start)
    stop = _StopRequest()
    step = start
    try:
        while step < config.total_steps:
            batch = next(batches)
            timed = log_step(step + 1, config)
            state, metrics, seconds = run_step(train_step(step), state, (batch, lpips_params), timed)
            step += 1
            progress.update(step)
            if timed:
                writer.write_step(step, metrics, seconds, progress, source)
            if config.image_every and (step % config.image_every == 0 or step == config.total_steps):
                pairs = reconstruct(state.gen_params, batch)
                writer.write_images(step, "reconstructions", np.asarray(jax.device_get(pairs)))
            if step % config.checkpoint_every == 0:
                checkpointer.save(state, step)
            if stop.requested():
                break
        checkpointer.save(state, step)
        if step >= config.total_steps:
            params = state.ema_params if state.ema_params is not None else state.gen_params
            params = jax.device_get(gather(params))
            save_pretrained(os.path.join(workdir, "export", "vqgan"), models.vq, {"params": params})
    except Exception:
        checkpointer.save_after_error(state, step)
        raise
    finally:
        stop.restore()
        batches.close()
        writer.close()
        checkpointer.close()
    if step < config.total_steps:
        raise Interrupted(step, stop.signum)
    return state


def reconstruction_metrics(models, config, params, lpips_params, mesh, split: str | None = None) -> dict:
    """EvalAccumulator's result for the generator `params` over the evaluation split (the first
    `config.eval_batches` batches when set). Each host reads its own rows; the batch is put together over
    `mesh` and every host gets every row's metrics back."""
    eval_step = make_eval_step(models)
    step_fn = jax.jit(lambda p, batch, lp: (*eval_step(p, batch["image"], lp), batch["mask"]),
                      in_shardings=(None, batch_sharding(mesh), replicated(mesh)), out_shardings=replicated(mesh))
    acc = EvalAccumulator()
    for i, batch in enumerate(data.eval_iterator(config.data, batch_size=config.batch_size, split=split)):
        if config.eval_batches and i >= config.eval_batches:
            break
        rows = {"image": batch["image"], "mask": batch.get("mask", np.ones(len(batch["image"]), bool))}
        per_image, idx, mask = jax.device_get(step_fn(params, data.to_global(rows, batch_sharding(mesh)),
                                                      lpips_params))
        acc.update(idx, mask=mask, **per_image)
    return acc.result(config.model.n_embed)


def evaluate(config, workdir: str, split: str | None = None) -> dict:
    """PSNR, LPIPS and codebook usage of the last checkpoint's generator (EMA if kept) over a split;
    written to `workdir/eval_<step>.json`."""
    if not has_checkpoint(workdir):
        raise FileNotFoundError(f"no checkpoint in {workdir!r} to evaluate: train there first")
    if config.image_key == "segmentation":
        raise ValueError("--mode eval measures PSNR/LPIPS of images; a segmentation VQGAN's training log has "
                         "its bce_loss and pixel_accuracy")
    mesh, models, lpips_params, _, checkpointer, state = _setup(config, workdir)
    checkpointer.close()
    params = state.ema_params if state.ema_params is not None else state.gen_params
    result = dict(reconstruction_metrics(models, config, params, lpips_params, mesh, split), step=int(state.step))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{int(state.step)}.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
