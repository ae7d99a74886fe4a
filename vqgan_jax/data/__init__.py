"""Input pipelines: folders of images or TFDS datasets -> sharded, resumable batches in [-1, 1].

    from vqgan_jax import data
    it = data.train_iterator(config.data, global_batch_size=B, seed=0, start_step=step)
    for batch in data.prefetch_to_device(it, sharding):   # batch["image"]: [B, size, size, 3] float32
        ...
    it.skipped                                             # undecodable images skipped so far
    ev = data.eval_iterator(config.data, batch_size=B)     # one pass; batch["mask"] marks real rows

TensorFlow (tf.data) decodes and crops on the host; it is imported on first use, not with this package.
"""

from vqgan_jax.data.config import default_config
from vqgan_jax.data.device import DevicePrefetcher, prefetch_to_device, to_global
from vqgan_jax.data.folder import IMAGE_EXTENSIONS, list_images
from vqgan_jax.data.pipeline import EvalIterator, TrainIterator, eval_iterator, train_iterator
from vqgan_jax.data.preprocess import load_image

__all__ = ["default_config", "train_iterator", "eval_iterator", "TrainIterator", "EvalIterator",
           "prefetch_to_device", "DevicePrefetcher", "to_global", "list_images", "IMAGE_EXTENSIONS",
           "load_image"]
