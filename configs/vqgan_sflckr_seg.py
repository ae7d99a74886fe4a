"""The segmentation VQGAN of S-FLCKR (the original's configs/sflckr_cond_stage.yaml, VQSegmentationModel):
a VQGAN over one-hot COCO-Stuff label maps (182 classes), trained with BCE + codebook loss, no LPIPS and
no discriminator. Its codes condition configs/transformer_sflckr.py.

  python train.py --config configs/vqgan_sflckr_seg.py --config.data.path=/data/sflckr/images \
      --config.data.segmentation_path=/data/sflckr/segmentations --workdir runs/sflckr_seg
"""

from vqgan_jax.train.config import default_config, is_runlocal, runlocal

N_LABELS = 182


def get_config(arg=None):
    c = default_config()
    c.image_key = "segmentation"
    c.loss.kind = "segmentation"
    c.batch_size = 12
    c.data.n_labels = N_LABELS
    c.data.random_crop = False  # the original's data class takes the centre crop
    c.model.update(embed_dim=256, n_embed=1024, z_channels=256, in_channels=N_LABELS, out_ch=N_LABELS)
    if is_runlocal(arg):
        c = runlocal(c)
        c.optim.base_learning_rate = 1e-4  # a smoke run has no time for the original's 4.5e-6
    return c
