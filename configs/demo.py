"""The demo: a small VQGAN trained on the photographs that ship inside scikit-image, on a 2-core CPU in a
few minutes, with the discriminator switched on half-way, and the improved codebook (l2-normalised
8-dimensional codes, `improved_codebook`): the original's quantiser leaves most of its codes unused.

  python train.py --config configs/demo.py --workdir runs/demo

Writes runs/demo/metrics.jsonl (losses, PSNR, codebook usage), runs/demo/images/reconstructions_*.png
(inputs above, reconstructions below) and the trained model in runs/demo/export/vqgan.
"""

from vqgan_jax.train.config import default_config, improved_codebook, is_runlocal


def get_config(arg=None):
    c = default_config()
    c.data.path = "skimage:"
    c.data.size = 32
    c.data.flip = True
    c.batch_size = 8
    c.total_steps = 240
    c.log_every = 20
    c.image_every = 80
    c.checkpoint_every = 80
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                   z_channels=32, n_embed=256)
    c.loss.update(disc_start=120, disc_ndf=32, disc_num_layers=2)
    c.optim.base_learning_rate = 2e-5  # the original's 4.5e-6 is tuned for long runs
    improved_codebook(c)
    if is_runlocal(arg):
        c.total_steps = 20
        c.loss.disc_start = 10
    return c
