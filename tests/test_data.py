"""The input pipeline on small synthetic images written to tmp_path (no network, no shared data)."""

import gc
import importlib.util
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

_TF_PRELOADED = "tensorflow" in sys.modules  # e.g. by another test module, when the whole suite runs
from vqgan_jax import data  # noqa: E402

_TF_IMPORTED_BY_DATA = not _TF_PRELOADED and "tensorflow" in sys.modules

SIZE = 16


def _smooth_image(h, w, seed):
    """A smooth, asymmetric RGB image: resizing it is well conditioned, and a wrong crop shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(0.5, 2.0, 3)
        channels.append(127.5 + 60 * np.sin(a * x / w * np.pi + c) + 60 * np.cos(b * y / h * np.pi))
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _save(path, array, fmt=None, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, fmt)
    return str(path)


def _write_good(folder, n, start=0):
    """n decodable JPEG/PNG images of assorted sizes (all at least SIZE on the short side after resize)."""
    paths = []
    for i in range(start, start + n):
        h, w = 20 + 3 * (i % 5), 24 + 5 * (i % 3)
        ext = ("jpg", "png")[i % 2]
        paths.append(_save(os.path.join(folder, f"img{i:03d}.{ext}"), _smooth_image(h, w, i)))
    return paths


def _write_bad(folder):
    """Files with image extensions that cannot be decoded: corrupt, truncated JPEG and PNG, text, empty."""
    good_jpeg = _save(os.path.join(folder, "tmp_src.jpg"), _smooth_image(40, 40, 99))
    good_png = _save(os.path.join(folder, "tmp_src.png"), _smooth_image(40, 40, 98))
    jpeg_bytes, png_bytes = open(good_jpeg, "rb").read(), open(good_png, "rb").read()
    os.remove(good_jpeg)
    os.remove(good_png)
    bad = {
        "corrupt.jpg": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "truncated.jpg": jpeg_bytes[: len(jpeg_bytes) // 2],
        "truncated.png": png_bytes[: len(png_bytes) // 2],
        "really_text.jpg": b"this is not an image\n",
        "empty.png": b"",
    }
    paths = []
    for name, content in bad.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(content)
        paths.append(path)
    return paths


def _config(**kw):
    c = data.default_config()
    c.size = SIZE
    c.update(kw)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 good images, flat."""
    root = tmp_path_factory.mktemp("flat")
    return str(root), _write_good(str(root), 10)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """8 good images and 5 undecodable ones."""
    root = str(tmp_path_factory.mktemp("mixed"))
    return root, _write_good(root, 8), _write_bad(root)


# --- sources ---------------------------------------------------------------------------------------------

def test_import_does_not_import_tensorflow():
    if not _TF_PRELOADED:
        assert not _TF_IMPORTED_BY_DATA, "importing vqgan_jax.data imported tensorflow"
        return
    # Someone imported TF before us: check in a fresh interpreter instead.
    code = "import sys, vqgan_jax.data; assert 'tensorflow' not in sys.modules, 'tensorflow imported eagerly'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})


def test_folder_recursion_and_extensions(tmp_path):
    img = _smooth_image(20, 20, 0)
    expected = [
        _save(tmp_path / "a.jpg", img), _save(tmp_path / "b.JPEG", img, "JPEG"),
        _save(tmp_path / "sub" / "c.png", img), _save(tmp_path / "sub" / "deeper" / "d.webp", img, "WEBP"),
        _save(tmp_path / "sub" / "e.bmp", img, "BMP"), _save(tmp_path / "f.gif", img, "GIF"),
        _save(tmp_path / "g.jpeg", img, "JPEG"),
    ]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "array.npy").write_bytes(b"\x93NUMPY")
    assert data.list_images(str(tmp_path)) == sorted(expected)
    # Every format decodes: one epoch meets each file once and skips none.
    it = data.train_iterator(_config(path=str(tmp_path)), global_batch_size=7, process_count=1,
                             process_index=0, with_keys=True)
    batch = next(it)
    assert sorted(k.decode() for k in batch["key"]) == sorted(expected)
    assert it.skipped == 0


def test_file_list_resolves_relative_paths(tmp_path, folder):
    root, paths = folder
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    rel = [os.path.relpath(p, lst.parent) for p in paths[:4]]
    lst.write_text("# comment\n" + "\n".join(rel) + "\n\n" + paths[4] + "\n")
    # The iterators read exactly these paths (the listing is all a folder source adds).
    assert [os.path.realpath(p) for p in data.list_images(str(lst))] == [os.path.realpath(p) for p in paths[:5]]


def test_skimage_photos_for_the_demo():
    if importlib.util.find_spec("skimage") is None:  # find_spec: importing skimage would cost seconds
        pytest.skip("scikit-image is not installed")
    files = data.list_images("skimage:")
    assert files and all(f.lower().endswith(data.IMAGE_EXTENSIONS) for f in files)
    assert [os.path.basename(f) for f in data.list_images("skimage:astronaut.png,coffee.png")] == \
        ["astronaut.png", "coffee.png"]


# --- preprocessing ---------------------------------------------------------------------------------------

def _pil_reference(array, size):
    """The original's preprocessing with PIL: smaller side -> size (antialiased bilinear), center crop."""
    h, w = array.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.asarray(Image.fromarray(array).resize((nw, nh), Image.BILINEAR), np.float64)
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top:top + size, left:left + size]


def test_center_crop_matches_pil(tmp_path):
    size = 24
    shapes = {"a_landscape.png": (45, 70), "b_portrait.png": (90, 33), "c_upscaled.png": (12, 10)}
    arrays = {name: _smooth_image(*shape, seed=sum(shape)) for name, shape in shapes.items()}
    paths = [_save(tmp_path / name, array) for name, array in arrays.items()]
    ev = data.eval_iterator(_config(path=str(tmp_path), size=size), batch_size=3, process_index=0,
                            process_count=1)
    (batch,) = list(ev)
    assert batch["mask"].all()
    for i, (name, array) in enumerate(arrays.items()):
        ref = _pil_reference(array, size)
        got = (batch["image"][i].astype(np.float64) + 1.0) * 127.5
        assert np.abs(got - ref).max() <= 3.0, (name, np.abs(got - ref).max())
        assert np.abs(got - ref).mean() <= 1.0, name
    # load_image is the same function, for single images outside the pipeline.
    np.testing.assert_array_equal(data.load_image(paths[0], size), batch["image"][0])


