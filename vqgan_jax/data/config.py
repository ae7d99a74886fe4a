"""The `data` config block: its defaults and the checks every pipeline runs before touching files."""

import ml_collections

DEFAULTS = dict(
    path=None,            # a folder of images (searched recursively), a text file of image paths, or "skimage:"
    eval_path=None,       # folder / list for eval_iterator when `path` is used; None: evaluate on `path`
    name=None,            # a TFDS dataset name ("imagenet2012", "name/config:1.0.0"), read from data_dir
    data_dir=None,        # TFDS data_dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    split="train",
    eval_split="validation",
    image_key="image",    # the TFDS feature holding the image
    size=256,             # crop size: images come out size x size
    random_crop=True,     # training crop; evaluation always crops the center
    flip=False,           # random horizontal flip, training only
    resize_method="bilinear",  # tf.image.resize method, always antialiased
    shuffle_buffer=10_000,     # TFDS only: records (still encoded) in the shuffle buffer
)


def default_config() -> ml_collections.ConfigDict:
    """A `data` ConfigDict with every field the pipelines read (path and name unset)."""
    return ml_collections.ConfigDict(dict(DEFAULTS))


def get(config, key):
    """config.key, or its default when the field is absent (configs may be partial ConfigDicts or dicts)."""
    if isinstance(config, dict):
        return config.get(key, DEFAULTS[key])
    return config.get(key, DEFAULTS[key]) if hasattr(config, "get") else getattr(config, key, DEFAULTS[key])


def source_kind(config) -> str:
    """'folder' or 'tfds'; ValueError unless exactly one of data.path and data.name is set."""
    path, name = get(config, "path"), get(config, "name")
    if bool(path) == bool(name):
        which = "both" if path else "neither"
        raise ValueError(
            f"the data config needs exactly one of data.path (a folder of images, or a text file with one "
            f"image path per line) and data.name (a TFDS dataset, read from data.data_dir); got {which} "
            f"(path={path!r}, name={name!r})")
    return "folder" if path else "tfds"


def image_size(config) -> int:
    size = get(config, "size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"data.size must be a positive int (the crop size), got {size!r}")
    return size


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; ValueError unless it divides evenly."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"the batch size {global_batch_size} must be a positive multiple of the number of "
                         f"processes ({process_count})")
    return global_batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
