"""Image files from a local folder or a file list (the original's `custom` data): path -> sorted file paths.

Listing never opens an image: unreadable files are found, skipped and counted later by the pipeline. Label
and depth maps are paired with the images by path (`label_maps`, `depth_maps`); a missing one is likewise
only found later. With data.class_folders an image's class is its top-level folder (`class_labels`).
"""

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".jpe", ".jfif")
SKIMAGE = "skimage:"  # the photographs shipped inside scikit-image (the demo's data); "skimage:a.png,b.png" picks
LABEL_MAP_EXTENSION = ".png"  # the original's pairing: <rel>/<stem>.jpg -> <rel>/<stem>.png
_CHECKED_HEAD = 16  # entries stat-ed up front to catch a wrong base folder (see read_file_list, label_maps)


def _is_remote(path: str) -> bool:
    return "://" in path


def _walk(root: str):
    if _is_remote(root):
        from vqgan_jax.data._tf import tf

        for folder, _, names in tf().io.gfile.walk(root):
            yield folder, names
    else:
        # followlinks: datasets are often assembled from symlinked folders.
        for folder, dirs, names in os.walk(root, followlinks=True):
            dirs.sort()
            yield folder, names


def _exists(path: str) -> bool:
    if _is_remote(path):
        from vqgan_jax.data._tf import tf

        return tf().io.gfile.exists(path)
    return os.path.exists(path)


def exists(path: str) -> bool:
    """os.path.exists, for remote paths (gs://...) too."""
    return _exists(path)


def _isdir(path: str) -> bool:
    if _is_remote(path):
        from vqgan_jax.data._tf import tf

        return tf().io.gfile.isdir(path)
    return os.path.isdir(path)


