"""The input pipeline on small synthetic images written to tmp_path (no network, no shared data)."""

import gc
import importlib.util
import os
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
        assert set(x) == {"image", "key", "index"}
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
    # Without with_keys the batch is exactly {"image"}.
    plain = data.train_iterator(c, seed=7, **{**kw, "with_keys": False})
    batch = next(plain)
    assert set(batch) == {"image"}
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

    # Evaluation: disjoint, complete, the same number of batches on both hosts.
    evs = [data.eval_iterator(c, batch_size=4, process_index=h, process_count=2, with_keys=True) for h in (0, 1)]
    assert len(evs[0]) == len(evs[1])
    seen = [np.concatenate([b["key"][b["mask"]] for b in ev]) for ev in evs]
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {p.encode() for p in paths}


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
