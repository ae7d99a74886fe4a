"""FacesHQ transformer conditioned on coordinates (the original's configs/faceshq_transformer.yaml): the
condition is the crop's position map, area-pooled by 16 and quantised to 1024 levels (CoordStage).

  python train.py --config configs/transformer_faceshq.py --config.data.path=/data/faces \
      --config.first_stage.checkpoint=runs/faceshq_vqgan/export/vqgan --workdir runs/faceshq_gpt
"""

from vqgan_jax.train.config import is_runlocal
from vqgan_jax.train.gpt_config import default_config, runlocal


def get_config(arg=None):
    c = default_config()
    c.batch_size = 2
    c.data.size = 256
    c.data.random_crop = True
    c.cond_stage.update(kind="coord", n_embed=1024, down_factor=16)
    c.model.update(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024)
    if is_runlocal(arg):
        # For the :runlocal VQGANs (32 px crops, f=2, 128 codes): 16 x 16 codes, 2 x 2 coordinate tokens.
        c = runlocal(c)
        c.data.size = 32
        c.cond_stage.update(n_embed=128, down_factor=16)
        c.model.update(vocab_size=128, block_size=260)
    return c
