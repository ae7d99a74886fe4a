"""A model and its variables on disk: `config.json` (class and fields) + an Orbax checkpoint of the arrays.

Written by the checkpoint converter and by training's generator export; read by sampling.
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models import GPT, VQGAN, NLayerDiscriminator

MODELS = {cls.__name__: cls for cls in (VQGAN, GPT, NLayerDiscriminator)}


def model_fields(model: nn.Module) -> dict:
    """The module's configuration as JSON-able data (dtype by name, tuples as lists)."""
    out = {}
    for field in dataclasses.fields(model):
        if field.name in ("parent", "name"):
            continue
        value = getattr(model, field.name)
        out[field.name] = jnp.dtype(value).name if field.name == "dtype" else value
    return json.loads(json.dumps(out))


def build_model(class_name: str, fields: dict) -> nn.Module:
    if class_name not in MODELS:
        raise ValueError(f"unknown model class {class_name!r}; known: {sorted(MODELS)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if "dtype" in fields:
        fields["dtype"] = jnp.dtype(fields["dtype"])
    return MODELS[class_name](**fields)


def save_pretrained(directory: str, model: nn.Module, variables: dict) -> None:
    """variables: {"params": ..., ["batch_stats": ...]}; a model already in `directory` is replaced.

    With several processes every one must call this (Orbax synchronises them and the first writes)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"class": type(model).__name__, "config": model_fields(model)}, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, "variables"), dict(variables), force=True)
    checkpointer.wait_until_finished()


def error_summary(e: Exception) -> str:
    """The first line of an error from orbax or tensorstore (theirs run to pages), with its type."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def load_pretrained(directory: str) -> tuple[nn.Module, dict]:
    """-> (model, variables) as saved by `save_pretrained`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path) or not os.path.isdir(os.path.join(directory, "variables")):
        raise FileNotFoundError(f"no saved model in {directory!r} (expected config.json and variables/)")
    try:
        with open(config_path) as f:
            config = json.load(f)
        model = build_model(config["class"], config["config"])
    except (ValueError, KeyError, TypeError) as e:  # damaged JSON, missing keys, unknown fields
        raise ValueError(f"{config_path!r} does not describe a model (expected {{\"class\": ..., \"config\": "
                         f"{{...}}}} as save_pretrained writes): {type(e).__name__}: {e}") from e
    try:
        variables = ocp.StandardCheckpointer().restore(os.path.join(directory, "variables"))
    except Exception as e:  # noqa: BLE001 -- orbax's and tensorstore's errors do not say what to do
        raise ValueError(f"the saved model in {directory!r} is incomplete or damaged ({error_summary(e)}): "
                         f"save or export it again") from e
    return model, variables
