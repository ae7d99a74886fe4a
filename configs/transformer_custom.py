"""Unconditional transformer over the codes of your own images (one start-of-sequence token, as the
original's SOSProvider), on a VQGAN you trained with configs/vqgan_custom.py.

  python train.py --config configs/transformer_custom.py --config.data.path=/my/images \
      --config.first_stage.checkpoint=runs/custom/export/vqgan --workdir runs/custom_gpt
  python train.py --config configs/transformer_custom.py:runlocal --config.data.path=/my/images \
      --config.first_stage.checkpoint=runs/x/export/vqgan --workdir runs/x_gpt
"""

from vqgan_jax.train.config import is_runlocal
from vqgan_jax.train.gpt_config import default_config, runlocal


def get_config(arg=None):
    c = default_config()
    c.batch_size = 8
    c.data.size = 256
    c.data.random_crop = False  # the original's data class takes the centre crop, as for configs/vqgan_custom.py
    c.cond_stage.update(kind="sos", sos_token=0)
    c.model.update(vocab_size=1024, block_size=256, n_layer=24, n_head=16, n_embd=1024)
    if is_runlocal(arg):
        c = runlocal(c)
        c.data.size = 32
        c.model.update(vocab_size=128, block_size=256)
    return c