def test_random_crop_reaches_every_offset():
    from vqgan_jax.data.preprocess import random_crop_offsets

    seen = {tuple(int(v) for v in random_crop_offsets(11, 12, 10, np.array([s, 7], np.int64))) for s in range(64)}
    assert seen == {(top, left) for top in range(2) for left in range(3)}


def test_grey_and_rgba_become_rgb(tmp_path):
    rgb = _smooth_image(SIZE, SIZE, 5)
    grey = _save(tmp_path / "grey.png", rgb, mode="L")
    rgba = np.concatenate([rgb, np.full((SIZE, SIZE, 1), 7, np.uint8)], -1)
    rgba_path = _save(tmp_path / "rgba.png", rgba)
    g = data.load_image(grey, SIZE)
    assert g.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(g[..., 0], g[..., 1])
    np.testing.assert_array_equal(g[..., 0], g[..., 2])
    # Alpha is dropped (as PIL's convert("RGB")); no resize happens at this size, so values are exact.
    np.testing.assert_array_equal(data.load_image(rgba_path, SIZE), rgb.astype(np.float32) / 127.5 - 1.0)


# --- undecodable files -----------------------------------------------------------------------------------

def test_undecodable_files_skipped_and_counted(mixed):
    root, good, bad = mixed
    n = len(good) + len(bad)
    # One batch is exactly one epoch, so each file is met once per batch.
    it = data.train_iterator(_config(path=root), global_batch_size=n, process_index=0, process_count=1,
                             with_keys=True)
    assert it.num_examples == n
    batch = next(it)
    assert it.skipped == len(bad) and it.stats["skipped"] == len(bad)
    assert sorted(it.skipped_keys) == sorted(bad)
    keys = {k.decode() for k in batch["key"]}
    assert keys == set(good)  # bad rows were filled with good examples of the same batch
    assert batch["image"].shape == (n, SIZE, SIZE, 3) and np.isfinite(batch["image"]).all()
    next(it)
    assert it.skipped == 2 * len(bad)  # counted again in every epoch

    ev = data.eval_iterator(_config(path=root), batch_size=4, process_index=0, process_count=1,
                            with_keys=True)
    batches = list(ev)
    assert len(batches) == len(ev) == -(-n // 4)
    mask = np.concatenate([b["mask"] for b in batches])
    keys = np.concatenate([b["key"] for b in batches])
    assert {k.decode() for k in keys[mask]} == set(good)
    assert ev.skipped == len(bad)
    images = np.concatenate([b["image"] for b in batches])
    assert (images[~mask] == 0).all()


def test_all_undecodable_raises(tmp_path):
    _write_bad(str(tmp_path))
    it = data.train_iterator(_config(path=str(tmp_path)), global_batch_size=2, process_index=0,
                             process_count=1)
    with pytest.raises(RuntimeError, match="could be decoded"):
        next(it)


# --- order, resume, sharding -----------------------------------------------------------------------------

def _check_images(x, batch_size):
    assert x.shape == (batch_size, SIZE, SIZE, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    levels = (x + 1.0) * 127.5  # the original's uint8 grid
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)


def test_deterministic_for_a_seed_and_reshuffled_per_epoch(folder):
    root, paths = folder
    c = _config(path=root, flip=True)
    kw = dict(global_batch_size=5, process_index=0, process_count=1, with_keys=True)
    its = [data.train_iterator(c, seed=7, **kw) for _ in range(2)]
    a, b = (_take(it, 4) for it in its)
    assert its[0].step == 4
    for x, y in zip(a, b):
        assert set(x) == {"image", "crop", "flipped", "key", "index"}
        _check_images(x["image"], 5)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["key"], y["key"])
    keys = np.concatenate([x["key"] for x in a])
    epoch0, epoch1 = keys[:10], keys[10:20]
    assert sorted(epoch0) == sorted(epoch1) == sorted(p.encode() for p in paths)
    assert list(epoch0) != list(epoch1)
    np.testing.assert_array_equal(np.concatenate([x["index"] for x in a]),
                                  [paths.index(k.decode()) for k in keys])
    other = data.train_iterator(c, seed=8, **kw)
    assert not np.array_equal(np.concatenate([x["key"] for x in _take(other, 2)]), keys[:10])
    # Without with_keys (and without label maps) the batch is exactly these per-example arrays.
    plain = data.train_iterator(c, seed=7, **{**kw, "with_keys": False})
    batch = next(plain)
    assert set(batch) == {"image", "crop", "flipped"}
    assert batch["crop"].shape == (5, 4) and batch["crop"].dtype == np.int32
    assert batch["flipped"].shape == (5,) and batch["flipped"].dtype == bool
    np.testing.assert_array_equal(batch["image"], a[0]["image"])


