"""The `data` config block: its defaults and the checks every pipeline runs before touching files."""

from typing import NamedTuple

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
    # Label maps (the original's SegmentationBase / S-FLCKR): grey PNGs, value = class id. The map of image
    # <path>/<rel>/<stem>.<ext> is <segmentation_path>/<rel>/<stem>.png; batches then hold "segmentation".
    segmentation_path=None,    # folder of label maps paired with data.path's images; folder sources only
    n_labels=0,                # classes in the label maps (S-FLCKR: 182); needed with segmentation_path
    shift_segmentation=False,  # add 1 to every label first (uint8 wrap: "unlabeled" 255 becomes class 0)
    # Class labels (the original's ImageNet `class_label`, for class-conditional transformers): batches then
    # hold "label" int32 [B]. Set the one that fits the source.
    label_key=None,            # TFDS only: the integer feature holding the class ("label" for imagenet2012)
    class_folders=False,       # folder sources only: class = index of the image's top-level subfolder of
                               # data.path among them, sorted (torchvision's ImageFolder); a file list takes
                               # its entries' first path component; eval_path is numbered by data.path's classes
    # Depth maps (the original's ImageNet*WithDepth): paired with the images as label maps are, <depth_path>/
    # <rel>/<stem>.png; batches then hold "depth" float32 [B, size, size, 1] in [-1, 1], cropped and flipped
    # with the image. Grey 8/16-bit PNGs (value / dtype max), or the original's RGBA-packed float32 maps
    # (per-map min-max, as the original); see preprocess.decode_depth.
    depth_path=None,           # folder of depth maps paired with data.path's images; folder sources only
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


class Segmentation(NamedTuple):
    path: str         # data.segmentation_path
    n_labels: int     # a label >= n_labels makes the example invalid
    shift: bool       # data.shift_segmentation


def segmentation(config) -> Segmentation | None:
    """The label-map settings, or None when data.segmentation_path is unset; ValueError if they are unusable."""
    path = get(config, "segmentation_path")
    if not path:
        return None
    if source_kind(config) != "folder":
        raise ValueError(
            f"data.segmentation_path ({path}) pairs label maps with image files by their path relative to "
            f"data.path, so it needs data.path to be a folder (or a file list); the TFDS dataset "
            f"data.name={get(config, 'name')!r} has no such files")
    n_labels = get(config, "n_labels")
    # Label maps are 8-bit, so at most 256 classes can be told apart.
    if not isinstance(n_labels, int) or isinstance(n_labels, bool) or not 0 < n_labels <= 256:
        raise ValueError(f"data.segmentation_path is set, so data.n_labels must be the number of classes in the "
                         f"label maps, an int in [1, 256] (the original S-FLCKR setup uses 182); got {n_labels!r}")
    return Segmentation(str(path), n_labels, bool(get(config, "shift_segmentation")))


def _folder_only(config, field: str, value, hint: str = "") -> None:
    """ValueError unless data.path is the source: `field` works on data.path's image files and folders."""
    if source_kind(config) != "folder":
        raise ValueError(f"data.{field}={value!r} needs data.path to be a folder of images (or a file list); "
                         f"the TFDS dataset data.name={get(config, 'name')!r} has no image files{hint}")


def label_key(config) -> str | None:
    """data.label_key, the TFDS feature holding each example's class, or None; ValueError with a folder source."""
    key = get(config, "label_key")
    if not key:  # the training configs spell "unset" as "", so that an override can give a string
        return None
    if not isinstance(key, str):
        raise ValueError(f"data.label_key must be the name of a TFDS feature (e.g. 'label'), got {key!r}")
    if source_kind(config) != "tfds":
        raise ValueError(f"data.label_key={key!r} names a TFDS feature, but the source is the folder data.path="
                         f"{get(config, 'path')!r}; for folders of class subfolders set data.class_folders=True")
    return key


def class_folders(config) -> bool:
    """data.class_folders; ValueError with a TFDS source."""
    value = get(config, "class_folders")
    if not isinstance(value, bool):
        raise ValueError(f"data.class_folders must be True or False, got {value!r}")
    if value:
        _folder_only(config, "class_folders", value, "; for a TFDS class feature set data.label_key")
    return value


def depth_path(config) -> str | None:
    """data.depth_path as a str, or None; ValueError with a TFDS source."""
    path = get(config, "depth_path")
    if not path:
        return None
    _folder_only(config, "depth_path", path)
    return str(path)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; ValueError unless it divides evenly."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"the batch size {global_batch_size} must be a positive multiple of the number of "
                         f"processes ({process_count})")
    return global_batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
