"""One of two training processes: `python multihost_worker.py DATA WORKDIR COORDINATOR PROCESS_ID`.
Trains 3 steps with jax.distributed over local CPU processes; process 1 gets SIGTERM during the first, so
both stop together (at step 2) and resume. Saves the step it stopped at and its final parameters as
WORKDIR/stopped_<id>.txt and WORKDIR/params_<id>.npz (run by tests/test_train.py)."""

import os
import signal
import sys

import jax
import numpy as np


def main(data_path, workdir, coordinator, process_id):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sharded_step_worker import tiny_config
    from vqgan_jax.train import Interrupted, run, runner

    c = tiny_config(lpips=False)
    c.data.path = data_path
    c.total_steps = 3
    c.loss.disc_start = 1
    c.log_every = 1
    c.image_every = 0
    c.checkpoint_every = 100
    c.distributed.update(coordinator_address=coordinator, num_processes=2, process_id=int(process_id))
    step_fn = runner.run_step

    def preempted(*args):
        if process_id == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        runner.run_step = step_fn
        return step_fn(*args)

    runner.run_step = preempted
    try:
        run(c, workdir)
        raise AssertionError("not stopped")
    except Interrupted as stopped:
        with open(os.path.join(workdir, f"stopped_{process_id}.txt"), "w") as f:
            f.write(str(stopped.step))
    state = run(c, workdir)
    assert jax.process_count() == 2
    params = jax.device_get(state.gen_params)
    flat = {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(workdir, f"params_{process_id}.npz"), **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])
