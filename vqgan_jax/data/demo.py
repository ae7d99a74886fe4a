"""The demo's data: the photographs bundled with scikit-image (no download; `pip install scikit-image`)."""

import importlib.util
import os

# Natural photographs only: the package also ships synthetic test patterns (chessboards, logos, text)
# that would teach a tiny model little about images.
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
                  "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
                  "retina.jpg", "rocket.jpg")


def skimage_data_dir() -> str:
    # find_spec locates the package without importing it (importing skimage takes seconds).
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo data are the photographs inside scikit-image: pip install scikit-image")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def skimage_photos(names=None) -> list[str]:
    """Paths of the bundled photographs (all of SKIMAGE_PHOTOS, or the given file names), sorted."""
    root = skimage_data_dir()
    paths = [os.path.join(root, n) for n in (names or SKIMAGE_PHOTOS)]
    found = sorted(p for p in paths if os.path.isfile(p))
    if not found:
        raise FileNotFoundError(f"none of the photographs {list(names or SKIMAGE_PHOTOS)} are in {root}")
    return found
