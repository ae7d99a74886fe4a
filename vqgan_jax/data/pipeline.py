"""Training and evaluation iterators: source -> per-host shard -> decode/crop (tf.data) -> numpy batches.

Training stream. Each host sees an infinite stream of examples; its j-th example has the global number
`uid = j * process_count + process_index`, which is the example's position in the one global stream the
hosts share. Everything about an example is a pure function of (seed, uid):
  * folders: epoch e = j // m (m = images per host per epoch), and the file is the (j % m * process_count +
    process_index)-th entry of a permutation of all files drawn from (seed, e) by
    `tf.random.experimental.index_shuffle`, so hosts read disjoint files and each epoch is reshuffled;
  * TFDS: each host reads its own `tfds.even_splits` part; epoch e is that part shuffled by a tf.data
    shuffle buffer seeded from (seed, e);
  * the random crop and flip come from stateless ops seeded by (seed, uid).
Resuming at step k therefore starts the stream at j = k * local_batch_size: folders jump there at no cost;
TFDS starts at epoch j // m and skips j % m records of it, still encoded (read, never decoded).

Undecodable files. Each image is decoded inside its own one-element dataset whose errors are dropped and
replaced by a placeholder marked invalid, so a bad file never stops the pipeline and never shifts the
positions of the examples after it. In training batches an invalid example's row is filled with a valid
example of the same batch (the next batch's if none), so batches keep their size and the batch at a step
depends only on the examples at that step: resuming gives the same batches. `iterator.skipped` counts
the invalid examples met (a bad file counts again in every epoch that reaches it).

Label maps (data.segmentation_path, folder sources only). Each image file is paired with a label map file
by relative path; the map is resized (nearest neighbour) and cropped and flipped exactly as its image, and
batches gain "segmentation": uint8 [B, size, size] class ids. One-hot encoding is left to the model, on the
device: one-hot maps would multiply the host-to-device traffic by n_labels. An example is invalid, handled
as an undecodable image, when its label map is missing or unreadable, is not single-channel, differs from
the image in height or width, or holds a class >= data.n_labels; `skipped_reasons` counts each reason.

Depth maps (data.depth_path, folder sources only) are paired by relative path in the same way, scaled to
[-1, 1] (preprocess.decode_depth), resized like the image (antialiased bilinear) and given its crop and flip:
batches gain "depth": float32 [B, size, size, 1]. A missing or unreadable depth map, one that is neither a
grey PNG nor the original's RGBA-packed float32, or one whose height or width differs from the image's makes
the example invalid, as for label maps.

Class labels (data.label_key for TFDS, data.class_folders for folders) add "label": int32 [B]. A TFDS label
is read with its record; a folder's labels are numbered at listing time (folder.class_labels), so they are
a function of the file index and follow it through shuffling, sharding and resuming. Like every field, a
label moves with its image when an invalid row is repaired, and is 0 in masked evaluation rows.

Every batch also holds "crop": int32 [B, 4], (top, left, resized height, resized width) of each example's
window in its resized image before the flip, and "flipped": bool [B], whether that window was mirrored:
what a coordinate-conditioned model (the original's FacesHQ `coord`) needs to rebuild its positions.
"""

import collections
import logging
from typing import NamedTuple

import numpy as np

from vqgan_jax.data import config as cfg
from vqgan_jax.data import folder as folder_source
from vqgan_jax.data import preprocess
from vqgan_jax.data import tfds_source
from vqgan_jax.data._tf import graph_fn, tf

log = logging.getLogger(__name__)

_MASK63 = (1 << 63) - 1
_LOGGED_KEYS = 20  # bad files named in the log and kept in `skipped_keys`; the rest are only counted

# Why a decoded example is invalid: its `problem` (0: it is fine), and the names `skipped_reasons` counts.
_UNREADABLE, _NOT_GREY, _WRONG_SIZE, _OUT_OF_RANGE, _DEPTH_FORMAT, _DEPTH_SIZE, _NOT_8_BIT = 1, 2, 3, 4, 5, 6, 7
_PROBLEM_NAMES = {_UNREADABLE: "unreadable", _NOT_GREY: "label_map_not_grey", _WRONG_SIZE: "label_map_size",
                  _OUT_OF_RANGE: "label_out_of_range", _DEPTH_FORMAT: "depth_map_format",
                  _DEPTH_SIZE: "depth_map_size", _NOT_8_BIT: "label_map_not_8_bit"}
