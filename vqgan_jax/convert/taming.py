"""Original taming-transformers checkpoints (PyTorch) <-> our Flax models and parameters."""

import importlib.util
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from vqgan_jax.convert.naming import export_variables, import_variables
from vqgan_jax.models import GPT, VQGAN, NLayerDiscriminator
from vqgan_jax.models.gpt import attention_mask

StateDict = Mapping[str, Any] | str | os.PathLike

_DDCONFIG_KEYS = {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels",
                  "in_channels", "out_ch", "dropout", "double_z", "resamp_with_conv", "give_pre_end"}
_GPT_KEYS = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "embd_pdrop", "resid_pdrop",
             "attn_pdrop", "n_unmasked"}


# ----------------------------------------------------------------------------------------- reading inputs

class _StandIn:
    """Takes the place of a class or function that a checkpoint names beside its weights, such as the
    callback classes PyTorch Lightning 1.x keys its callback states by: it stores and runs nothing, so a
    checkpoint can be read without that code installed and without running the file's code."""
    name = ""

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def __setstate__(self, state):
        del state


def _stand_in_name(value) -> str | None:
    """The global a `_StandIn` (class or instance) took the place of, or None for anything else."""
    kind = value if isinstance(value, type) else type(value)
    return kind.name if issubclass(kind, _StandIn) else None


def _torch_load(path: str, trust: bool):
    """torch.load on the CPU; without `trust`, weights-only, with a `_StandIn` for every global the file
    names that PyTorch does not allow (torch.serialization lists them without unpickling anything)."""
    import torch

    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 -- e.g. the legacy (non-zip) format: torch.load names the problem
        names = []
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_StandIn,), {"name": name}), name) for name in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(source: StateDict, trust: bool = False) -> dict[str, np.ndarray]:
    """A mapping of key -> array, or the path of a `.ckpt`/`.pt`/`.pth` (PyTorch) or `.npz` file.

    PyTorch files are read with `weights_only=True` (no code runs): the classes a checkpoint stores beside
    its weights (Lightning's callbacks, say) are read as inert stand-ins, so neither they nor Lightning
    are needed. `trust=True` unpickles in full, running the file's code, for weights that need it.
    Lightning's top-level `state_dict` is unwrapped.
    """
    if isinstance(source, Mapping):
        state = source
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        if path.endswith(".npz"):
            with np.load(path) as f:
                state = {k: f[k] for k in f.files}
        else:
            if importlib.util.find_spec("torch") is None:
                raise ImportError(f"reading {path!r} needs PyTorch: pip install 'vqgan-jax[convert]'")
            try:
                state = _torch_load(path, trust)
            except ModuleNotFoundError as e:
                raise ValueError(f"unpickling {path!r} in full (trust=True) needs a module that is not "
                                 f"installed ({e}); without trust=True the weights are read without it") from None
            except Exception as e:  # noqa: BLE001 -- torch's errors have no common type beyond Exception
                if not trust and "weights only load failed" in str(e).lower():
                    raise ValueError(f"{path!r} holds more than weights and was not unpickled ({e}); if you "
                                     "trust this file, pass trust=True (CLI: --trust)") from None
                raise ValueError(f"cannot read {path!r} as a PyTorch checkpoint (damaged, or not a "
                                 f"checkpoint): {e}") from None
    if not isinstance(state, Mapping):  # e.g. a whole pickled module, read as a stand-in
        raise ValueError(f"{source!r} holds a {_stand_in_name(state) or type(state).__name__}, not a mapping of "
                         "weights; if you trust this file, pass trust=True (CLI: --trust)")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    stood_in = {k: name for k, v in state.items() if (name := _stand_in_name(v))}
    if stood_in:
        raise ValueError(f"weights stored as objects that only a full unpickling rebuilds ({stood_in}); if you "
                         "trust this file, pass trust=True (CLI: --trust)")
    return {k: _to_numpy(v) for k, v in state.items()}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy twin
        value = value.detach().cpu()
        return value.float().numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value)


def read_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        if not os.path.exists(config):
            raise FileNotFoundError(f"config {os.fspath(config)!r} does not exist")
        with open(config) as f:
            config = yaml.safe_load(f)
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a mapping or a YAML path, got {type(config).__name__}")
    return dict(config)


# The original's VQ models whose weights or quantiser our VQGAN does not have: refused by name rather than
# by the keys that would then be missing.
_UNSUPPORTED_VQ = {"GumbelVQ": "a Gumbel-softmax quantiser", "EMAVQ": "an EMA codebook with its own buffers"}