def test_two_hosts_read_disjoint_shards(folder):
    root, paths = folder
    c = _config(path=root)
    per_host, local = len(paths) // 2, 2
    epoch_keys = []
    batches = {}
    for host in (0, 1):
        it = data.train_iterator(c, global_batch_size=2 * local, seed=3, process_index=host, process_count=2,
                                 with_keys=True)
        assert it.local_batch_size == local
        batches[host] = _take(it, 2 * per_host // local)  # two epochs
        keys = np.concatenate([b["key"] for b in batches[host]])
        assert all(b["image"].shape == (local, SIZE, SIZE, 3) for b in batches[host])
        epoch_keys.append((set(keys[:per_host]), set(keys[per_host:])))
    for epoch in (0, 1):
        a, b = epoch_keys[0][epoch], epoch_keys[1][epoch]
        assert len(a) == len(b) == per_host and not a & b
        assert a | b == {p.encode() for p in paths}
    # Crops differ between hosts even for the same file: each example has its own global number.
    assert not np.array_equal(batches[0][0]["image"], batches[1][0]["image"])
    # A host resumed at step 3 goes on with its own 4th batch (the second epoch's).
    resumed = data.train_iterator(c, global_batch_size=2 * local, seed=3, process_index=1, process_count=2,
                                  start_step=3, with_keys=True)
    first = next(iter(resumed))
    np.testing.assert_array_equal(first["key"], batches[1][3]["key"])
    np.testing.assert_array_equal(first["image"], batches[1][3]["image"])

    # Evaluation: disjoint, complete, the same number of batches on both hosts.
    evs = [data.eval_iterator(c, batch_size=4, process_index=h, process_count=2, with_keys=True) for h in (0, 1)]
    assert len(evs[0]) == len(evs[1])
    seen = [np.concatenate([b["key"][b["mask"]] for b in ev]) for ev in evs]
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {p.encode() for p in paths}
    # Three hosts hold 4, 3 and 3 of the 10 files: each yields the longest one's 4 batches of 1 (collectives
    # in the eval step need every host there), the others padded.
    evs = [list(data.eval_iterator(c, batch_size=3, process_index=h, process_count=3, with_keys=True))
           for h in range(3)]
    assert [len(ev) for ev in evs] == [4, 4, 4]
    seen = np.concatenate([b["key"][b["mask"]] for ev in evs for b in ev])
    assert sorted(seen) == sorted(p.encode() for p in paths)


def test_eval_pads_last_batch_with_mask(folder):
    root, paths = folder
    # eval_path takes precedence over path.
    c = _config(path="/nonexistent", eval_path=root)
    ev = data.eval_iterator(c, batch_size=4, process_index=0, process_count=1, with_keys=True)
    batches = list(ev)
    assert len(batches) == len(ev) == 3
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]
    for b in batches:
        _check_images(b["image"][b["mask"]], b["mask"].sum())
    assert batches[-1]["image"].shape == (4, SIZE, SIZE, 3) and (batches[-1]["image"][2:] == 0).all()
    assert [k.decode() for b in batches for k in b["key"][b["mask"]]] == sorted(paths)  # fixed order


# --- errors ----------------------------------------------------------------------------------------------

def test_config_errors(tmp_path, folder):
    kw = dict(global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="exactly one of data.path"):
        data.train_iterator(_config(), **kw)
    with pytest.raises(ValueError, match="exactly one of data.path"):
        data.train_iterator(_config(path=folder[0], name="mnist"), **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.train_iterator(_config(path=str(tmp_path / "missing")), **kw)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        data.train_iterator(_config(path=str(tmp_path / "empty")), **kw)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        data.train_iterator(_config(path=folder[0]), global_batch_size=3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        data.train_iterator(_config(path=folder[0]), global_batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="data.size"):
        data.train_iterator(_config(path=folder[0], size=0), **kw)
    listed = tmp_path / "bad_list.txt"
    listed.write_text("nowhere/a.jpg\nnowhere/b.jpg\n")
    with pytest.raises(FileNotFoundError, match="resolved against"):
        data.train_iterator(_config(path=str(listed)), **kw)


def test_missing_tfds_dataset_fails_fast(tmp_path):
    kw = dict(global_batch_size=2, process_index=0, process_count=1)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="tfds build imagenet2012 --data_dir="):
        data.train_iterator(_config(name="imagenet2012", data_dir=str(tmp_path)), **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.eval_iterator(_config(name="imagenet2012", data_dir=str(tmp_path / "nope")), batch_size=2,
                           process_index=0, process_count=1)
    assert time.perf_counter() - start < 5.0


# --- TFDS ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny generator-based TFDS dataset (12 train, 5 validation images), prepared offline."""
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds.disable_progress_bar()

    class VqganJaxTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12, 0), "validation": self._generate_examples(5, 100)}

        def _generate_examples(self, n, offset):
            for i in range(n):
                yield i, {"picture": _smooth_image(20 + i, 30, offset + i), "label": i % 3}

    root = str(tmp_path_factory.mktemp("tfds"))
    VqganJaxTinyImages(data_dir=root).download_and_prepare()
    return root


def test_tfds_by_name(tfds_dir):
    c = _config(name="vqgan_jax_tiny_images", data_dir=tfds_dir, image_key="picture", flip=True)
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1, with_keys=True)
    it = data.train_iterator(c, **kw)
    assert it.num_examples == 12
    full = _take(it, 8)  # crosses two epochs of 12
    assert full[0]["image"].shape == (4, SIZE, SIZE, 3) and full[0]["image"].dtype == np.float32
    keys = np.concatenate([b["key"] for b in full])
    assert len(set(keys[:12])) == 12 and set(keys[:12]) == set(keys[12:24])
    assert list(keys[:12]) != list(keys[12:24])  # reshuffled per epoch
    resumed = data.train_iterator(c, start_step=5, **kw)
    for want in full[5:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["key"], want["key"])

    ev = data.eval_iterator(c, batch_size=2, process_index=0, process_count=1)  # data.eval_split
    batches = list(ev)
    assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 5

    hosts = [np.concatenate([b["key"] for b in _take(
        data.train_iterator(c, global_batch_size=4, seed=2, process_index=h, process_count=2, with_keys=True), 3)])
        for h in (0, 1)]
    assert not set(hosts[0]) & set(hosts[1])
    assert len(set(hosts[0]) | set(hosts[1])) == 12


def test_tfds_bad_split_and_key(tfds_dir):
    kw = dict(global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no split 'test'"):
        data.train_iterator(_config(name="vqgan_jax_tiny_images", data_dir=tfds_dir, image_key="picture",
                                    split="test"), **kw)
    with pytest.raises(ValueError, match="no feature 'image'"):
        data.train_iterator(_config(name="vqgan_jax_tiny_images", data_dir=tfds_dir), **kw)


# --- label maps and crop windows -------------------------------------------------------------------------

N_LABELS = 50
SFLCKR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "sflckr")


def _write_pair(images, label_maps, rel, image, labels, mode=None):
    """image at <images>/<rel>, and unless labels is None its label map at <label_maps>/<rel stem>.png."""
    path = _save(os.path.join(images, rel), image)
    if labels is not None:
        _save(os.path.join(label_maps, os.path.splitext(rel)[0] + ".png"), labels, mode=mode)
    return path


def _seg_config(images, label_maps, **kw):
    return _config(path=str(images), segmentation_path=str(label_maps), **{"n_labels": N_LABELS, **kw})


def _constant(h, w, value, channels=3):
    return np.full((h, w, channels) if channels else (h, w), value, np.uint8)


