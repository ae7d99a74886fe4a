import json
import os
import tempfile

# Compiled programs are cached across the tests, their subprocesses (which inherit these variables) and the
# xdist workers: the training tests compile the same steps in several runs, and XLA on 2 CPU cores is slow to
# compile. An entry read while another worker still writes it fails to load: JAX warns and compiles again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vqgan_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "taming_parity.npz")


class Fixture:
    """The original PyTorch code's weights, inputs and outputs (see tests/fixtures/README.md)."""

    def __init__(self, path):
        with np.load(path) as f:
            self.arrays = {k: f[k] for k in f.files}
        self.meta = json.loads(str(self.arrays.pop("meta")))

    def __getitem__(self, key):
        return self.arrays[key]

    def state(self, part):
        prefix = f"{part}/state/"
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

    def nhwc(self, key):
        return np.transpose(self.arrays[key], (0, 2, 3, 1))

    def vq_params(self):
        """The VQModel `model.params` mapping the fixture was made with."""
        m = self.meta["vq"]
        dd = {k: m[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                                "z_channels", "in_channels", "out_ch", "dropout", "double_z")}
        return {"embed_dim": m["embed_dim"], "n_embed": m["n_embed"], "ddconfig": dd}

    def gpt_params(self, part="gpt"):
        m = self.meta[part]
        return {k: m[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}


@pytest.fixture(scope="session")
def taming():
    return Fixture(FIXTURE)
