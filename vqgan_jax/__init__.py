"""vqgan-jax: Taming Transformers (VQGAN + GPT) in JAX/Flax."""

from vqgan_jax import convert, models, sampling
from vqgan_jax.models import GPT, LPIPS, VQGAN, NLayerDiscriminator

__version__ = "0.1.0"
__all__ = ["convert", "models", "sampling", "VQGAN", "GPT", "NLayerDiscriminator", "LPIPS"]