def _unwrap(config: dict) -> tuple[str, dict]:
    """Steps through `model:` and `{target, params}` wrappers -> (the innermost target or "", its params)."""
    if "model" in config and isinstance(config["model"], Mapping):
        config = dict(config["model"])
    target = ""
    while "target" in config and isinstance(config.get("params"), Mapping):
        target, config = str(config["target"]), dict(config["params"])
    return target, config


def model_target(config) -> str:
    """The `target` class path of a model config (its innermost wrapper's), or ""."""
    return _unwrap(read_config(config))[0]


def unwrap_config(config: dict) -> dict:
    """Steps through `model:` and `{target, params}` wrappers to the parameters."""
    return _unwrap(config)[1]


def vqgan_config(model_params) -> dict:
    """A VQModel's `model.params` ({embed_dim, n_embed, ddconfig}) or its YAML -> `VQGAN` fields."""
    name = model_target(model_params).rsplit(".", 1)[-1]
    if name in _UNSUPPORTED_VQ:
        raise ValueError(f"{name} checkpoints are not supported: {_UNSUPPORTED_VQ[name]}, which VQGAN lacks")
    params = unwrap_config(read_config(model_params))
    if "ddconfig" not in params:
        raise ValueError(f"no `ddconfig` in the VQ model's params (keys: {sorted(params)})")
    dd = dict(params["ddconfig"])
    unknown = set(dd) - _DDCONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown ddconfig keys {sorted(unknown)}")
    if dd.pop("double_z", False):
        raise ValueError("double_z=True gives 2*z_channels encoder outputs, which a VQModel cannot quantise")
    if not dd.pop("resamp_with_conv", True) or dd.pop("give_pre_end", False):
        raise ValueError("resamp_with_conv=False and give_pre_end=True are not supported")
    if params.get("remap") is not None:
        raise ValueError("codebook remapping (`remap`) is not supported")
    for key in ("embed_dim", "n_embed"):
        if key not in params:
            raise ValueError(f"the VQ model's params lack {key!r}")
    dd["ch_mult"] = tuple(dd["ch_mult"])
    dd["attn_resolutions"] = tuple(dd["attn_resolutions"])
    return dict(dd, embed_dim=params["embed_dim"], n_embed=params["n_embed"])


def gpt_config(transformer_params) -> dict:
    """`transformer_config.params`, or a Net2Net YAML / `model.params` holding it -> `GPT` fields."""
    params = unwrap_config(read_config(transformer_params))
    if "transformer_config" in params:
        params = unwrap_config(dict(params["transformer_config"]))
    unknown = set(params) - _GPT_KEYS
    if unknown or not {"vocab_size", "block_size"} <= set(params):
        raise ValueError(f"not a GPT config: need vocab_size and block_size, unknown keys {sorted(unknown)}")
    return params


