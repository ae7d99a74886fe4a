"""Conversion between the original taming-transformers checkpoints (PyTorch) and our Flax parameters."""

from vqgan_jax.convert.taming import (discriminator_from_taming, discriminator_to_taming, gpt_config,
                                      gpt_from_taming, gpt_to_taming, load_state_dict, vqgan_config,
                                      vqgan_from_taming, vqgan_to_taming)

__all__ = ["vqgan_from_taming", "gpt_from_taming", "discriminator_from_taming", "vqgan_to_taming",
           "gpt_to_taming", "discriminator_to_taming", "load_state_dict", "vqgan_config", "gpt_config"]
