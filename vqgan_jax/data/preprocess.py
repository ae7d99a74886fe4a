"""Per-image preprocessing as the original's `ImagePaths`, written as TF ops so tf.data runs it on the host.

The original (taming/data/base.py) does: PIL open -> convert("RGB") -> resize so the smaller side is `size`
(albumentations.SmallestMaxSize, which also upscales) -> random or center crop to size x size ->
`x / 127.5 - 1` as float32. We resize with an antialiased filter (the original's cv2 bilinear aliases when
downscaling) and round back to uint8 levels as the original's uint8 resize does, so the values the model
sees are the original's k / 127.5 - 1 grid. The horizontal flip is off by default (the original flips
ImageNet-with-depth crops, `get_preprocessor`, and nothing else).

Label maps (the original's SegmentationBase) are resized to the image's resized shape with nearest neighbour,
so every value stays a class id, then take the image's crop and flip. `crop_example` also reports the crop
window, which is what the original's coordinate conditioning (FacesHQ `coord`) crops with the image.

Depth maps (the original's ImageNet*WithDepth) are scaled to [-1, 1] (`decode_depth`), resized as images are
(antialiased bilinear, not rounded: depth is not a uint8 image) and take the image's crop and flip.

All functions take and return tensors and work both eagerly and inside `tf.data` maps.
"""

from vqgan_jax.data._tf import tf