def _levels(image):
    """float32 [..., 3] in [-1, 1] -> the uint8 levels it was made from, as float64."""
    return (image.astype(np.float64) + 1.0) * 127.5


def _position_image(h, w, step):
    """RGB whose red is step * column and green step * row: a crop's pixels tell where they came from."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([step * x, step * y, np.zeros_like(x)], -1).astype(np.uint8)


def _segmentation_batches(config, n, seeds, batch_size=2):
    for seed in seeds:
        it = data.train_iterator(config, global_batch_size=batch_size, seed=seed, process_index=0,
                                 process_count=1, with_keys=True)
        yield from _take(it, n)


def test_label_maps_paired_by_relative_path(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    # File i is a constant colour 20 * i with the constant class i, so every row shows which files it read.
    rels = ["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.JPEG", "sub/e.png"]
    paths = [_write_pair(images, maps, rel, _constant(SIZE, SIZE + 4, 20 * i), _constant(SIZE, SIZE + 4, i, 0))
             for i, rel in enumerate(rels)]
    assert data.folder.label_map_path(paths[3], str(images), str(maps)) == str(maps / "sub" / "deeper" / "d.png")
    c = _seg_config(images, maps)
    ev = data.eval_iterator(c, batch_size=5, process_index=0, process_count=1, with_keys=True)
    (batch,) = list(ev)
    assert batch["mask"].all() and ev.skipped == 0
    assert batch["segmentation"].shape == (5, SIZE, SIZE) and batch["segmentation"].dtype == np.uint8
    for key, image, seg in zip(batch["key"], batch["image"], batch["segmentation"]):
        i = paths.index(key.decode())
        assert (seg == i).all()
        assert np.abs(_levels(image) - 20 * i).max() <= 2.0  # JPEG is near, PNG exact
    for batch in _segmentation_batches(c, 2, seeds=[1], batch_size=5):
        for key, seg in zip(batch["key"], batch["segmentation"]):
            assert (seg == paths.index(key.decode())).all()

    # A file list pairs by the path relative to its own folder, and must not name images outside it.
    listed = images / "list.txt"
    listed.write_text("sub/c.png\na.png\n")
    ev = data.eval_iterator(_seg_config(listed, maps), batch_size=2, process_index=0, process_count=1)
    assert [int(s[0, 0]) for s in next(ev)["segmentation"]] == [2, 0]
    (tmp_path / "lists").mkdir()
    outside = tmp_path / "lists" / "outside.txt"
    outside.write_text(f"{paths[0]}\n")
    with pytest.raises(ValueError, match="outside that folder"):
        data.train_iterator(_seg_config(outside, maps), global_batch_size=1, process_index=0, process_count=1)


def test_label_map_gets_the_image_crop_and_flip(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    # Short side == SIZE: no resize, so the image's pixels give the exact source position of every label.
    for name, (h, w) in {"land.png": (SIZE, 40), "port.png": (40, SIZE)}.items():
        y, x = np.mgrid[0:h, 0:w]
        _write_pair(images, maps, name, _position_image(h, w, 5), ((x + 7 * y) % N_LABELS).astype(np.uint8))
    c = _seg_config(images, maps, flip=True)
    windows = set()
    for batch in _segmentation_batches(c, 3, seeds=range(4)):
        for image, seg, (top, left, h, w), flipped in zip(batch["image"], batch["segmentation"], batch["crop"],
                                                          batch["flipped"]):
            levels = np.round(_levels(image)).astype(np.int64)
            x, y = levels[..., 0] // 5, levels[..., 1] // 5
            np.testing.assert_array_equal(seg, (x + 7 * y) % N_LABELS)
            cols = left + np.arange(SIZE)
            np.testing.assert_array_equal(x, np.broadcast_to(cols[::-1] if flipped else cols, x.shape))
            np.testing.assert_array_equal(y.T, np.broadcast_to(top + np.arange(SIZE), y.shape))
            assert (h, w) in {(SIZE, 40), (40, SIZE)}
            windows.add((int(top), int(left), bool(flipped)))
    assert len(windows) > 6 and {f for *_, f in windows} == {True, False}  # random crops, both flips


def test_label_map_follows_the_resized_image(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    # Twice SIZE on the short side: the image is downscaled (antialiased bilinear), the labels by nearest
    # neighbour. A label is its source column (row) along the crop's free axis, the image's red (green) a
    # ramp of it, so they must agree to within a source pixel.
    y, x = np.mgrid[0:2 * SIZE, 0:80]
    _write_pair(images, maps, "land.png", _position_image(2 * SIZE, 80, 3), x.astype(np.uint8))
    _write_pair(images, maps, "port.png", _position_image(80, 2 * SIZE, 3), x.T.astype(np.uint8))
    c = _seg_config(images, maps, flip=True, n_labels=80)
    for batch in _segmentation_batches(c, 2, seeds=range(3)):
        for image, seg, crop in zip(batch["image"], batch["segmentation"], batch["crop"]):
            axis = 0 if crop[3] > crop[2] else 1  # landscape: columns are in red
            source = _levels(image)[..., axis] / 3
            assert np.abs(seg - source).max() <= 1.0, np.abs(seg - source).max()


def test_nearest_resize_keeps_only_label_values(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    values = np.array([3, 17, 42, 49], np.uint8)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"down.png": (37, 53), "up.png": (12, 10)}.items():
        _write_pair(images, maps, name, _smooth_image(h, w, 1), rng.choice(values, (h, w)))
    batches = list(data.eval_iterator(_seg_config(images, maps), batch_size=2, process_index=0, process_count=1))
    seg = batches[0]["segmentation"]
    assert batches[0]["mask"].all()
    assert set(np.unique(seg)) <= set(values) and len(np.unique(seg[0])) > 1


def test_unusable_label_maps_are_skipped_and_counted(tmp_path, caplog):
    images, maps = tmp_path / "images", tmp_path / "maps"
    good = [_write_pair(images, maps, f"good{i}.png", _constant(SIZE, 20, 20 * i), _constant(SIZE, 20, i, 0))
            for i in range(6)]
    out_of_range = _constant(SIZE, 20, 5, 0)
    out_of_range[-1, -1] = N_LABELS  # in a corner some crops leave out: the whole map is checked
    bad = {
        "unreadable": _write_pair(images, maps, "no_map.png", _constant(SIZE, 20, 9), None),
        "label_out_of_range": _write_pair(images, maps, "range.png", _constant(SIZE, 20, 9), out_of_range),
        "label_map_size": _write_pair(images, maps, "size.png", _constant(SIZE, 20, 9), _constant(SIZE, 21, 1, 0)),
        "label_map_not_grey": _write_pair(images, maps, "rgb.png", _constant(SIZE, 20, 9), _constant(SIZE, 20, 1)),
        # Class 3 as a 16-bit PNG: decoded to 8 bits it would read as class 0.
        "label_map_not_8_bit": _write_pair(images, maps, "deep.png", _constant(SIZE, 20, 9),
                                           _constant(SIZE, 20, 3, 0).astype(np.uint16)),
    }
    n = len(good) + len(bad)
    c = _seg_config(images, maps)
    caplog.set_level("WARNING", logger="vqgan_jax.data.pipeline")
    it = data.train_iterator(c, global_batch_size=n, process_index=0, process_count=1, with_keys=True)
    batch = next(it)  # one epoch
    assert it.skipped == len(bad) and dict(it.skipped_reasons) == {reason: 1 for reason in bad}
    assert sorted(it.skipped_keys) == sorted(bad.values())
    # Bad rows were filled with good examples: image, label map and crop window rows moved together.
    for key, image, seg, crop in zip(batch["key"], batch["image"], batch["segmentation"], batch["crop"]):
        i = good.index(key.decode())
        assert (seg == i).all() and np.abs(_levels(image) - 20 * i).max() < 1e-3
        assert tuple(crop[2:]) == (SIZE, 20)
    log = caplog.text
    assert "no_map.png" in log and "does not exist" in log
    assert str(maps / "range.png") in log and "class >= data.n_labels" in log
    assert "differs from the image in height or width" in log and "not a single-channel" in log
    assert str(maps / "deep.png") in log and "not an 8-bit PNG" in log

    ev = data.eval_iterator(c, batch_size=n, process_index=0, process_count=1, with_keys=True)
    (batch,) = list(ev)
    assert ev.skipped == len(bad)
    mask = batch["mask"]
    assert {k.decode() for k in batch["key"][mask]} == set(good)
    assert (batch["segmentation"][~mask] == 0).all() and (batch["image"][~mask] == 0).all()
    assert (batch["crop"][~mask] == 0).all()


def test_shift_segmentation_wraps_255_to_0(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    labels = np.array([[255, 0, 4, 255]] * 4, np.uint8).repeat(SIZE // 4, 0).repeat(SIZE // 4, 1)
    _write_pair(images, maps, "a.png", _smooth_image(SIZE, SIZE, 0), labels)
    kw = dict(batch_size=1, process_index=0, process_count=1)
    ev = data.eval_iterator(_seg_config(images, maps, n_labels=6, shift_segmentation=True), **kw)
    np.testing.assert_array_equal(next(ev)["segmentation"][0], (labels.astype(int) + 1) % 256)
    # Unshifted, 255 is out of range for 6 classes.
    ev = data.eval_iterator(_seg_config(images, maps, n_labels=6), **kw)
    assert not next(ev)["mask"][0] and ev.skipped_reasons["label_out_of_range"] == 1


def test_segmentation_resume_gives_the_same_batches(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    rng = np.random.default_rng(0)
    for i in range(6):
        h, w = 20 + 3 * i, 24 + 2 * i
        _write_pair(images, maps, f"img{i}.png", _smooth_image(h, w, i), rng.integers(0, N_LABELS, (h, w), np.uint8))
    _write_pair(images, maps, "img_no_map.png", _smooth_image(20, 20, 9), None)  # exercises the repair
    c = _seg_config(images, maps, flip=True)
    kw = dict(global_batch_size=3, seed=5, process_index=0, process_count=1, with_keys=True)
    full = _take(data.train_iterator(c, **kw), 7)
    resumed = data.train_iterator(c, start_step=4, **kw)
    for want in full[4:]:
        got = next(resumed)
        assert set(got) == {"image", "segmentation", "crop", "flipped", "key", "index"}
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_crop_is_the_center_window_in_eval(tmp_path):
    shapes = [(45, 70), (90, 33), (12, 10), (SIZE, SIZE), (21, 20)]
    paths = [_save(tmp_path / f"{i}.png", _smooth_image(h, w, i)) for i, (h, w) in enumerate(shapes)]
    for random_crop in (True, False):  # eval ignores random_crop and flip
        c = _config(path=str(tmp_path), flip=True, random_crop=random_crop)
        (batch,) = list(data.eval_iterator(c, batch_size=len(paths), process_index=0, process_count=1))
        assert batch["crop"].dtype == np.int32 and not batch["flipped"].any()
        for (h, w), crop in zip(shapes, batch["crop"]):
            scale = SIZE / min(h, w)
            rh, rw = max(SIZE, round(h * scale)), max(SIZE, round(w * scale))
            assert tuple(crop) == ((rh - SIZE) // 2, (rw - SIZE) // 2, rh, rw), (h, w)
    # Training with random_crop off crops the same windows, and its flip is reported.
    c = _config(path=str(tmp_path), flip=True, random_crop=False)
    batch = next(data.train_iterator(c, global_batch_size=len(paths), process_index=0, process_count=1,
                                     with_keys=True))
    for key, crop in zip(batch["key"], batch["crop"]):
        h, w = shapes[paths.index(key.decode())]
        scale = SIZE / min(h, w)
        rh, rw = max(SIZE, round(h * scale)), max(SIZE, round(w * scale))
        assert tuple(crop) == ((rh - SIZE) // 2, (rw - SIZE) // 2, rh, rw)


def test_segmentation_config_errors(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    _write_pair(images, maps, "a.png", _smooth_image(SIZE, SIZE, 0), _constant(SIZE, SIZE, 1, 0))
    kw = dict(global_batch_size=1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="segmentation_path .* TFDS dataset data.name='mnist'"):
        data.train_iterator(_config(name="mnist", data_dir=str(tmp_path), segmentation_path=str(maps),
                                    n_labels=3), **kw)
    with pytest.raises(ValueError, match="data.n_labels must be"):
        data.train_iterator(_config(path=str(images), segmentation_path=str(maps)), **kw)
    with pytest.raises(ValueError, match="data.n_labels must be"):
        data.eval_iterator(_seg_config(images, maps, n_labels=300), batch_size=1, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="segmentation_path .* does not exist"):
        data.train_iterator(_seg_config(images, tmp_path / "nowhere"), **kw)
    other = tmp_path / "other_maps"
    _save(other / "b.png", _constant(SIZE, SIZE, 1, 0))  # maps of other images only
    with pytest.raises(FileNotFoundError, match="none of the first 1 images") as error:
        data.train_iterator(_seg_config(images, other), **kw)
    assert str(images) in str(error.value) and str(other) in str(error.value)
    with pytest.raises(ValueError, match="scikit-image"):
        data.folder.image_root("skimage:")


def test_real_sflckr_batches():
    images, maps = os.path.join(SFLCKR, "images"), os.path.join(SFLCKR, "segmentations")
    if not (os.path.isdir(images) and os.path.isdir(maps)):
        pytest.skip(f"no S-FLCKR sample at {SFLCKR}")
    c = _config(path=images, segmentation_path=maps, n_labels=182, size=256, flip=True)
    it = data.train_iterator(c, global_batch_size=64, seed=0, process_index=0, process_count=1)
    for batch in _take(it, 2):
        assert batch["image"].shape == (64, 256, 256, 3) and batch["image"].dtype == np.float32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        seg = batch["segmentation"]
        assert seg.shape == (64, 256, 256) and seg.dtype == np.uint8 and seg.max() < 182
        assert all(len(np.unique(s)) > 1 for s in seg)  # real scenes, not blank placeholders
        top, left, h, w = batch["crop"].T
        assert (top >= 0).all() and (left >= 0).all() and (top + 256 <= h).all() and (left + 256 <= w).all()
        assert np.minimum(h, w).tolist() == [256] * 64
    assert it.skipped == 0


# --- class labels ----------------------------------------------------------------------------------------

def _write_classes(root, counts):
    """counts: {class name: n} -> [(path, class name)]: n images per class folder, every other one a level
    deeper (its class is still the top-level folder), each a constant colour 10 * (its number in the list)."""
    written = []
    for name, n in counts.items():
        for k in range(n):
            rel = f"{name}/{'deep/' if k % 2 else ''}{name}{k}.png"
            written.append((_save(os.path.join(root, rel), _constant(SIZE, SIZE + 4, 10 * len(written))), name))
    return written


def test_class_folders_number_the_sorted_top_level_folders(tmp_path):
    train, held_out = tmp_path / "train", tmp_path / "val"
    files = _write_classes(train, {"zebra": 2, "cat": 3, "dog": 2})
    (train / "empty_class").mkdir()  # keeps its place in the numbering, as in torchvision's ImageFolder
    (train / "notes.txt").write_text("not an image, so not a stray image")
    classes = ["cat", "dog", "empty_class", "zebra"]
    c = _config(path=str(train), class_folders=True, flip=True)
    it = data.train_iterator(c, global_batch_size=len(files), seed=1, process_index=0, process_count=1,
                             with_keys=True)
    assert it.classes == classes
    label_of = {path: classes.index(name) for path, name in files}
    for batch in _take(it, 2):
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (len(files),)
        assert batch["label"].tolist() == [label_of[k.decode()] for k in batch["key"]]

    # Evaluation on eval_path numbers its folders by the training classes ("dog" stays 1, "zebra" 3), and
    # its padding rows get label 0.
    val = sorted(_write_classes(held_out, {"zebra": 2, "dog": 1}))
    ev_config = _config(path=str(train), eval_path=str(held_out), class_folders=True)
    kw = dict(batch_size=4, process_index=0, process_count=1)
    ev = data.eval_iterator(ev_config, with_keys=True, **kw)
    (batch,) = list(ev)
    assert ev.classes == classes
    assert [k.decode() for k in batch["key"][:3]] == [path for path, _ in val]
    assert batch["mask"].tolist() == [True, True, True, False]
    assert batch["label"].tolist() == [classes.index(name) for _, name in val] + [0]
    _write_classes(held_out, {"yak": 1})
    with pytest.raises(ValueError, match="class 'yak' of .* is not a class of the training data"):
        data.eval_iterator(ev_config, **kw)

    # An image directly in the root folder (or list folder) has no class.
    stray = _save(train / "stray.png", _constant(SIZE, SIZE, 0))
    with pytest.raises(ValueError, match=f"{re.escape(stray)} lies directly in"):
        data.train_iterator(c, global_batch_size=1, process_index=0, process_count=1)
    listed = train / "list.txt"
    listed.write_text("cat/cat0.png\nstray.png\n")
    with pytest.raises(ValueError, match="stray.png lies directly in"):
        data.eval_iterator(_config(path=str(listed), class_folders=True), **kw)
    # A list's classes are the first components of its entries, relative to the list's folder.
    listed.write_text("zebra/zebra0.png\ncat/deep/cat1.png\n")
    ev = data.eval_iterator(_config(path=str(listed), class_folders=True), **kw)
    assert ev.classes == ["cat", "zebra"] and next(ev)["label"].tolist() == [1, 0, 0, 0]
    listed.write_text("./zebra/zebra0.png\n./cat/deep/cat1.png\n")  # the same entries, spelt from "."
    ev = data.eval_iterator(_config(path=str(listed), class_folders=True), **kw)
    assert ev.classes == ["cat", "zebra"] and next(ev)["label"].tolist() == [1, 0, 0, 0]


def test_class_label_config_errors(tmp_path, folder, tfds_dir):
    kw = dict(global_batch_size=2, process_index=0, process_count=1)
    tiny = dict(name="vqgan_jax_tiny_images", data_dir=tfds_dir, image_key="picture")
    with pytest.raises(ValueError, match="data.label_key='label' names a TFDS feature"):
        data.train_iterator(_config(path=folder[0], label_key="label"), **kw)
    with pytest.raises(ValueError, match="data.class_folders=True needs data.path"):
        data.train_iterator(_config(class_folders=True, **tiny), **kw)
    with pytest.raises(ValueError, match="data.depth_path=.* needs data.path"):
        data.eval_iterator(_config(depth_path=str(tmp_path), **tiny), batch_size=2, process_index=0,
                           process_count=1)
    with pytest.raises(ValueError, match=r"no feature 'class' \(data.label_key\)"):
        data.train_iterator(_config(label_key="class", **tiny), **kw)
    with pytest.raises(ValueError, match="label_key='picture' must name an integer scalar"):
        data.train_iterator(_config(label_key="picture", **tiny), **kw)
    with pytest.raises(ValueError, match="data.class_folders needs data.path .* scikit-image"):
        data.train_iterator(_config(path="skimage:", class_folders=True), **kw)
    # The training configs spell unset string fields "" (see train/config.py).
    batch = next(data.train_iterator(_config(path=folder[0], label_key="", depth_path=""), **kw))
    assert set(batch) == {"image", "crop", "flipped"}


def test_tfds_class_labels(tfds_dir):
    c = _config(name="vqgan_jax_tiny_images", data_dir=tfds_dir, image_key="picture", label_key="label",
                flip=True)
    # Each record's label, read by one evaluation pass over the training split.
    (records,) = list(data.eval_iterator(c, batch_size=12, split="train", process_index=0, process_count=1,
                                         with_keys=True))
    assert sorted(records["label"].tolist()) == sorted(i % 3 for i in range(12))
    label_of = dict(zip(records["key"], records["label"]))
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1, with_keys=True)
    full = _take(data.train_iterator(c, **kw), 5)
    for batch in full:
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
        assert batch["label"].tolist() == [label_of[k] for k in batch["key"]]
    resumed = data.train_iterator(c, start_step=3, **kw)
    for want in full[3:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    batches = list(data.eval_iterator(c, batch_size=4, process_index=0, process_count=1))  # 5 records
    assert batches[1]["mask"].tolist() == [True, False, False, False]
    assert sorted(np.concatenate([b["label"][b["mask"]] for b in batches]).tolist()) == [0, 0, 1, 1, 2]
    assert (batches[1]["label"][1:] == 0).all()


def test_class_labels_follow_the_repair(tmp_path):
    root = tmp_path / "train"
    files = _write_classes(root, {"a": 2, "b": 2, "c": 1})
    bad = _write_bad(str(root / "b"))  # undecodable images in class 1
    n = len(files) + len(bad)
    c = _config(path=str(root), class_folders=True)
    it = data.train_iterator(c, global_batch_size=n, process_index=0, process_count=1, with_keys=True)
    batch = next(it)  # one epoch
    assert it.skipped == len(bad)
    colour = {path: 10 * i for i, (path, _) in enumerate(files)}
    label = {path: "abc".index(name) for path, name in files}
    # Bad rows hold good examples: key, image and label moved together.
    for key, image, lab in zip(batch["key"], batch["image"], batch["label"]):
        key = key.decode()
        assert lab == label[key] and np.abs(_levels(image) - colour[key]).max() < 1e-3

    (batch,) = list(data.eval_iterator(c, batch_size=n, process_index=0, process_count=1, with_keys=True))
    mask = batch["mask"]
    assert mask.sum() == len(files) and (batch["label"][~mask] == 0).all()
    assert batch["label"][mask].tolist() == [label[k.decode()] for k in batch["key"][mask]]


# --- depth maps ------------------------------------------------------------------------------------------

def _depth_config(images, depth_maps, **kw):
    return _config(path=str(images), depth_path=str(depth_maps), **kw)


def _depth_values(depth, max_value=65535):
    """float32 depth in [-1, 1] -> the PNG values (0..max_value) it was scaled from, as float64."""
    return (depth.astype(np.float64) + 1.0) * max_value / 2


def test_depth_map_gets_the_image_crop_and_flip(tmp_path):
    images, depths = tmp_path / "images", tmp_path / "depth"
    # Short side == SIZE: no resize, so the 16-bit depth 256 * column + row must match the image's position.
    for name, (h, w) in {"land.png": (SIZE, 40), "port.png": (40, SIZE)}.items():
        y, x = np.mgrid[0:h, 0:w]
        _write_pair(images, depths, name, _position_image(h, w, 5), (256 * x + y).astype(np.uint16))
    windows = set()
    for batch in _segmentation_batches(_depth_config(images, depths, flip=True), 3, seeds=range(4)):
        assert batch["depth"].shape == (2, SIZE, SIZE, 1) and batch["depth"].dtype == np.float32
        for image, depth, (top, left, _, _), flipped in zip(batch["image"], batch["depth"], batch["crop"],
                                                            batch["flipped"]):
            levels = np.round(_levels(image)).astype(np.int64)
            x, y = levels[..., 0] // 5, levels[..., 1] // 5
            np.testing.assert_array_equal(np.round(_depth_values(depth[..., 0])), 256 * x + y)
            windows.add((int(top), int(left), bool(flipped)))
    assert len(windows) > 6 and {f for *_, f in windows} == {True, False}  # random crops, both flips


def test_depth_scaling(tmp_path):
    images, depths = tmp_path / "images", tmp_path / "depth"
    tile = (SIZE, SIZE // 4)
    grey8 = np.tile(np.array([0, 51, 128, 255], np.uint8), tile)
    grey16 = np.tile(np.array([0, 1000, 30000, 65535], np.uint16), tile)
    # The original's format: RGBA whose four bytes per pixel are a float32 depth, min-max scaled per map.
    floats = np.tile(np.array([2.0, 4.5, 10.0, 3.0], np.float32), tile)
    for name, depth in {"a8.png": grey8, "b16.png": grey16, "c_packed.png": floats.view(np.uint8).reshape(
            SIZE, SIZE, 4)}.items():
        _write_pair(images, depths, name, _smooth_image(SIZE, SIZE, 0), depth)
    (batch,) = list(data.eval_iterator(_depth_config(images, depths), batch_size=3, process_index=0,
                                       process_count=1))
    assert batch["mask"].all()
    depth = batch["depth"][..., 0]
    np.testing.assert_allclose(depth[0], grey8 / 255 * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(depth[1], grey16 / 65535 * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(depth[2], (floats - 2) / 8 * 2 - 1, atol=1e-6)


def test_depth_map_is_resized_as_the_image(tmp_path):
    images, depths = tmp_path / "images", tmp_path / "depth"
    # Twice SIZE on the short side: both are downscaled with antialiased bilinear. The image's red and the
    # 8-bit depth hold the same ramp 3 * column, so they agree up to the image's rounding to uint8 levels.
    x = np.mgrid[0:2 * SIZE, 0:80][1]
    _write_pair(images, depths, "land.png", _position_image(2 * SIZE, 80, 3), (3 * x).astype(np.uint8))
    for batch in _segmentation_batches(_depth_config(images, depths, flip=True), 3, seeds=range(2), batch_size=1):
        assert tuple(batch["crop"][0, 2:]) == (SIZE, 40)
        diff = _depth_values(batch["depth"][0, ..., 0], 255) - _levels(batch["image"][0])[..., 0]
        assert np.abs(diff).max() <= 0.5 + 1e-3, np.abs(diff).max()


def test_unusable_depth_maps_are_skipped_and_counted(tmp_path, caplog):
    images, depths = tmp_path / "images", tmp_path / "depth"
    good = [_write_pair(images, depths, f"good{i}.png", _constant(SIZE, 20, 20 * i), _constant(SIZE, 20, 40 * i, 0))
            for i in range(5)]
    bad = {
        "unreadable": _write_pair(images, depths, "no_depth.png", _constant(SIZE, 20, 9), None),
        "depth_map_size": _write_pair(images, depths, "size.png", _constant(SIZE, 20, 9), _constant(SIZE, 21, 1, 0)),
        "depth_map_format": _write_pair(images, depths, "rgb.png", _constant(SIZE, 20, 9), _constant(SIZE, 20, 1)),
    }
    n = len(good) + len(bad)
    c = _depth_config(images, depths)
    caplog.set_level("WARNING", logger="vqgan_jax.data.pipeline")
    it = data.train_iterator(c, global_batch_size=n, process_index=0, process_count=1, with_keys=True)
    batch = next(it)  # one epoch
    assert it.skipped == len(bad) and dict(it.skipped_reasons) == {reason: 1 for reason in bad}
    assert sorted(it.skipped_keys) == sorted(bad.values())
    for key, image, depth in zip(batch["key"], batch["image"], batch["depth"]):
        i = good.index(key.decode())
        assert np.abs(_levels(image) - 20 * i).max() < 1e-3
        np.testing.assert_allclose(_depth_values(depth, 255), 40 * i, atol=1e-3)
    log = caplog.text
    assert str(depths / "no_depth.png") in log and "does not exist" in log
    assert str(depths / "size.png") in log and "differs from the image in height or width" in log
    assert str(depths / "rgb.png") in log and "neither a grey" in log

    ev = data.eval_iterator(c, batch_size=n, process_index=0, process_count=1, with_keys=True)
    (batch,) = list(ev)
    mask = batch["mask"]
    assert ev.skipped == len(bad) and {k.decode() for k in batch["key"][mask]} == set(good)
    assert (batch["depth"][~mask] == 0).all() and (batch["image"][~mask] == 0).all()


def test_labels_and_depth_resume_gives_the_same_batches(tmp_path):
    images, depths = tmp_path / "images", tmp_path / "depth"
    rng = np.random.default_rng(0)
    for i in range(6):
        h, w = 20 + 3 * i, 24 + 2 * i
        _write_pair(images, depths, f"{'ab'[i % 2]}/img{i}.png", _smooth_image(h, w, i),
                    rng.integers(0, 65536, (h, w)).astype(np.uint16))
    _write_pair(images, depths, "b/no_depth.png", _smooth_image(20, 20, 9), None)  # exercises the repair
    c = _depth_config(images, depths, flip=True, class_folders=True)
    kw = dict(global_batch_size=3, seed=5, process_index=0, process_count=1, with_keys=True)
    full = _take(data.train_iterator(c, **kw), 7)
    resumed = data.train_iterator(c, start_step=4, **kw)
    for want in full[4:]:
        got = next(resumed)
        assert set(got) == {"image", "depth", "label", "crop", "flipped", "key", "index"}
        assert got["label"].tolist() == [int(b"/b/" in k) for k in got["key"]]
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- device ----------------------------------------------------------------------------------------------

def test_prefetch_to_device(folder):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    n = len(jax.devices())
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    want = [{"image": np.random.default_rng(i).normal(size=(2 * n, 4, 4, 3)).astype(np.float32),
             "label": np.arange(2 * n, dtype=np.int32) + i} for i in range(5)]
    it = data.prefetch_to_device(iter(want), sharding, size=2)
    got = list(it)
    assert len(got) == 5
    for g, w in zip(got, want):
        assert isinstance(g["image"], jax.Array) and g["image"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(g["image"]), w["image"])
        np.testing.assert_array_equal(np.asarray(g["label"]), w["label"])
    with pytest.raises(StopIteration):
        next(it)

    # A real (finite) pipeline: strings stay on the host, attributes read through.
    ev = data.eval_iterator(_config(path=folder[0]), batch_size=4 * n, process_index=0, process_count=1,
                            with_keys=True)
    out = list(data.prefetch_to_device(ev, sharding))
    assert len(out) == len(ev) and isinstance(out[-1]["mask"], jax.Array)
    assert isinstance(out[0]["key"], np.ndarray)
    assert isinstance(out[0]["index"], np.ndarray) and out[0]["index"].dtype == np.int64  # not cut to int32
    assert data.prefetch_to_device(ev, sharding).skipped == 0

    def failing():
        yield {"image": np.zeros((2 * n, 1), np.float32)}
        raise OSError("disk gone")

    it = data.prefetch_to_device(failing(), sharding)
    next(it)
    with pytest.raises(OSError, match="disk gone"):
        next(it)

    def endless():
        while True:
            yield {"image": np.zeros((2 * n, 1), np.float32)}

    it = data.prefetch_to_device(endless(), sharding, size=2)
    next(it)
    thread = it._thread
    del it  # dropping the prefetcher (e.g. leaving a loop early) stops its thread
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()

    # close() waits for the thread and drops the batches in flight, so that no device array is left to a
    # thread that would free it while the interpreter shuts down.
    it = data.prefetch_to_device(endless(), sharding, size=2)
    next(it)
    it.close()
    assert not it._thread.is_alive() and it._queue.empty()
