"""Sample images from a trained transformer (or converted original checkpoints) and write PNGs and a grid.

  python sample.py --workdir runs/demo_gpt --n 8 --top_k 100 --out runs/demo_gpt/samples
  python sample.py --workdir runs/cin --classes 9,232 --n 16 --top_k 600 --top_p 0.92 --temperature 1.0 --cfg 2.0
  python sample.py --workdir runs/sflckr_gpt --cond seg.png --size 512x1024      # sliding window
  python sample.py --workdir runs/x_gpt --complete photo.png                      # keep the top half
  python sample.py --gpt converted/transformer --first_stage converted/first_stage --classes 1 --size 256x256

A grid larger than the training crop is sampled with the sliding attention window.
"""

import os
import sys
import time

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "a transformer training workdir (uses its export/)")
flags.DEFINE_string("gpt", None, "instead of --workdir: a saved GPT directory")
flags.DEFINE_string("first_stage", None, "with --gpt: the VQGAN (saved directory, or .ckpt with --first_stage_config)")
flags.DEFINE_string("first_stage_config", "", "YAML of an original first-stage .ckpt")
flags.DEFINE_enum("cond_kind", None, ["sos", "class", "coord", "segmentation", "depth"],
                  "with --gpt: the condition (default: the converter's manifest.json beside --gpt, else sos)")
flags.DEFINE_string("cond_stage", "", "with --gpt: the conditioning VQGAN (segmentation, depth)")
flags.DEFINE_string("cond_stage_config", "", "YAML of an original conditioning-stage .ckpt")
flags.DEFINE_integer("train_size", None, "with --gpt: the training crop in pixels, which sets the window "
                     "(default: the largest square window the GPT's block_size holds)")
flags.DEFINE_float("cond_drop", 0.0, "with --gpt: the cond_drop it was trained with (--cfg needs > 0)")
flags.DEFINE_string("out", None, "output folder (default: <workdir>/samples)")
flags.DEFINE_integer("n", 8, "samples (per class with --classes)", lower_bound=1)
flags.DEFINE_integer("batch", 8, "samples drawn together", lower_bound=1)
flags.DEFINE_list("classes", None, "class labels, e.g. 9,232")
flags.DEFINE_integer("top_k", None, "keep the k most likely codes")
flags.DEFINE_float("top_p", None, "nucleus sampling threshold")
flags.DEFINE_float("temperature", 1.0, "softmax temperature")
flags.DEFINE_float("cfg", 1.0, "classifier-free guidance scale (models trained with cond_drop)")
flags.DEFINE_bool("greedy", False, "argmax instead of sampling")
flags.DEFINE_string("size", None, "HxW in pixels (default: the training crop)")
flags.DEFINE_string("cond", None, "conditioning image: a label map PNG (segmentation) or depth PNG")
flags.DEFINE_string("complete", None, "an image whose top half is kept and the rest sampled")
flags.DEFINE_integer("seed", 0, "random seed")
FLAGS = flags.FLAGS