def _select(state: Mapping[str, np.ndarray], prefixes, probe: str, what: str,
            skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Keys under the first prefix at which `probe` exists, with the prefix stripped."""
    for prefix in prefixes:
        if prefix + probe in state:
            return {k[len(prefix):]: v for k, v in state.items()
                    if k.startswith(prefix) and not k[len(prefix):].startswith(skip)}
    raise ValueError(f"no {what} in this checkpoint: looked for {[p + probe for p in prefixes]}")


def _expected(model, *inputs, **kwargs) -> dict:
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs, **kwargs))
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


def _params(variables: Mapping) -> Mapping:
    return variables["params"] if "params" in variables else variables


# ------------------------------------------------------------------------------------------- import

def vqgan_from_taming(state_dict: StateDict, model_params, *, prefix: str | Sequence[str] | None = None,
                      trust: bool = False) -> tuple[VQGAN, dict]:
    """-> (VQGAN, params). Keys may carry `first_stage_model.` (a Net2Net checkpoint) or none (a VQModel
    checkpoint, whose `loss.*` entries are skipped, as is the `colorize` buffer, a random projection the
    original draws label maps with); `prefix` picks another part, e.g. `cond_stage_model.`, or gives the
    prefixes to try in order."""
    model = VQGAN(**vqgan_config(model_params))
    state = load_state_dict(state_dict, trust)
    prefixes = ["", "first_stage_model."] if prefix is None else [prefix] if isinstance(prefix, str) else list(prefix)
    state = _select(state, prefixes, "encoder.conv_in.weight", "VQGAN", skip=("loss.", "colorize"))
    f = model.downsample_factor
    shapes = _expected(model, jnp.zeros((1, f, f, model.in_channels)))
    return model, import_variables(state, shapes, what="VQGAN")["params"]


def gpt_from_taming(state_dict: StateDict, transformer_params, *, prefix: str | None = None,
                    trust: bool = False) -> tuple[GPT, dict]:
    """-> (GPT, params). Keys `transformer.*` (a Net2Net checkpoint) or bare minGPT keys. The attention
    masks that PyTorch stores as buffers are checked against `block_size` and `n_unmasked`."""
    model = GPT(**gpt_config(transformer_params))
    state = load_state_dict(state_dict, trust)
    state = _select(state, [prefix] if prefix is not None else ["transformer.", ""], "tok_emb.weight", "GPT")
    mask = np.asarray(attention_mask(np.arange(model.block_size), np.arange(model.block_size), model.n_unmasked))

    def check_mask(value):
        if value.size != mask.size or not np.array_equal(value.reshape(mask.shape).astype(bool), mask):
            raise ValueError(f"the checkpoint's attention mask differs from a causal mask with "
                             f"n_unmasked={model.n_unmasked}: set n_unmasked as the checkpoint was trained")

    ignored = {f"blocks.{i}.attn.mask": check_mask for i in range(model.n_layer)}
    shapes = _expected(model, jnp.zeros((1, 1), jnp.int32))
    return model, import_variables(state, shapes, ignored, what="GPT")["params"]


def discriminator_from_taming(state_dict: StateDict, ndf: int = 64, n_layers: int = 3, *,
                              prefix: str | None = None, trust: bool = False,
                              in_channels: int = 3) -> tuple[NLayerDiscriminator, dict]:
    """-> (NLayerDiscriminator, {"params", "batch_stats"}). Keys `main.*` or `loss.discriminator.main.*`;
    in_channels: the loss's `disc_in_channels` (1 for the depth VQGAN)."""
    model = NLayerDiscriminator(ndf=ndf, n_layers=n_layers)
    state = load_state_dict(state_dict, trust)
    prefixes = [prefix] if prefix is not None else ["", "loss.discriminator."]
    state = _select(state, prefixes, "main.0.weight", "PatchGAN discriminator")
    ignored = {k: None for k in state if k.endswith(".num_batches_tracked")}
    size = 4 * 2 ** n_layers
    shapes = _expected(model, jnp.zeros((1, size, size, in_channels)), train=False)
    return model, import_variables(state, shapes, ignored, what="discriminator")


# ------------------------------------------------------------------------------------------- export

def vqgan_to_taming(params: Mapping, model: VQGAN, prefix: str = "") -> dict[str, np.ndarray]:
    """VQGAN params -> a VQModel `state_dict` (numpy arrays, PyTorch layout). `model` (the params' VQGAN)
    is required because its codebook options are checked: the original has neither factorised nor
    l2-normalised codes, and l2-normalised codes leave no trace in the params."""
    params = _params(params)
    if "in_proj" in params.get("quantize", {}) or model.codebook_dim or model.l2_normalize:
        raise ValueError("this VQGAN uses codebook options the original lacks (codebook_dim / l2_normalize): "
                         "a taming checkpoint of it would quantise differently")
    return export_variables({"params": params}, prefix)


def gpt_to_taming(params: Mapping, prefix: str = "transformer.", n_unmasked: int | None = None) -> dict[str, np.ndarray]:
    """GPT params -> minGPT keys under `prefix` (a Net2Net checkpoint's). With `n_unmasked` given, the
    attention-mask buffers that PyTorch's strict loading expects are added too."""
    params = _params(params)
    state = export_variables({"params": params}, prefix)
    if n_unmasked is not None:
        size = params["pos_emb"].shape[1]
        mask = np.asarray(attention_mask(np.arange(size), np.arange(size), n_unmasked), np.float32)[None, None]
        layers = sorted(int(k.split("_")[1]) for k in params if k.startswith("blocks_"))
        state.update({f"{prefix}blocks.{i}.attn.mask": mask for i in layers})
    return state


def discriminator_to_taming(variables: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """{"params", "batch_stats"} -> NLayerDiscriminator keys (`main.*`) under `prefix`."""
    return export_variables({k: variables[k] for k in ("params", "batch_stats") if k in variables}, prefix)
