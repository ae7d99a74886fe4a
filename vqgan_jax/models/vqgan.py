"""The first-stage VQGAN: encoder -> quant_conv -> quantiser -> post_quant_conv -> decoder."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vqgan_jax.models.checks import check_codes
from vqgan_jax.models.encoder_decoder import Decoder, Encoder
from vqgan_jax.models.layers import conv
from vqgan_jax.models.quantizer import QuantizerOutput, VectorQuantizer

Dtype = Any


class VQGAN(nn.Module):
    """Field names are the original's (`ddconfig` flattened, plus `embed_dim`, `n_embed`).

    Images are [B, H, W, in_channels] in [-1, 1]; H and W must be multiples of the downsampling factor
    2**(len(ch_mult)-1). Code grids are int32 [B, H/f, W/f] in raster order.
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    beta: float = 0.25
    legacy: bool = True
    # The codebook options of `VectorQuantizer` (defaults = the original).
    l2_normalize: bool = False
    codebook_dim: int = 0
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self):
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                    z_channels=self.z_channels, dropout=self.dropout, dtype=self.dtype)
        self.encoder = Encoder(in_channels=self.in_channels, **arch)
        self.decoder = Decoder(out_ch=self.out_ch, **arch)
        self.quant_conv = conv(self.embed_dim, 1, "quant_conv", self.dtype)
        self.post_quant_conv = conv(self.z_channels, 1, "post_quant_conv", self.dtype)
        self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy, self.l2_normalize,
                                        self.codebook_dim, self.entropy_weight, self.entropy_temperature)

    def _check_image(self, x) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[0] == 0:
            raise ValueError(f"expected images [B, H, W, {self.in_channels}] (NHWC, B >= 1), got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"expected float images in [-1, 1], got dtype {x.dtype} (uint8 pixels: x / 127.5 - 1)")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image height and width must be multiples of {f} (the downsampling factor), "
                             f"got {x.shape[1]}x{x.shape[2]}")

    def quantize_image(self, x, train: bool = False) -> QuantizerOutput:
        """x: [B, H, W, C] in [-1, 1] -> QuantizerOutput (z_q [B, h, w, embed_dim], indices [B, h, w], loss, stats)."""
        self._check_image(x)
        return self.quantize(self.quant_conv(self.encoder(x, train)))

    def encode(self, x, train: bool = False):
        """x: [B, H, W, C] in [-1, 1] -> (z_q [B, h, w, embed_dim], indices [B, h, w] int32, loss [])."""
        q = self.quantize_image(x, train)
        return q.z_q, q.indices, q.loss

    def decode(self, z_q, train: bool = False):
        """z_q: [B, h, w, embed_dim] -> images [B, h*f, w*f, out_ch]."""
        if z_q.ndim != 4 or z_q.shape[-1] != self.embed_dim:
            raise ValueError(f"expected latents [B, h, w, {self.embed_dim}], got shape {tuple(z_q.shape)}")
        return self.decoder(self.post_quant_conv(z_q), train)

    def decode_indices(self, indices):
        """indices: [B, h, w] int codes -> images [B, h*f, w*f, out_ch]."""
        indices = jnp.asarray(indices)
        if indices.ndim != 3:
            raise ValueError(f"expected a code grid [B, h, w], got shape {tuple(indices.shape)}")
        check_codes(indices, self.n_embed)
        return self.decode(self.quantize.lookup(indices))

    def __call__(self, x, train: bool = False):
        """x: [B, H, W, C] in [-1, 1] -> (reconstruction [B, H, W, out_ch], QuantizerOutput)."""
        q = self.quantize_image(x, train)
        return self.decode(q.z_q, train), q
