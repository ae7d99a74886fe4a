"""Training: the VQGAN (first stage, and the segmentation VQGAN) and the transformer (second stage).

`run` and `evaluate` pick the loop by `config.stage` ("vqgan" when absent, or "transformer").
"""

from vqgan_jax.train import loop, transformer_loop
from vqgan_jax.train.checkpoint import Diverged
from vqgan_jax.train.config import default_config, runlocal
from vqgan_jax.train.runner import Interrupted


def _loop(config):
    stage = config.get("stage", "vqgan")
    if stage not in ("vqgan", "transformer"):
        raise ValueError(f"unknown config.stage {stage!r}: use 'vqgan' or 'transformer'")
    return transformer_loop if stage == "transformer" else loop


def run(config, workdir: str, allow_config_changes: bool = False):
    return _loop(config).run(config, workdir, allow_config_changes)


def evaluate(config, workdir: str) -> dict:
    return _loop(config).evaluate(config, workdir)


__all__ = ["run", "evaluate", "Interrupted", "Diverged", "default_config", "runlocal"]
