"""Sampling code grids from a trained GPT: `sample` (KV-cached, one jitted program) and `sample_windowed`
(sliding attention window for grids larger than the training window)."""

from vqgan_jax.sampling.filters import filter_logits, top_k_filter, top_p_filter
from vqgan_jax.sampling.sampler import sample
from vqgan_jax.sampling.windowed import sample_windowed

__all__ = ["sample", "sample_windowed", "filter_logits", "top_k_filter", "top_p_filter"]
