"""What the VQGAN and transformer loops share: opening a run and running its steps.

`open_run`: distributed set-up, the mesh, the checks of the run's settings and of a resumed run's config,
and the state (born sharded, or restored from the last checkpoint). `train`: the step loop with logging,
progress, checkpoints (periodic, on SIGTERM/SIGINT, after an error, at the end; never of a diverged state),
the hosts' agreement on when to stop, and `Interrupted` when a signal stopped it first.
"""

import contextlib
import functools
import signal
import threading
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqgan_jax import data
from vqgan_jax.train.checkpoint import Checkpointer, Diverged, abstract_with_shardings, all_finite
from vqgan_jax.train.logging import MetricWriter, Progress
from vqgan_jax.train.sharding import batch_sharding, make_mesh
from vqgan_jax.train.workdir import check_resume, has_checkpoint, write_config


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


def require_checkpoint(workdir: str) -> None:
    """Evaluating needs a checkpoint: FileNotFoundError naming the workdir. Called first, as the loops load
    other weights (LPIPS, the frozen stages) before `open_run`."""
    if not has_checkpoint(workdir):
        raise FileNotFoundError(f"no checkpoint in {workdir!r} to evaluate: train there first")


def open_run(config, workdir: str, state_shapes: Callable, create_state: Callable,
             allow_config_changes: bool | None = None):
    """-> (mesh, checkpointer, state, shardings): the state restored from `workdir`'s last checkpoint, or
    created when there is none.

    state_shapes(mesh, rng) -> (abstract state, shardings); create_state(mesh, rng) -> (state, shardings).
    allow_config_changes: a bool when training (a resumed run's config is checked against the run's,
    `workdir.check_resume`); None when evaluating, which reads the last checkpoint whatever the config (the
    caller has checked that there is one: `require_checkpoint`).
    """
    initialize_distributed(config)
    mesh = make_mesh(config.mesh)
    check_run(config, mesh)
    if allow_config_changes is not None:
        check_resume(config, workdir, allow_config_changes)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    rng = jax.random.PRNGKey(config.seed)
    if checkpointer.latest_step() is not None:
        abstract, shardings = state_shapes(mesh, rng)
        state, _ = checkpointer.restore(abstract_with_shardings(abstract, shardings))
    else:
        state, shardings = create_state(mesh, rng)
    return mesh, checkpointer, state, shardings


@contextlib.contextmanager
def closed_on_error(checkpointer: Checkpointer):
    """Closes `checkpointer` if the block raises: for what a loop sets up between `open_run` and `train`
    (which closes it itself)."""
    try:
        yield
    except BaseException:
        checkpointer.close()
        raise


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


def train(config, workdir: str, mesh, checkpointer: Checkpointer, state, source: Iterator[dict],
          step_fn: Callable[[int], Callable], step_args: tuple = (),
          after_step: Callable | None = None, finish: Callable | None = None):
    """Runs the steps from `state.step` to `config.total_steps` and returns the state; raises `Interrupted`
    when SIGTERM/SIGINT stopped it first (after saving), and `Diverged` when a log step or a save finds NaN
    or inf in the state (which is not saved). Closes `checkpointer` and the input.

    source: the run's host batches from the state's step on. step_fn(step) -> the jitted step
    `(state, batch, *step_args) -> (state, metrics)` that takes the state from `step` to `step + 1`.
    after_step(step, state, batch, writer): the run's own work after each step (images, validation).
    finish(step, state, writer): once `total_steps` is reached and saved (the export).
    """
    start = int(state.step)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
    write_config(config, workdir)
    batches = data.prefetch_to_device(source, batch_sharding(mesh))
    progress = Progress(config.total_steps, start)
    stop = _StopRequest()
    step = start
    try:
        while step < config.total_steps:
            batch = next(batches)
            timed = log_step(step + 1, config)
            state, metrics, seconds = run_step(step_fn(step), state, (batch, *step_args), timed)
            step += 1
            progress.update(step)
            if timed:
                writer.write_step(step, metrics, seconds, progress, source)
                # Checked where the loop waits for the step anyway; the saves check every state they write.
                if not bool(all_finite(state)):
                    raise Diverged(step, checkpointer.latest_step())
            if after_step:
                after_step(step, state, batch, writer)
            if step % config.checkpoint_every == 0:
                checkpointer.save(state, step)
            if stop.requested():
                break
        checkpointer.save(state, step)
        if step >= config.total_steps and finish:
            finish(step, state, writer)
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