# Per-example fields of a batch as the iterators yield it (valid and problem only serve the repair / mask).
_OUTPUT_KEYS = ("image", "segmentation", "depth", "label", "crop", "flipped")


class _Extras(NamedTuple):
    """The optional per-example inputs a pipeline carries besides the image (see `_extras`)."""
    segmentation: cfg.Segmentation | None  # label maps (data.segmentation_path)
    depth_path: str | None                 # depth maps (data.depth_path)
    label_key: str | None                  # TFDS class feature (data.label_key)
    class_folders: bool                    # folder classes (data.class_folders)

    @property
    def labels(self) -> bool:
        """Whether batches carry class labels."""
        return self.label_key is not None or self.class_folders


def _extras(config) -> _Extras:
    """The optional inputs `config` asks for; ValueError if one does not fit the source (see config.py)."""
    return _Extras(cfg.segmentation(config), cfg.depth_path(config), cfg.label_key(config),
                   cfg.class_folders(config))


def _field_specs(size, extras) -> dict:
    """{field: (shape, numpy dtype)} of one example's per-example fields, as the iterators yield them."""
    specs = {"image": ((size, size, 3), np.float32), "crop": ((4,), np.int32), "flipped": ((), np.bool_)}
    if extras.segmentation is not None:
        specs["segmentation"] = ((size, size), np.uint8)
    if extras.depth_path is not None:
        specs["depth"] = ((size, size, 1), np.float32)
    if extras.labels:
        specs["label"] = ((), np.int32)
    return specs


