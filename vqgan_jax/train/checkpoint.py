"""Orbax checkpoints of the whole training state, in `workdir/checkpoints/<step>`.

The state holds step, parameters, optimiser states, batch statistics, EMA and RNG; the data position is
the step itself (the input pipeline is resumable by step), saved beside it as JSON for the record.
"""

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vqgan_jax.pretrained import error_summary


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, step: int) -> None:
        """Blocks until written: a save requested on preemption must land before the process exits. Raises
        `Diverged` instead of saving a state that holds NaN or inf: it would push a good checkpoint out of
        the last `keep`, and a resumed run would start from it."""
        if step in self.manager.all_steps():
            return
        if not bool(all_finite(state)):
            raise Diverged(step, self.latest_step())
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave({"step": int(step)})))
        self.manager.wait_until_finished()

    def save_after_error(self, state, step: int) -> bool:
        """After an exception in a single-process loop: saves the last completed step unless its buffers
        went to the step that failed (donated) or it holds NaN or inf, and swallows errors of its own so
        that the loop's error is the one raised. -> whether it saved. With several processes it does
        nothing: a save is collective, and the others are not there to join it."""
        leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
        if jax.process_count() > 1 or any(x.is_deleted() for x in leaves):
            return False
        try:
            self.save(state, step)
        except Exception:  # noqa: BLE001 -- the loop re-raises its own error
            return False
        return True

    def restore(self, abstract_state, step: int | None = None):
        """abstract_state: ShapeDtypeStructs carrying the target shardings -> (state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory!r}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax's and tensorstore's errors name neither the step nor what to do
            earlier = [s for s in self.manager.all_steps() if s < step]
            way_out = (f"remove it to resume from step {max(earlier)}" if earlier else
                       "no earlier checkpoint is kept")
            raise RuntimeError(f"checkpoint {os.path.join(self.directory, str(step))!r} could not be restored "
                               f"({error_summary(e)}): it is damaged or incomplete, or the config's model or optimiser "
                               f"differs from the run's; {way_out}") from e
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()


class Diverged(RuntimeError):
    """The state at `step` holds NaN or inf; `last_saved` is the step of the last checkpoint, or None."""

    def __init__(self, step: int, last_saved: int | None):
        kept = f"the last checkpoint is step {last_saved}" if last_saved is not None else "there is no checkpoint"
        super().__init__(f"training diverged: the state at step {step} holds NaN or inf, and is not saved; "
                         f"{kept}. Resuming repeats the same steps exactly: change what made it diverge (e.g. a "
                         f"lower learning rate) and resume with --allow_config_changes")
        self.step, self.last_saved = step, last_saved


@jax.jit
def all_finite(tree) -> jax.Array:
    """-> a bool scalar: whether every float leaf of `tree` is finite. The integer leaves (step, RNG keys)
    always are. A collective when the tree is sharded over processes: every process calls it."""
    checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.array(True)


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_tree, shardings)
