"""Reconstruction metrics: PSNR, LPIPS, codebook statistics, and an accumulator over an evaluation split.

`psnr`, `lpips_distance` and `codebook_stats` are pure and traceable (use them inside `jax.jit`);
`EvalAccumulator` runs on the host in numpy and gathers their per-image outputs batch by batch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models import LPIPS
from vqgan_jax.models.quantizer import codebook_stats

__all__ = ["psnr", "lpips_distance", "codebook_stats", "EvalAccumulator", "PSNR_MAX_DB"]

# 8-bit quantisation alone limits a [0, 1] image to ~59 dB; anything above 100 dB is "identical".
PSNR_MAX_DB = 100.0


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0, max_db: float = PSNR_MAX_DB) -> jax.Array:
    """Peak signal-to-noise ratio per image, in dB: 10 * log10(data_range**2 / mse).

    x, y: [B, H, W, C] in [-1, 1] -> [B]. With the default `data_range=2` this equals the PSNR of the
    images mapped to [0, 1] with range 1, the convention papers report (mse scales by the range squared,
    so the ratio is unchanged).

    Identical images (mse = 0) give `max_db` (100 dB), not inf: the value stays finite so that batch
    means, JSON logs and TensorBoard remain usable; every PSNR below `max_db` is exact.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr expects two batches of one shape, got {x.shape} and {y.shape}")
    # float32 even for bf16 inputs: squared differences of nearby pixels underflow bf16's mantissa.
    diff = x.astype(jnp.float32) - y.astype(jnp.float32)
    mse = jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
    peak = data_range ** 2
    # Flooring mse (rather than clipping the dB afterwards) never forms inf, so no NaN can appear.
    floor = peak * 10.0 ** (-max_db / 10.0)
    return 10.0 * jnp.log10(peak / jnp.maximum(mse, floor))


_LPIPS = LPIPS()


def lpips_distance(lpips_params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS(VGG16) distance per image: x, y: [B, H, W, 3] in [-1, 1] -> [B] (0 for identical images).

    `lpips_params` is what `vqgan_jax.models.load_lpips_params()` returns. Traceable; jit the caller.
    """
    return _LPIPS.apply({"params": lpips_params}, x, y)


class EvalAccumulator:
    """Gathers per-image metrics and the code histogram over a split, one batch at a time, on the host.

    Per-image values are kept (a few bytes an image) rather than running sums, so the result does not
    depend on how the split was batched. The histogram is integer counts, hence exact as well.
    """

    def __init__(self):
        self._per_image: dict[str, list[np.ndarray]] = {}
        self._counts = np.zeros(0, np.int64)

    @property
    def num_images(self) -> int:
        return int(sum(v.size for v in next(iter(self._per_image.values()), [])))

    def update(self, indices, mask=None, **per_image) -> None:
        """indices: [B, h, w] code indices; per_image: named [B] values (psnr=..., lpips=..., l1=...), the
        same names every call; mask: [B], falsy for padding rows (a final partial batch padded to a fixed
        shape), which are left out of every statistic."""
        indices = np.asarray(indices)
        n = indices.shape[0]
        values = {k: np.asarray(v) for k, v in per_image.items()}
        if any(v.shape != (n,) for v in values.values()):
            shapes = ", ".join(f"{k} {v.shape}" for k, v in values.items())
            raise ValueError(f"expected per-image values [B] and indices [B, ...] with one B = {n}; got {shapes}")
        if self._per_image and set(values) != set(self._per_image):
            raise ValueError(f"metrics {sorted(values)} differ from the earlier batches' {sorted(self._per_image)}")
        if mask is not None:
            keep = np.asarray(mask).astype(bool).reshape(n)
            indices, values = indices[keep], {k: v[keep] for k, v in values.items()}
        for k, v in values.items():
            self._per_image.setdefault(k, []).append(v.astype(np.float64))
        # n_embed is only known at result(); grow the histogram to the largest index seen so far.
        counts = np.bincount(indices.reshape(-1).astype(np.int64), minlength=self._counts.size)
        counts[:self._counts.size] += self._counts
        self._counts = counts

    def result(self, n_embed: int) -> dict:
        """-> {each per-image metric: its mean over images; codebook_usage: fraction of the `n_embed` codes
        used anywhere in the split; codes_used: their number; perplexity: exp(entropy) of the split's code
        histogram; num_images}, plain Python numbers (JSON-ready)."""
        if not self.num_images:
            raise ValueError("EvalAccumulator.result() called before any (unmasked) image was added")
        if self._counts.size > n_embed:
            raise ValueError(f"code index {self._counts.size - 1} seen, but n_embed is {n_embed}")
        counts = np.zeros(n_embed, np.int64)
        counts[:self._counts.size] = self._counts
        probs = counts[counts > 0] / counts.sum()
        means = {k: float(np.mean(np.concatenate(v))) for k, v in self._per_image.items()}
        return {
            **means,
            "codebook_usage": float(np.count_nonzero(counts) / n_embed),
            "codes_used": int(np.count_nonzero(counts)),
            "perplexity": float(np.exp(-np.sum(probs * np.log(probs)))),
            "num_images": self.num_images,
        }
