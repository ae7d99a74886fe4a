"""TFDS datasets by name, read from a local data_dir that already holds the prepared data. Never downloads.

We locate the prepared files ourselves (data_dir/name[/config]/version/dataset_info.json) before asking TFDS
for anything, so a missing dataset fails in milliseconds, with the command that prepares it, instead of
TFDS trying to generate or fetch it. `tfds.builder_from_directory` then reads it without the dataset's
builder code, so private datasets prepared elsewhere work too.
"""

import os
import re

from vqgan_jax.data._tf import graph_fn, tf

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _fs(path):
    """(exists, listdir) for local paths without importing TF, and through tf.io.gfile for remote ones."""
    if "://" in path:
        gfile = tf().io.gfile
        return gfile.exists, lambda p: [n.rstrip("/") for n in gfile.listdir(p)]
    return os.path.exists, os.listdir


def _version_key(v: str):
    return tuple(int(x) for x in v.split("."))


def _how_to_prepare(dataset: str, data_dir: str) -> str:
    return (f"This pipeline never downloads. Prepare the dataset first, e.g.\n"
            f"  tfds build {dataset} --data_dir={data_dir}\n"
            f"(datasets you must download by hand, such as imagenet2012, also need --manual_dir=FOLDER_WITH_THE_"
            f"ARCHIVES), or in Python:\n"
            f"  tfds.builder({dataset!r}, data_dir={data_dir!r}).download_and_prepare(\n"
            f"      download_config=tfds.download.DownloadConfig(manual_dir=...))")


def find_prepared(name: str, data_dir: str | None = None) -> str:
    """"name", "name/config", "name:1.2.0" or "name/config:1.2.0" -> the folder holding its dataset_info.json.

    Takes the newest prepared version unless one is named. FileNotFoundError, saying how to prepare the
    data, if it is not there.
    """
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    exists, listdir = _fs(data_dir)
    dataset, _, version = name.partition(":")
    if not exists(data_dir):
        raise FileNotFoundError(f"TFDS data_dir {data_dir} does not exist, so dataset {name!r} cannot be read. "
                                + _how_to_prepare(dataset, data_dir))
    root = os.path.join(data_dir, dataset)
    if not exists(root):
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {data_dir} (no folder {root}). "
                                + _how_to_prepare(dataset, data_dir))
    versions = [v for v in listdir(root) if _VERSION.match(v)]
    if not versions and "/" not in dataset:
        # A dataset with builder configs keeps them one level down: name/config/version.
        configs = [c for c in listdir(root)
                   if any(_VERSION.match(v) for v in _safe_listdir(listdir, os.path.join(root, c)))]
        if len(configs) > 1:
            raise ValueError(f"TFDS dataset {dataset!r} has several prepared configs in {data_dir}: "
                             f"{sorted(configs)}; name one as data.name='{dataset}/CONFIG'")
        if configs:
            root = os.path.join(root, configs[0])
            versions = [v for v in listdir(root) if _VERSION.match(v)]
    if version:
        versions = [v for v in versions if v == version]
    versions = [v for v in versions if exists(os.path.join(root, v, "dataset_info.json"))]
    if not versions:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not (completely) prepared in {data_dir}: no "
                                f"{root}/{version or '<version>'}/dataset_info.json. "
                                + _how_to_prepare(dataset, data_dir))
    return os.path.join(root, max(versions, key=_version_key))


def _safe_listdir(listdir, path):
    try:
        return listdir(path)
    except (NotADirectoryError, OSError):
        return []


def load_builder(name: str, data_dir: str | None = None):
    """The read-only TFDS builder of a prepared dataset (see `find_prepared`)."""
    builder_dir = find_prepared(name, data_dir)
    tf()  # hides the GPUs before TFDS initialises TF
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(builder_dir)


def check(builder, split: str, image_key: str, label_key: str | None = None) -> None:
    """ValueError naming the alternatives if `split`, `image_key` or `label_key` is not in the dataset, or if
    `label_key` is not an integer scalar (a class)."""
    try:
        builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise ValueError(f"TFDS dataset {builder.name!r} has no split {split!r} ({e}); its splits are "
                         f"{sorted(builder.info.splits.keys())}") from None
    features = builder.info.features
    if image_key not in features:
        raise ValueError(f"TFDS dataset {builder.name!r} has no feature {image_key!r} (data.image_key); its "
                         f"features are {sorted(features.keys())}")
    if label_key is None:
        return
    if label_key not in features:
        raise ValueError(f"TFDS dataset {builder.name!r} has no feature {label_key!r} (data.label_key); its "
                         f"features are {sorted(features.keys())}")
    feature = features[label_key]
    if tuple(feature.shape) != () or not tf().as_dtype(feature.dtype).is_integer:
        raise ValueError(f"data.label_key={label_key!r} must name an integer scalar feature (a class) of TFDS "
                         f"dataset {builder.name!r}; it is {type(feature).__name__} of shape {feature.shape} "
                         f"and dtype {feature.dtype}")


def host_split(split: str, process_index: int, process_count: int, drop_remainder: bool):
    """This host's disjoint part of `split`; with drop_remainder every host gets the same count."""
    if process_count == 1:
        return split
    import tensorflow_datasets as tfds

    return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]


def num_examples(builder, split) -> int:
    return builder.info.splits[split].num_examples


def encoded_records(builder, split, image_key: str, label_key: str | None = None):
    """tf.data.Dataset of {"data": encoded image bytes, "key": tfds_id string[, "label": int32 class]}, in the
    split's fixed order; "label" is feature `label_key`, when given.

    Images stay encoded (SkipDecoding) so that shuffling, skipping on resume and dropping undecodable
    records all happen before any pixel is decoded.
    """
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    T = tf()

    def select(ex):
        record = {"data": ex[image_key], "key": ex["tfds_id"]}
        if label_key is not None:
            record["label"] = T.cast(ex[label_key], T.int32)
        return record

    return ds.map(graph_fn(select))
