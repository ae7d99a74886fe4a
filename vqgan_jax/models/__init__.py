"""Flax modules: VQGAN (encoder, quantiser, decoder), PatchGAN discriminator, LPIPS and GPT."""

from vqgan_jax.models.discriminator import NLayerDiscriminator
from vqgan_jax.models.encoder_decoder import Decoder, Encoder
from vqgan_jax.models.gpt import GPT
from vqgan_jax.models.lpips import LPIPS, load_lpips_params
from vqgan_jax.models.quantizer import QuantizerOutput, VectorQuantizer, codebook_stats
from vqgan_jax.models.vqgan import VQGAN

__all__ = ["VQGAN", "Encoder", "Decoder", "VectorQuantizer", "QuantizerOutput", "codebook_stats",
           "NLayerDiscriminator", "LPIPS", "load_lpips_params", "GPT"]
