"""VQGAN training: config, state, pure steps, sharding, checkpoints and the loop."""

from vqgan_jax.train.config import default_config, runlocal
from vqgan_jax.train.loop import evaluate, run

__all__ = ["run", "evaluate", "default_config", "runlocal"]