def _derive_seed(seed: int, salt: int) -> int:
    """An int64 seed for one use of `seed` (file order, crops, TFDS shuffling) so the uses are unrelated."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9) & _MASK63
    x ^= x >> 31
    return (x * 0x94D049BB133111EB) & _MASK63


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    cfg.check_process(process_index, process_count)
    return process_index, process_count


def _options(ds):
    T = tf()
    options = T.data.Options()
    options.deterministic = True
    # Parallelism comes from the map/interleave workers; intra-op threads would only contend with them.
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def _blank(size, extras):
    """The fields of an invalid example: zeros (label 0, not flipped), which is what evaluation leaves in its
    masked rows."""
    T = tf()
    return {k: T.zeros(shape, dtype) for k, (shape, dtype) in _field_specs(size, extras).items()}


def _label_problem(labels, eight_bit, image, n_labels):
    """0 if labels (uint8 [H, W, C], decoded from an 8-bit file when eight_bit) can go with image (uint8
    [H', W', 3]), else its problem code (int32)."""
    T = tf()
    label_shape, image_shape = T.shape(labels), T.shape(image)
    grey = T.equal(label_shape[2], 1)
    same_size = T.reduce_all(T.equal(label_shape[:2], image_shape[:2]))
    # Checked on the whole map, not the crop: whether a file is usable must not depend on the crop drawn.
    in_range = T.reduce_max(T.cast(labels, T.int32)) < n_labels
    return T.where(~eight_bit, _NOT_8_BIT, T.where(~grey, _NOT_GREY, T.where(
        ~same_size, _WRONG_SIZE, T.where(~in_range, _OUT_OF_RANGE, 0))))


def _load_labels(path, image, segmentation):
    """(labels uint8 [H, W, 1], problem int32): the label map of `image`, or zeros when it cannot be used."""
    T = tf()
    labels, eight_bit = preprocess.decode_labels(T.io.read_file(path))
    if segmentation.shift:
        labels = preprocess.shift_labels(labels)
    problem = _label_problem(labels, eight_bit, image, segmentation.n_labels)
    # An unusable map is swapped for zeros of the image's shape so that the example still runs through the
    # same ops (its fields are blanked afterwards).
    image_shape = T.shape(image)
    labels = T.cond(T.equal(problem, 0), lambda: labels[..., :1],
                    lambda: T.zeros(T.stack([image_shape[0], image_shape[1], 1]), T.uint8))
    return labels, problem


def _load_depth(path, image):
    """(depth float32 [H, W, 1] in [-1, 1], problem int32): the depth map of `image` (uint8 [H', W', 3]), or
    zeros when it cannot be used."""
    T = tf()
    depth, usable = preprocess.decode_depth(T.io.read_file(path))
    image_shape = T.shape(image)
    same_size = T.reduce_all(T.equal(T.shape(depth)[:2], image_shape[:2]))
    problem = T.where(~usable, _DEPTH_FORMAT, T.where(~same_size, _DEPTH_SIZE, 0))
    # As for label maps: zeros of the image's shape keep an unusable example running through the same ops.
    depth = T.cond(T.equal(problem, 0), lambda: depth,
                   lambda: T.zeros(T.stack([image_shape[0], image_shape[1], 1]), T.float32))
    return depth, problem


def _decode_all(ds, size, *, train_random_crop, flip, crop_seed, method, read_files, extras):
    """{uid, data, key, index[, label_map, depth_map, label]} -> {image float32 [size, size, 3], crop int32
    [4], flipped bool, [segmentation uint8 [size, size], depth float32 [size, size, 1], label int32,] valid
    bool, problem int32, key, index}, same order.

    extras: an _Extras; label_map and depth_map hold each example's paired file paths, label its class. A
    file that cannot be read or decoded, or an unusable label or depth map, gives zeros with valid=False
    instead of an error.
    """
    T = tf()

    def load(el):
        image = preprocess.decode(T.io.read_file(el["data"]) if read_files else el["data"])
        labels = depth = None
        problem = T.constant(0, T.int32)
        if extras.segmentation is not None:
            labels, problem = _load_labels(el["label_map"], image, extras.segmentation)
        if extras.depth_path is not None:
            depth, depth_problem = _load_depth(el["depth_map"], image)
            # One reason per example: the label map's, if it has one.
            problem = T.where(T.equal(problem, 0), depth_problem, problem)
        seed = preprocess.example_seed(crop_seed, el["uid"])
        out = preprocess.crop_example(image, size, labels=labels, depth=depth, random_crop=train_random_crop,
                                      flip=flip, seed=seed, method=method)
        if extras.labels:
            out["label"] = el["label"]
        ok = T.equal(problem, 0)
        out = T.cond(ok, lambda: out, lambda: _blank(size, extras))
        return {**out, "valid": ok, "problem": problem, "key": el["key"], "index": el["index"]}

    def one(el):
        # ignore_errors inside a one-element dataset turns the error into "no element", and the
        # placeholder then takes its place; the outer stream keeps exactly one element per input.
        placeholder = {**_blank(size, extras), "valid": T.constant(False),
                       "problem": T.constant(_UNREADABLE, T.int32), "key": el["key"], "index": el["index"]}
        attempt = T.data.Dataset.from_tensors(el).map(graph_fn(load)).ignore_errors()
        return attempt.concatenate(T.data.Dataset.from_tensors(placeholder)).take(1)

    return ds.interleave(graph_fn(one), cycle_length=T.data.AUTOTUNE, block_length=1,
                         num_parallel_calls=T.data.AUTOTUNE, deterministic=True)


class _Source:
    """What the iterators need from a folder or a TFDS dataset; built by `_open`."""

    def __init__(self, kind, description, read_files, num_examples, extras):
        self.kind = kind
        self.description = description
        self.read_files = read_files    # elements hold file paths (folders) or encoded bytes (TFDS)
        self.num_examples = num_examples
        self.extras = extras


class _FolderSource(_Source):
    def __init__(self, path, extras, classes_path=None):
        """path: data.path or data.eval_path; classes_path: the folder or list whose classes number the labels
        (data.path when evaluating on data.eval_path), None for `path` itself."""
        self.files = folder_source.list_images(path)
        # label_maps[i], depth_maps[i], labels[i] belong to files[i]; None when not asked for.
        self.label_maps = self.depth_maps = self.classes = self.labels = None
        if extras.segmentation is not None:
            self.label_maps = folder_source.label_maps(path, self.files, extras.segmentation.path)
        if extras.depth_path is not None:
            self.depth_maps = folder_source.depth_maps(path, self.files, extras.depth_path)
        if extras.class_folders:
            # A list's own classes come from the files just read, rather than from reading it again.
            self.classes = folder_source.class_names(classes_path or path, None if classes_path else self.files)
            self.labels = np.asarray(folder_source.class_labels(path, self.files, self.classes), np.int32)
        # The per-file element fields beside the path, each gathered with the file's index.
        self.columns = {name: values for name, values in
                        (("label_map", self.label_maps), ("depth_map", self.depth_maps), ("label", self.labels))
                        if values is not None}
        super().__init__("folder", str(path), True, len(self.files), extras)

    def train_stream(self, seed, start, process_index, process_count, shuffle_buffer, split):
        """(stream of {uid, data: path, key, index[, label_map: path, depth_map: path, label: int32]} from host
        position `start`, images per host per epoch)."""
        del shuffle_buffer, split  # a folder has one split, and its order needs no buffer
        T = tf()
        n = len(self.files)
        per_host = n // process_count
        if per_host == 0:
            raise ValueError(f"{n} images in {self.description} cannot be shared by {process_count} processes")
        files = T.constant(self.files)
        columns = {name: T.constant(values) for name, values in self.columns.items()}
        order_seed = _derive_seed(seed, 1)

        def locate(j):
            epoch, r = j // per_host, j % per_host
            slot = r * process_count + process_index
            index = T.random.experimental.index_shuffle(slot, seed=T.stack([T.constant(order_seed, T.int64), epoch]),
                                                        max_index=T.constant(n - 1, T.int64))
            path = T.gather(files, index)
            el = {"uid": j * process_count + process_index, "data": path, "key": path, "index": index}
            return {**el, **{name: T.gather(values, index) for name, values in columns.items()}}

        stream = T.data.Dataset.range(start, 1 << 62).map(graph_fn(locate), num_parallel_calls=T.data.AUTOTUNE)
        return stream, per_host

    def eval_stream(self, process_index, process_count):
        T = tf()
        indices = np.arange(process_index, len(self.files), process_count)
        paths = [self.files[i] for i in indices]
        counts = [len(range(i, len(self.files), process_count)) for i in range(process_count)]
        if not paths:
            return None, counts
        indices = indices.astype(np.int64)  # doubles as uid: evaluation draws no random numbers
        elements = {"data": paths, "key": paths, "index": indices, "uid": indices}
        elements.update({name: [values[i] for i in indices] for name, values in self.columns.items()})
        return T.data.Dataset.from_tensor_slices(elements), counts


class _TFDSSource(_Source):
    def __init__(self, name, data_dir, image_key, extras):
        self.builder = tfds_source.load_builder(name, data_dir)
        self.image_key = image_key
        self.label_key = extras.label_key
        super().__init__("tfds", f"TFDS {name}", False, None, extras)

    def _check(self, split):
        tfds_source.check(self.builder, split, self.image_key, self.label_key)
        self.num_examples = tfds_source.num_examples(self.builder, split)

    def train_stream(self, seed, start, process_index, process_count, shuffle_buffer, split):
        """(stream of {uid, data: encoded bytes, key, index[, label: int32]} from host position `start`, records
        per host per epoch)."""
        T = tf()
        self._check(split)
        part = tfds_source.host_split(split, process_index, process_count, drop_remainder=True)
        per_host = tfds_source.num_examples(self.builder, part)
        if per_host == 0:
            raise ValueError(f"split {split!r} of {self.description} ({self.num_examples} examples) cannot be "
                             f"shared by {process_count} processes")
        records = tfds_source.encoded_records(self.builder, part, self.image_key, self.label_key)
        buffer = max(1, min(int(shuffle_buffer), per_host))
        shuffle_seed = _derive_seed(seed, 3) % (2**31 - 1)

        def epoch_records(epoch):
            # A seed per epoch: any epoch can be rebuilt on its own, which is what makes resuming cheap.
            epoch_seed = (T.constant(shuffle_seed, T.int64) + epoch * 1_000_003) % (2**31 - 1)
            return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

        first_epoch, offset = divmod(start, per_host)
        stream = T.data.Dataset.range(first_epoch, 1 << 62).flat_map(graph_fn(epoch_records)).skip(offset)
        stream = stream.enumerate(start).map(graph_fn(
            lambda j, el: {**el, "uid": j * process_count + process_index, "index": T.constant(-1, T.int64)}))
        return stream, per_host

    def eval_stream(self, process_index, process_count, split):
        T = tf()
        self._check(split)
        counts = [tfds_source.num_examples(self.builder, tfds_source.host_split(split, i, process_count, False))
                  for i in range(process_count)]
        part = tfds_source.host_split(split, process_index, process_count, drop_remainder=False)
        if counts[process_index] == 0:
            return None, counts
        ds = tfds_source.encoded_records(self.builder, part, self.image_key, self.label_key).enumerate()
        ds = ds.map(graph_fn(lambda j, el: {**el, "uid": j, "index": T.constant(-1, T.int64)}))
        return ds, counts


def _open(config, extras, eval_path=False):
    kind = cfg.source_kind(config)
    if kind == "folder":
        path, classes_path = cfg.get(config, "path"), None
        if eval_path and cfg.get(config, "eval_path"):
            # Its label and depth maps are looked up under the same folders, by path relative to eval_path;
            # its classes are numbered as the training data's, so that a label means one class in both.
            path, classes_path = cfg.get(config, "eval_path"), cfg.get(config, "path")
        return _FolderSource(path, extras, classes_path)
    return _TFDSSource(cfg.get(config, "name"), cfg.get(config, "data_dir"), cfg.get(config, "image_key"), extras)


class _Iterator:
    """Shared bookkeeping: the skipped-file count the training loop logs, and the batch fields yielded."""

    def __init__(self, source, local_batch_size, process_index, process_count, with_keys):
        self.source = source.description
        self.num_examples = source.num_examples
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.with_keys = with_keys
        self.extras = source.extras
        self.files = getattr(source, "files", None)
        self.label_maps = getattr(source, "label_maps", None)  # label_maps[i] goes with files[i]
        self.depth_maps = getattr(source, "depth_maps", None)  # so does depth_maps[i]
        self.classes = getattr(source, "classes", None)        # class names, by label (data.class_folders)
        self.skipped = 0         # invalid examples met so far by this iterator
        self.skipped_keys = []   # the first few of them: file paths, or TFDS ids
        self.skipped_reasons = collections.Counter()  # "unreadable", "label_out_of_range", ...: counts

    def _describe_unreadable(self, key, index) -> str:
        """The log line of an example whose image or paired files could not be read or decoded."""
        paired = [(what, files[index]) for what, files in (("label map", self.label_maps),
                                                           ("depth map", self.depth_maps)) if files is not None]
        if not paired:
            return f"skipping an image that cannot be read or decoded: {key}"
        for what, path in paired:
            # Only logged examples get these stat calls, so their cost is bounded.
            if not folder_source.exists(path):
                return f"skipping {key}: its {what} {path} does not exist"
        named = " or its ".join(f"{what} {path}" for what, path in paired)
        return f"skipping {key}: the image or its {named} cannot be read or decoded"

    def _describe(self, key, index, problem) -> str:
        """The log line of one skipped example."""
        if problem == _UNREADABLE:
            return self._describe_unreadable(key, index)
        if problem == _DEPTH_FORMAT:
            return (f"skipping {key}: its depth map {self.depth_maps[index]} is neither a grey 8/16-bit PNG nor "
                    f"an RGBA PNG packing finite float32 depths")
        if problem == _DEPTH_SIZE:
            return f"skipping {key}: its depth map {self.depth_maps[index]} differs from the image in height or width"
        label_map = self.label_maps[index]
        if problem == _NOT_GREY:
            return f"skipping {key}: its label map {label_map} is not a single-channel (grey) image"
        if problem == _NOT_8_BIT:
            return f"skipping {key}: its label map {label_map} is not an 8-bit PNG (class ids must be 8-bit grey values)"
        if problem == _WRONG_SIZE:
            return f"skipping {key}: its label map {label_map} differs from the image in height or width"
        return f"skipping {key}: its label map {label_map} holds a class >= data.n_labels"

    def _record_skips(self, batch, invalid) -> None:
        """Counts the examples of `batch` marked by the bool mask `invalid`, logging the first few."""
        for key, index, problem in zip(batch["key"][invalid], batch["index"][invalid], batch["problem"][invalid]):
            self.skipped += 1
            self.skipped_reasons[_PROBLEM_NAMES[int(problem)]] += 1
            key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            if len(self.skipped_keys) < _LOGGED_KEYS:
                self.skipped_keys.append(key)
                log.warning("%s", self._describe(key, int(index), int(problem)))
                if len(self.skipped_keys) == _LOGGED_KEYS:
                    log.warning("further invalid examples are only counted (iterator.skipped)")

    @property
    def stats(self) -> dict:
        return {"skipped": self.skipped}

    def _output(self, batch):
        out = {k: batch[k] for k in _OUTPUT_KEYS if k in batch}
        if self.with_keys:
            out["key"], out["index"] = batch["key"], batch["index"]
        return out

    def __iter__(self):
        return self


class TrainIterator(_Iterator):
    """Infinite iterator of {"image": float32 [local_batch_size, size, size, 3] in [-1, 1], "crop": int32
    [local_batch_size, 4], "flipped": bool [local_batch_size]}, plus "segmentation": uint8
    [local_batch_size, size, size] with data.segmentation_path, "depth": float32 [local_batch_size, size,
    size, 1] in [-1, 1] with data.depth_path, and "label": int32 [local_batch_size] with data.label_key or
    data.class_folders (see the module docstring).

    With with_keys=True batches also hold "key" (bytes [B_local]: file path or TFDS id) and "index"
    (int64 [B_local]: the file's index in `files` for folders, -1 for TFDS), to check sharding and order;
    prefetch_to_device leaves those on the host.

    Attributes: step (the step of the next batch), skipped, skipped_keys, skipped_reasons, stats,
    num_examples, examples_per_epoch (over all hosts), local_batch_size, and for folder sources files,
    label_maps, depth_maps (None unless asked for) and classes (the class names by label with
    data.class_folders, else None).
    """

    def __init__(self, ds, source, *, local_batch_size, start_step, per_host, process_index, process_count,
                 with_keys):
        super().__init__(source, local_batch_size, process_index, process_count, with_keys)
        self.step = start_step
        self.examples_per_epoch = per_host * process_count
        self._per_host = per_host
        self._batches = ds.as_numpy_iterator()
        self._ahead = collections.deque()  # batches read early to repair an all-bad batch

    def _pull(self):
        return self._ahead.popleft() if self._ahead else next(self._batches)

    def _lookahead(self):
        yield from list(self._ahead)
        while True:
            batch = next(self._batches)
            self._ahead.append(batch)
            yield batch

    def _repair(self, batch):
        """Fills the rows of invalid examples with valid ones, every field together; counts the skips."""
        valid = batch["valid"]
        self._record_skips(batch, ~valid)
        rows = [k for k in batch if k not in ("valid", "problem")]
        donors = {k: batch[k][valid] for k in rows}
        if not valid.any():
            # Files come in random order, so a long run of failures means (nearly) all files are bad; the
            # limit also bounds the batches held in _ahead.
            limit = min(self._per_host, max(16 * self.local_batch_size, 256)) + self.local_batch_size
            seen = len(valid)
            for later in self._lookahead():
                if later["valid"].any():
                    donors = {k: later[k][later["valid"]] for k in rows}
                    break
                seen += len(later["valid"])
                if seen >= limit:
                    raise RuntimeError(f"no image of {self.source} could be decoded in {seen} consecutive "
                                       f"examples; first failures: {self.skipped_keys[:5]}")
        bad = np.flatnonzero(~valid)
        pick = np.arange(len(bad)) % len(donors["image"])
        batch = {k: np.array(batch[k]) for k in rows}
        for k in batch:
            batch[k][bad] = donors[k][pick]
        return batch

    def __next__(self):
        batch = self._pull()
        if not batch["valid"].all():
            batch = self._repair(batch)
        self.step += 1
        return self._output(batch)

    @property
    def stats(self) -> dict:
        return {"skipped": self.skipped, "step": self.step}


class EvalIterator(_Iterator):
    """One pass over the evaluation data: {"image": float32 [B_local, size, size, 3], "crop": int32
    [B_local, 4], "flipped": bool [B_local] (all False), "mask": bool [B_local]}, plus "segmentation": uint8
    [B_local, size, size], "depth": float32 [B_local, size, size, 1] and "label": int32 [B_local] as in
    TrainIterator.

    Every batch has the full local size. `mask` is False for padding (the last batch, and on hosts with
    fewer examples whole trailing batches, so that all hosts yield `len(iterator)` batches) and for
    invalid examples (undecodable images, unusable label or depth maps); those rows are zeros (label 0) and
    must be left out of metrics. `skipped` counts the invalid ones.
    """

    def __init__(self, ds, source, *, local_batch_size, num_batches, size, process_index, process_count,
                 with_keys):
        super().__init__(source, local_batch_size, process_index, process_count, with_keys)
        self.num_batches = num_batches
        self.size = size
        self._done = 0
        self._batches = ds.as_numpy_iterator() if ds is not None else iter(())

    def __len__(self):
        return self.num_batches

    def _padding(self):
        """A batch of local_batch_size rows that are all padding: zeros, valid False."""
        b = self.local_batch_size
        rows = {k: np.zeros((b, *shape), dtype) for k, (shape, dtype) in _field_specs(self.size, self.extras).items()}
        return {**rows, "valid": np.zeros((b,), bool), "key": np.full((b,), b"", object),
                "index": np.full((b,), -1, np.int64)}

    def __next__(self):
        if self._done >= self.num_batches:
            raise StopIteration
        self._done += 1
        batch = next(self._batches, None)
        n = 0 if batch is None else len(batch["valid"])
        if batch is not None and not batch["valid"].all():
            self._record_skips(batch, ~batch["valid"])
        if n == self.local_batch_size:
            full = batch
        else:
            full = self._padding()
            for k in full if batch is not None else ():
                full[k][:n] = batch[k]
        out = self._output(full)
        out["mask"] = full["valid"]
        return out


def train_iterator(config, global_batch_size: int, seed: int = 0, start_step: int = 0, *,
                   process_index: int | None = None, process_count: int | None = None,
                   with_keys: bool = False) -> TrainIterator:
    """The training stream for `config` (the `data` ConfigDict), from batch `start_step` on.

    Yields {"image": float32 [global_batch_size // process_count, size, size, 3] in [-1, 1], "crop",
    "flipped"[, "segmentation", "depth", "label"]} forever (see TrainIterator): random crop (or center crop if
    data.random_crop is False) and optional flip. The batches are a
    function of (config, seed, process_index, process_count, step) alone: start_step=k yields what an
    iterator started at 0 yields from its k-th batch on. process_index / process_count default to JAX's.
    """
    size = cfg.image_size(config)
    process_index, process_count = _process(process_index, process_count)
    local = cfg.local_batch_size(global_batch_size, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    method = cfg.get(config, "resize_method")
    if method not in preprocess.RESIZE_METHODS:
        raise ValueError(f"data.resize_method {method!r} is not one of {preprocess.RESIZE_METHODS}")
    extras = _extras(config)
    source = _open(config, extras)
    T = tf()
    start = start_step * local
    stream, per_host = source.train_stream(seed, start, process_index, process_count,
                                           cfg.get(config, "shuffle_buffer"), cfg.get(config, "split"))
    ds = _decode_all(stream, size, train_random_crop=bool(cfg.get(config, "random_crop")),
                     flip=bool(cfg.get(config, "flip")), crop_seed=_derive_seed(seed, 2), method=method,
                     read_files=source.read_files, extras=extras)
    ds = _options(ds.batch(local, drop_remainder=True).prefetch(T.data.AUTOTUNE))
    return TrainIterator(ds, source, local_batch_size=local, start_step=start_step, per_host=per_host,
                         process_index=process_index, process_count=process_count, with_keys=with_keys)


def eval_iterator(config, batch_size: int, split: str | None = None, *, process_index: int | None = None,
                  process_count: int | None = None, with_keys: bool = False) -> EvalIterator:
    """One pass over the evaluation data: center crops, no flip, in a fixed order.

    batch_size is global, like train_iterator's: each host yields batch_size // process_count rows per
    batch, padded at the end and marked by "mask" (see EvalIterator). TFDS reads `split` (default
    data.eval_split); folder sources read data.eval_path, or data.path when that is unset, and ignore
    `split`. With data.eval_path, label and depth maps are looked up under data.segmentation_path and
    data.depth_path by the image's path relative to data.eval_path, and data.class_folders numbers its class
    folders by data.path's class list (ValueError for a class that data.path lacks).
    """
    size = cfg.image_size(config)
    process_index, process_count = _process(process_index, process_count)
    local = cfg.local_batch_size(batch_size, process_count)
    method = cfg.get(config, "resize_method")
    extras = _extras(config)
    source = _open(config, extras, eval_path=True)
    T = tf()
    if source.kind == "folder":
        stream, counts = source.eval_stream(process_index, process_count)
    else:
        stream, counts = source.eval_stream(process_index, process_count, split or cfg.get(config, "eval_split"))
    num_batches = -(-max(counts) // local)
    ds = None
    if stream is not None:
        ds = _decode_all(stream, size, train_random_crop=False, flip=False, crop_seed=0, method=method,
                         read_files=source.read_files, extras=extras)
        ds = _options(ds.batch(local).prefetch(T.data.AUTOTUNE))
    return EvalIterator(ds, source, local_batch_size=local, num_batches=num_batches, size=size,
                        process_index=process_index, process_count=process_count, with_keys=with_keys)