def _size(model):
    if not FLAGS.size:
        return model.train_size, model.train_size
    try:
        h, w = (int(v) for v in FLAGS.size.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--size must be HxW in pixels, e.g. 512x1024; got {FLAGS.size!r}")
    f = model.vq.downsample_factor
    if h % f or w % f:
        raise app.UsageError(f"--size {h}x{w} is not a multiple of the VQGAN's factor {f}")
    return h, w


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every save and restore at INFO: --verbosity=0 shows them
        logging.set_verbosity(logging.WARNING)
    if not FLAGS.workdir and not (FLAGS.gpt and FLAGS.first_stage):
        raise app.UsageError("give --workdir, or --gpt and --first_stage")
    parts = ("gpt", "first_stage", "first_stage_config", "cond_kind", "cond_stage", "cond_stage_config", "train_size",
             "cond_drop")
    given = [f"--{name}" for name in parts if FLAGS[name].present]
    if FLAGS.workdir and given:
        raise app.UsageError(f"{', '.join(given)} describe a model given by parts; --workdir's export/net2net.json "
                             f"already says all that")
    import jax
    import numpy as np

    from vqgan_jax.data import load_image
    from vqgan_jax.sampling.generate import condition, generate, load
    from vqgan_jax.train.logging import save_image_grid

    try:
        model = load(FLAGS.workdir, gpt_dir=FLAGS.gpt, first_stage=FLAGS.first_stage or "",
                     first_stage_config=FLAGS.first_stage_config, cond_kind=FLAGS.cond_kind,
                     cond_stage=FLAGS.cond_stage, cond_stage_config=FLAGS.cond_stage_config,
                     train_size=FLAGS.train_size, cond_drop=FLAGS.cond_drop)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e))
    # Flags the model's kind of condition has no use for would otherwise be dropped without a word.
    if FLAGS.classes and model.cond_kind != "class":
        raise app.UsageError(f"--classes is for class-conditional models; this one is {model.cond_kind}-conditioned")
    if FLAGS.cond and model.cond_kind not in ("segmentation", "depth"):
        raise app.UsageError(f"--cond is for segmentation- or depth-conditioned models; this one is "
                             f"{model.cond_kind}-conditioned")
    h, w = _size(model)
    f = model.vq.downsample_factor
    grid = (h // f, w // f)
    cond_image = given = None
    if FLAGS.cond:
        cond_image = read_condition(FLAGS.cond, model.cond_kind, (h, w))
    if FLAGS.complete:
        if h != w:
            raise app.UsageError("--complete takes square sizes (the image is center-cropped to a square)")
        try:
            image = load_image(FLAGS.complete, h)[None]
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"--complete: {e}")
        codes = np.asarray(model.vq.apply({"params": model.vq_params}, image, method=model.vq.encode)[1])
        codes[:, grid[0] // 2:] = -1  # -1: to be sampled
        given = codes
    try:
        labels = [int(c) for c in FLAGS.classes] if FLAGS.classes else [None]
    except ValueError:
        raise app.UsageError(f"--classes takes integer labels, e.g. 9,232; got {','.join(FLAGS.classes)!r}")
    jobs = [label for label in labels for _ in range(FLAGS.n)]
    out = FLAGS.out or os.path.join(FLAGS.workdir or ".", "samples")
    os.makedirs(out, exist_ok=True)
    rng = jax.random.PRNGKey(FLAGS.seed)
    images, t0 = [], time.time()
    for start in range(0, len(jobs), FLAGS.batch):
        chunk = jobs[start:start + FLAGS.batch]
        classes = np.array(chunk) if FLAGS.classes else None
        cond = condition(model, len(chunk), grid, classes=classes, cond_image=cond_image)
        batch_given = None if given is None else np.repeat(given, len(chunk), axis=0)
        x = generate(model, cond, grid, jax.random.fold_in(rng, start), given=batch_given, top_k=FLAGS.top_k,
                     top_p=FLAGS.top_p, temperature=FLAGS.temperature, greedy=FLAGS.greedy, cfg_scale=FLAGS.cfg)
        images.append(np.asarray(x))
        done = start + len(chunk)
        bar = "#" * (30 * done // len(jobs))
        sys.stderr.write(f"\r[{bar:<30}] {done}/{len(jobs)} samples, {time.time() - t0:.0f} s")
        sys.stderr.flush()
    sys.stderr.write("\n")
    images = np.concatenate(images)
    for i, image in enumerate(images):
        save_image_grid(image[None], os.path.join(out, f"sample_{i:04d}.png"), ncol=1)
    save_image_grid(images, os.path.join(out, "grid.png"), ncol=min(8, len(images)))
    print(f"wrote {len(images)} samples of {h}x{w} and grid.png to {out}")


def read_condition(path, kind, size):
    """A label map (grey PNG of class ids) -> int [1, H, W], or a depth PNG -> [1, H, W, 1] in [-1, 1], resized
    to `size` (nearest for labels)."""
    import numpy as np
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as e:
        raise app.UsageError(f"cannot read the conditioning image {path!r}: {e}")
    h, w = size
    if kind == "segmentation":
        if image.mode not in ("L", "P", "I", "I;16"):
            raise app.UsageError(f"{path!r} is not a label map (mode {image.mode}; expected grey class ids)")
        return np.asarray(image.resize((w, h), Image.NEAREST), np.int32)[None]
    depth = np.asarray(image.convert("I").resize((w, h), Image.BILINEAR), np.float32)
    scale = 65535.0 if depth.max() > 255 else 255.0
    return (2.0 * depth / scale - 1.0)[None, :, :, None]


if __name__ == "__main__":
    app.run(main)
