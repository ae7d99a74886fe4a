"""vqgan-jax: Taming Transformers (VQGAN + GPT) in JAX/Flax."""

from vqgan_jax.xla_flags import apply_cpu_defaults

apply_cpu_defaults()  # before anything below can start JAX's backend

from vqgan_jax import convert, models, sampling  # noqa: E402
from vqgan_jax.models import GPT, LPIPS, VQGAN, NLayerDiscriminator  # noqa: E402

__version__ = "0.1.0"
__all__ = ["convert", "models", "sampling", "VQGAN", "GPT", "NLayerDiscriminator", "LPIPS"]