RESIZE_METHODS = ("bilinear", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")


def decode(encoded):
    """encoded: scalar string (jpeg/png/gif/bmp/webp bytes) -> uint8 [H, W, 3].

    Greyscale gains three channels and alpha is dropped (as PIL's convert("RGB")); a GIF gives its first
    frame. Raises InvalidArgumentError on corrupt or truncated bytes; the pipeline catches that per image.
    """
    T = tf()
    image = T.io.decode_image(encoded, channels=3, dtype=T.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GREY, _PNG_RGBA = 0, 6  # IHDR colour types


def _png_header(encoded):
    """-> (is_png, bit depth, colour type) from the PNG signature and IHDR (bytes 24 and 25); indexing
    raises InvalidArgumentError on a file shorter than 26 bytes, which is unreadable whatever its format."""
    T = tf()
    header = T.io.decode_raw(T.strings.substr(encoded, 0, 26), T.uint8)
    is_png = T.equal(T.strings.substr(encoded, 0, 8), PNG_SIGNATURE)
    return is_png, T.cast(header[24], T.int32), T.cast(header[25], T.int32)


def decode_labels(encoded):
    """encoded label map (grey PNG, value = class id) -> (uint8 [H, W, C] as stored, eight_bit bool []).

    The channels are kept rather than converted, so that a colour or palette map shows up as C != 1 (the
    caller rejects it) instead of becoming luminance values that look like class ids. eight_bit is False
    for a PNG of another bit depth: decoding to uint8 would scale a 16-bit map's class ids down to 0 or 1
    (the original's `assert segmentation.mode == "L"` refuses such maps too).
    """
    T = tf()
    is_png, bit_depth, _ = _png_header(encoded)
    labels = T.io.decode_image(encoded, channels=0, dtype=T.uint8, expand_animations=False)
    labels.set_shape([None, None, None])
    return labels, ~is_png | T.equal(bit_depth, 8)


def decode_depth(encoded):
    """encoded depth map (PNG bytes) -> (depth float32 [H, W, 1] in [-1, 1], usable bool []).

    Two encodings, told apart by the PNG header (bit depth at byte 24, colour type at byte 25):
      * grey, 8 or 16 bits: depth = 2 * value / max - 1 with max = 255 or 65535, a fixed scale, so that
        depths stay comparable between maps. decode_png to uint16 widens an 8-bit v to 257 * v, so one
        division by 65535 serves both.
      * RGBA, 8 bits: the original's files (taming's rgba_to_depth), whose four bytes per pixel are one
        float32 (host byte order, little-endian on x86 and ARM), scaled per map as the original's
        preprocess_depth: 2 * (d - min) / max(1e-8, max - min) - 1.
    Any other PNG (RGB, palette, grey + alpha, 16-bit RGBA), a file that is not a PNG, or a packed map with
    NaN or inf gives usable=False and an empty map. Raises InvalidArgumentError on truncated or corrupt bytes.
    """
    T = tf()
    is_png, bit_depth, colour = _png_header(encoded)
    grey = is_png & T.equal(colour, _PNG_GREY)
    packed = is_png & T.equal(colour, _PNG_RGBA) & T.equal(bit_depth, 8)

    def from_grey():
        depth = T.io.decode_png(encoded, channels=1, dtype=T.uint16)
        return T.cast(depth, T.float32) * (2.0 / 65535.0) - 1.0, T.constant(True)

    def from_packed():
        depth = T.bitcast(T.io.decode_png(encoded, channels=4, dtype=T.uint8), T.float32)[..., None]
        low, high = T.reduce_min(depth), T.reduce_max(depth)
        depth = (depth - low) / T.maximum(high - low, 1e-8) * 2.0 - 1.0
        return depth, T.reduce_all(T.math.is_finite(depth))

    def unusable():
        return T.zeros([0, 0, 1], T.float32), T.constant(False)

    depth, usable = T.cond(grey, from_grey, lambda: T.cond(packed, from_packed, unusable))
    depth.set_shape([None, None, 1])
    return depth, usable


def shift_labels(labels):
    """uint8 labels + 1 with uint8 wrap-around: the original's shift_segmentation, which makes 255 -> 0."""
    T = tf()
    return T.cast((T.cast(labels, T.int32) + 1) % 256, T.uint8)


def smaller_side_shape(height, width, size):
    """The (height, width) after scaling so that min(height, width) == size; int32 scalars.

    The long side is rounded half-to-even, as the original's albumentations `py3round`.
    """
    T = tf()
    h = T.cast(height, T.float64)
    w = T.cast(width, T.float64)
    scale = size / T.minimum(h, w)
    # The short side comes out as exactly `size`; max() guards the long one against float round-down.
    new_h = T.maximum(T.cast(T.round(h * scale), T.int32), size)
    new_w = T.maximum(T.cast(T.round(w * scale), T.int32), size)
    return new_h, new_w


def resize_smaller_side(image, size, method="bilinear"):
    """image: [H, W, 3] (any real dtype, 0..255) -> float32 [H', W', 3] with min(H', W') == size."""
    T = tf()
    shape = T.shape(image)
    new_h, new_w = smaller_side_shape(shape[0], shape[1], size)
    image = T.cast(image, T.float32)
    unchanged = T.logical_and(T.equal(new_h, shape[0]), T.equal(new_w, shape[1]))
    return T.cond(unchanged, lambda: image,
                  lambda: T.image.resize(image, T.stack([new_h, new_w]), method=method, antialias=True))


def resize_labels_smaller_side(labels, size):
    """labels: uint8 [H, W, 1] -> uint8 [H', W', 1] of the shape resize_smaller_side gives an H x W image.

    Nearest neighbour, never antialiased: a blend of two class ids is not a class id. TF samples at pixel
    centres, as the image's bilinear resize does, so map and image stay aligned; the original's cv2
    INTER_NEAREST takes each output cell's top-left source pixel instead, up to half an output pixel off.
    """
    T = tf()
    shape = T.shape(labels)
    new_h, new_w = smaller_side_shape(shape[0], shape[1], size)
    unchanged = T.logical_and(T.equal(new_h, shape[0]), T.equal(new_w, shape[1]))
    return T.cond(unchanged, lambda: labels,
                  lambda: T.image.resize(labels, T.stack([new_h, new_w]), method="nearest"))


def resize_depth_smaller_side(depth, size):
    """depth: float32 [H, W, 1] in [-1, 1] -> float32 [H', W', 1] of the shape resize_smaller_side gives.

    Always antialiased bilinear, as the original resizes depth (cv2 bilinear, like its images): bicubic or
    lanczos would overshoot at depth edges. Bilinear weights are non-negative, so the clip only absorbs
    float rounding.
    """
    T = tf()
    shape = T.shape(depth)
    new_h, new_w = smaller_side_shape(shape[0], shape[1], size)
    unchanged = T.logical_and(T.equal(new_h, shape[0]), T.equal(new_w, shape[1]))
    resized = T.cond(unchanged, lambda: depth, lambda: T.image.resize(
        depth, T.stack([new_h, new_w]), method="bilinear", antialias=True))
    return T.clip_by_value(resized, -1.0, 1.0)


def center_crop_offsets(height, width, size):
    """(top, left) of the central size x size window; rounds down, as albumentations.CenterCrop."""
    return (height - size) // 2, (width - size) // 2


def random_crop_offsets(height, width, size, seed):
    """(top, left) uniform over every valid window, drawn from a stateless seed (int64 [2])."""
    T = tf()
    u = T.random.stateless_uniform([2], seed=seed, dtype=T.float64)
    top = T.cast(u[0] * T.cast(height - size + 1, T.float64), T.int32)
    left = T.cast(u[1] * T.cast(width - size + 1, T.float64), T.int32)
    return T.minimum(top, height - size), T.minimum(left, width - size)


def crop(image, size, top, left):
    """image: [H, W, C] -> [size, size, C] starting at (top, left)."""
    T = tf()
    out = image[top:top + size, left:left + size]
    return T.ensure_shape(out, [size, size, image.shape[-1]])


def flip_decision(seed):
    """bool scalar, True with probability 1/2, from a stateless seed (int64 [2])."""
    T = tf()
    return T.random.stateless_uniform([], seed=seed) < 0.5


def flip_if(image, flipped):
    """Mirrors image [H, W, C] left-right when the bool scalar `flipped` is True."""
    T = tf()
    return T.cond(flipped, lambda: T.reverse(image, axis=[1]), lambda: image)


def random_flip(image, seed):
    """Mirrors image [H, W, C] left-right with probability 1/2, decided by a stateless seed (int64 [2])."""
    return flip_if(image, flip_decision(seed))


def to_model_range(image):
    """image: float [H, W, 3] in 0..255 -> float32 in [-1, 1] as `x / 127.5 - 1` of the rounded uint8 level."""
    T = tf()
    image = T.clip_by_value(T.round(T.cast(image, T.float32)), 0.0, 255.0)
    return image / 127.5 - 1.0


def example_seed(seed, uid):
    """The stateless seed (int64 [2]) of one example: its crop and flip derive from it alone.

    `uid` is the example's global position in the stream, so the same (seed, position) always gets the
    same crop and flip, whatever was skipped or resumed before it.
    """
    T = tf()
    return T.stack([T.cast(seed, T.int64), T.cast(uid, T.int64)])


def crop_window(height, width, size, *, random_crop=False, flip=False, seed=None):
    """(top, left, flipped) for a resized height x width image: its crop, and whether the crop is mirrored.

    seed: int64 [2] stateless seed (see `example_seed`); needed when random_crop or flip. Crop and flip use
    separate streams split from it, so turning the flip on does not move the crops.
    """
    T = tf()
    if random_crop or flip:
        if seed is None:
            raise ValueError("random_crop and flip need a seed")
        crop_seed, flip_seed = T.unstack(T.random.experimental.stateless_split(seed, num=2))
    if random_crop:
        top, left = random_crop_offsets(height, width, size, crop_seed)
    else:
        top, left = center_crop_offsets(height, width, size)
    flipped = flip_decision(flip_seed) if flip else T.constant(False)
    return top, left, flipped


def crop_example(image, size, *, labels=None, depth=None, random_crop=False, flip=False, seed=None,
                 method="bilinear"):
    """A decoded image (uint8 [H, W, 3]), optionally its label map (uint8 [H, W, 1]) and its depth map
    (float32 [H, W, 1] in [-1, 1]) -> one example:

      image         float32 [size, size, 3] in [-1, 1]
      crop          int32 [4]: (top, left, resized height, resized width), the window in the resized image
                    before any flip
      flipped       bool []: the crop was mirrored left-right
      segmentation  uint8 [size, size] class ids, with `labels` only: the same window and flip
      depth         float32 [size, size, 1] in [-1, 1], with `depth` only: the same window and flip

    Label and depth maps must have the image's height and width (the caller checks).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; choose one of {RESIZE_METHODS}")
    T = tf()
    image = resize_smaller_side(image, size, method)
    shape = T.shape(image)
    top, left, flipped = crop_window(shape[0], shape[1], size, random_crop=random_crop, flip=flip, seed=seed)
    out = {"image": to_model_range(flip_if(crop(image, size, top, left), flipped)),
           "crop": T.stack([top, left, shape[0], shape[1]]), "flipped": flipped}
    if labels is not None:
        labels = crop(resize_labels_smaller_side(labels, size), size, top, left)
        out["segmentation"] = flip_if(labels, flipped)[..., 0]
    if depth is not None:
        depth = crop(resize_depth_smaller_side(depth, size), size, top, left)
        out["depth"] = flip_if(depth, flipped)
    return out


def preprocess(encoded, size, *, random_crop=False, flip=False, seed=None, method="bilinear"):
    """encoded image bytes -> float32 [size, size, 3] in [-1, 1].

    seed: int64 [2] stateless seed (see `example_seed`); needed when random_crop or flip.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; choose one of {RESIZE_METHODS}")
    return crop_example(decode(encoded), size, random_crop=random_crop, flip=flip, seed=seed,
                        method=method)["image"]


def load_image(path, size, method="bilinear"):
    """Reads one image file -> numpy float32 [size, size, 3] in [-1, 1] (center crop, no flip).

    For reconstructing or encoding single images outside the training pipeline. FileNotFoundError or
    ValueError naming the path for a missing or undecodable file.
    """
    T = tf()
    if not T.io.gfile.exists(str(path)):  # gfile: cloud paths too
        raise FileNotFoundError(f"no image file at {str(path)!r}")
    try:
        return preprocess(T.io.read_file(str(path)), size, method=method).numpy()
    except T.errors.InvalidArgumentError as e:
        raise ValueError(f"{str(path)!r} is not a readable image: {e.message.splitlines()[0]}") from e
