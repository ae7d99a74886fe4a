"""Input checks that turn silent wrong results into clear errors."""

import jax
import jax.numpy as jnp
import numpy as np


def check_codes(codes, num_codes: int, what: str = "codes") -> None:
    """Raises ValueError for a non-integer code array or, where the values are known (not traced inside
    jit), for codes outside [0, num_codes): an embedding lookup would silently clamp them."""
    dtype = codes.dtype if hasattr(codes, "dtype") else np.asarray(codes).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {dtype}")
    if isinstance(codes, jax.core.Tracer):
        return
    values = np.asarray(codes)
    if values.size and (values.min() < 0 or values.max() >= num_codes):
        raise ValueError(f"{what} out of range: values span [{values.min()}, {values.max()}], "
                         f"valid codes are 0..{num_codes - 1}")


def negatives_past_end(codes, num_codes: int):
    """-> codes with negative values replaced by num_codes. Inside jit, where `check_codes` cannot see the
    values, a table lookup gives NaN for codes >= num_codes but wraps negative ones to the last rows, a
    silent wrong result; this makes them NaN too."""
    return jnp.where(codes < 0, num_codes, codes)