def _read_text(path: str) -> str:
    if _is_remote(path):
        from vqgan_jax.data._tf import tf

        with tf().io.gfile.GFile(path) as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def find_images(folder: str) -> list[str]:
    """Every file under `folder` (recursively) whose extension is in IMAGE_EXTENSIONS, case-insensitive, sorted."""
    found = []
    for parent, names in _walk(folder):
        found.extend(os.path.join(parent, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    # Sorted so that every host, and every run, numbers the files identically.
    return sorted(found)


def read_file_list(list_file: str) -> list[str]:
    """One image path per line; blank lines and lines starting with '#' are ignored.

    Relative paths are resolved against the list file's folder, so a list can travel with its images.
    """
    base = os.path.dirname(list_file)
    try:
        text = _read_text(list_file)
    except UnicodeDecodeError:
        raise ValueError(f"data.path {list_file} is neither a folder nor a text file listing images") from None
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _is_remote(line):
            # Normalised, so that `./cat/0.png` pairs and classes by `cat/0.png` as a walked folder does.
            line = os.path.normpath(line if os.path.isabs(line) else os.path.join(base, line))
        paths.append(line)
    if not paths:
        raise ValueError(f"the image list {list_file} names no images")
    # Checking every entry would mean a million stat calls; a list whose first entries are all missing is a
    # wrong base folder, which we report now rather than as a million skipped files.
    head = paths[:_CHECKED_HEAD]
    if not any(_exists(p) for p in head):
        raise FileNotFoundError(f"none of the first {len(head)} images listed in {list_file} exist (e.g. "
                                f"{head[0]}); relative paths are resolved against the list file's folder")
    return paths


def list_images(path: str) -> list[str]:
    """data.path -> image paths: a folder (recursive search), a text file listing images, or "skimage:"
    (the photographs bundled with scikit-image, see `demo`)."""
    path = os.path.expanduser(str(path))
    if path.startswith(SKIMAGE):
        from vqgan_jax.data.demo import skimage_photos

        names = [n for n in path[len(SKIMAGE):].split(",") if n]
        return skimage_photos(names or None)
    if not _exists(path):
        raise FileNotFoundError(f"data.path {path} does not exist (expected a folder of images or a text file "
                                f"with one image path per line)")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(f"data.path {path} is a single image; give a folder of images or a text file listing them")
    if _isdir(path):
        files = find_images(path)
        if not files:
            raise ValueError(f"no images found under {path} (searched recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
        return files
    return read_file_list(path)


def image_root(path: str, field: str = "data.segmentation_path") -> str:
    """The folder that data.path's images are paired by (and classed by): data.path itself, or a file list's
    own folder.

    ValueError naming `field` for "skimage:", whose photos have no paired files and no class folders.
    """
    path = os.path.expanduser(str(path))
    if path.startswith(SKIMAGE):
        raise ValueError(f"{field} needs data.path to be a folder of images or a file list; the scikit-image "
                         f"photos (data.path='skimage:') have no paired files or class folders")
    return path if _isdir(path) else (os.path.dirname(path) or os.curdir)


def relative_path(image: str, root: str, purpose: str = "data.segmentation_path pairs each image with a label map"
                  ) -> str:
    """image's path below root ("sub/a.jpg"); ValueError, starting with `purpose`, if it is not below root."""
    prefix = root.rstrip("/") + "/"
    rel = image[len(prefix):] if image.startswith(prefix) else None
    # Walked folders always take the prefix path; only list entries can need the general (slower) relpath.
    if (rel is None or ".." in rel.split("/")) and not (_is_remote(image) or _is_remote(root)):
        rel = os.path.relpath(image, root)
    if rel is None or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise ValueError(f"{purpose} by its path relative to {root} (data.path or data.eval_path, or the folder "
                         f"of the file list there), but the image {image} is outside that folder; list only "
                         f"images below the list file's folder")
    return rel


def label_map_path(image: str, root: str, segmentation_root: str) -> str:
    """<root>/<rel>/<stem>.<ext> -> <segmentation_root>/<rel>/<stem>.png, the original S-FLCKR pairing."""
    stem, _ = os.path.splitext(relative_path(image, root))
    return os.path.join(segmentation_root, stem + LABEL_MAP_EXTENSION)


def _paired_paths(path: str, files: list[str], pair_root: str, field: str, what: str) -> list[str]:
    """data.path, its image files -> the files of kind `what` ("label map") under pair_root (data.`field`)
    paired with them, <pair_root>/<rel>/<stem>.png, same order.

    Missing ones are left to the pipeline (each one is an invalid example), except when none of the first
    few images has one: that is a wrong folder, reported now rather than as a million skipped examples.
    """
    field = f"data.{field}"
    root = image_root(path, field)
    pair_root = os.path.expanduser(str(pair_root))
    if not _exists(pair_root):
        raise FileNotFoundError(f"{field} {pair_root} does not exist (expected a folder of {what}s paired with "
                                f"the images of {root})")
    purpose = f"{field} pairs each image with a {what}"
    paired = [os.path.join(pair_root, os.path.splitext(relative_path(f, root, purpose))[0] + LABEL_MAP_EXTENSION)
              for f in files]
    head = paired[:_CHECKED_HEAD]
    if not any(_exists(p) for p in head):
        raise FileNotFoundError(
            f"none of the first {len(head)} images under {root} has a {what} under {pair_root}: e.g. {files[0]} "
            f"needs {head[0]}. The {what} of <data.path>/<rel>/<stem>.<ext> must be "
            f"<{field}>/<rel>/<stem>{LABEL_MAP_EXTENSION}")
    return paired


def label_maps(path: str, files: list[str], segmentation_root: str) -> list[str]:
    """data.path, its image files -> the paired label map paths (data.segmentation_path), same order."""
    return _paired_paths(path, files, segmentation_root, "segmentation_path", "label map")


def depth_maps(path: str, files: list[str], depth_root: str) -> list[str]:
    """data.path, its image files -> the paired depth map paths (data.depth_path), same order."""
    return _paired_paths(path, files, depth_root, "depth_path", "depth map")


# --- class folders (data.class_folders) ------------------------------------------------------------------

def _subfolders(root: str) -> list[str]:
    """The names of root's immediate subfolders (symlinked ones included)."""
    if _is_remote(root):
        from vqgan_jax.data._tf import tf

        _, dirs, _ = next(iter(tf().io.gfile.walk(root)))
        return [d.rstrip("/") for d in dirs]
    with os.scandir(root) as entries:
        return [e.name for e in entries if e.is_dir()]


def _class_name(image: str, root: str) -> str:
    """The top-level folder of image below root; ValueError if the image lies directly in root."""
    rel = relative_path(image, root, "data.class_folders takes each image's class from its top-level folder")
    name, sep, _ = rel.replace(os.sep, "/").partition("/")
    if not sep:
        raise ValueError(f"data.class_folders takes each image's class from its top-level subfolder of {root}, "
                         f"but {image} lies directly in {root}; put every image in a class folder "
                         f"(<root>/<class>/...)")
    return name


def class_names(path: str, files: list[str] | None = None) -> list[str]:
    """data.path -> its sorted class names: a folder's top-level subfolders, as torchvision's ImageFolder
    (a subfolder without images keeps its place, so indices do not depend on which images exist), or the
    first path components of a file list's entries (relative to the list's folder).

    files: the list's images when already read (saves reading it again); unused for folders.
    """
    path = os.path.expanduser(str(path))
    root = image_root(path, "data.class_folders")
    if _isdir(path):
        return sorted(_subfolders(root))
    if files is None:
        files = read_file_list(path)
    return sorted({_class_name(f, root) for f in files})


def class_labels(path: str, files: list[str], classes: list[str]) -> list[int]:
    """data.path (or eval_path), its image files, the class names to number by -> each file's class index.

    ValueError naming the first image directly in the root folder, or the first whose class is not in
    `classes` (an evaluation class the training data lacks).
    """
    root = image_root(path, "data.class_folders")
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for f in files:
        name = _class_name(f, root)
        if name not in index:
            raise ValueError(f"data.class_folders: the class {name!r} of {f} is not a class of the training data "
                             f"({len(classes)} classes: {classes[:5]}{'...' if len(classes) > 5 else ''}); the "
                             f"evaluation folders must use the training folder's class names")
        labels.append(index[name])
    return labels
