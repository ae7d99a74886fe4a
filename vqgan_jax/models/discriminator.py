"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`, as used by taming), NHWC.

Layers are named `main_<i>` after their index in the original's `nn.Sequential` (LeakyReLUs take indices
too), so `main.3.weight` converts to `main_3/scale`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vqgan_jax.models.conv import Conv
from vqgan_jax.models.norm import BatchNorm

Dtype = Any


class NLayerDiscriminator(nn.Module):
    """x: [B, H, W, C] in [-1, 1] -> patch logits [B, H', W', 1] (H' = H/2**n_layers - 2 for H a multiple of it).

    BatchNorm (PyTorch's, `models/norm.py`) normalises with the batch statistics when `train=True` (call
    `apply` with `mutable=["batch_stats"]`), with the running averages otherwise.
    """
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        def conv(features, stride, index, use_bias):
            return Conv(features, 4, strides=stride, padding=((1, 1), (1, 1)), use_bias=use_bias,
                        dtype=self.dtype, name=f"main_{index}", kernel_init=nn.initializers.normal(0.02))

        def norm(index):
            return BatchNorm(dtype=self.dtype, name=f"main_{index}", scale_init=lambda key, shape, dtype=jnp.float32:
                             1.0 + 0.02 * nn.initializers.normal(1.0)(key, shape, dtype))

        x = nn.leaky_relu(conv(self.ndf, 2, 0, True)(x), 0.2)
        index = 2
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            x = conv(self.ndf * min(2 ** n, 8), stride, index, False)(x)
            x = nn.leaky_relu(norm(index + 1)(x, train), 0.2)
            index += 3
        return conv(1, 1, index, True)(x)
