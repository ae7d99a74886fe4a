"""python -m vqgan_jax.convert CKPT YAML OUT_DIR [--trust]

Converts an original taming-transformers checkpoint with its YAML config into our saved models:
- a VQModel (YAML with `ddconfig`): OUT_DIR/vqgan, plus OUT_DIR/discriminator if the checkpoint holds it;
- a Net2NetTransformer: OUT_DIR/transformer, OUT_DIR/first_stage, and OUT_DIR/cond_stage when the
  conditioning stage is a VQModel of its own.
OUT_DIR/manifest.json lists what was written; `vqgan_jax.pretrained.load_pretrained(dir)` reads each part.
"""

import argparse
import json
import os
import sys

from vqgan_jax.convert import taming
from vqgan_jax.pretrained import save_pretrained


def convert(ckpt: str, config_path: str, out_dir: str, trust: bool = False) -> dict:
    config = taming.unwrap_config(taming.read_config(config_path))
    state = taming.load_state_dict(ckpt, trust)
    parts = {}

    def write(name, model, variables):
        save_pretrained(os.path.join(out_dir, name), model, variables)
        parts[name] = type(model).__name__

    manifest = {"source": os.path.abspath(ckpt), "parts": parts}
    if "ddconfig" in config:
        model, params = taming.vqgan_from_taming(state, config, prefix="")
        write("vqgan", model, {"params": params})
        if any(k.startswith("loss.discriminator.") for k in state):
            loss = taming.unwrap_config(dict(config.get("lossconfig") or {}))
            if loss.get("use_actnorm"):
                raise ValueError("the checkpoint's discriminator uses ActNorm (use_actnorm), which ours lacks; "
                                 "convert the autoencoder alone with vqgan_jax.convert.vqgan_from_taming")
            disc, variables = taming.discriminator_from_taming(
                state, ndf=loss.get("disc_ndf", 64), n_layers=loss.get("disc_num_layers", 3),
                prefix="loss.discriminator.", in_channels=loss.get("disc_in_channels", 3))
            write("discriminator", disc, variables)
    elif "transformer_config" in config:
        _check_net2net(config, state)
        model, params = taming.gpt_from_taming(state, config, prefix="transformer.")
        write("transformer", model, {"params": params})
        model, params = taming.vqgan_from_taming(state, config["first_stage_config"], prefix="first_stage_model.")
        write("first_stage", model, {"params": params})
        # As the original: `unconditional` puts an SOS token in place of whatever cond_stage_config says.
        cond = "__is_unconditional__" if config.get("unconditional") else config.get("cond_stage_config")
        if isinstance(cond, dict) and "ddconfig" in taming.unwrap_config(dict(cond)):
            model, params = taming.vqgan_from_taming(state, cond, prefix="cond_stage_model.")
            write("cond_stage", model, {"params": params})
        else:  # "__is_first_stage__", or a weightless stage such as SOSProvider
            manifest["cond_stage_config"] = cond
        manifest["net2net"] = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    else:
        raise ValueError(f"{config_path!r} is neither a VQModel (no ddconfig) nor a Net2NetTransformer "
                         "(no transformer_config) config")
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _check_net2net(config: dict, state: dict) -> None:
    """What a Net2Net conversion would otherwise lose without a word: a permuter that reorders the codes,
    weights outside the transformer and its two stages, a missing first stage."""
    if "first_stage_config" not in config:
        raise ValueError("the Net2Net config has no first_stage_config")
    permuter = config.get("permuter_config") or {}
    target = str(permuter.get("target", "")) if isinstance(permuter, dict) else str(permuter)
    if target and not target.endswith(".Identity"):
        raise ValueError(f"permuter {target!r} reorders the code sequence, which vqgan-jax does not; only the "
                         "Identity permuter (the default) converts")
    stray = sorted(k for k in state if not k.startswith(("transformer.", "first_stage_model.", "cond_stage_model.")))
    if stray:
        raise ValueError(f"{len(stray)} keys of the checkpoint belong to no part that converts: {stray[:5]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqgan_jax.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("ckpt", help="the original checkpoint (.ckpt, or .npz of state_dict arrays)")
    parser.add_argument("config", help="its YAML config (configs/*.yaml of the original)")
    parser.add_argument("out_dir")
    parser.add_argument("--trust", action="store_true",
                        help="allow full unpickling of a .ckpt that holds more than weights (runs its code)")
    args = parser.parse_args(argv)
    try:
        manifest = convert(args.ckpt, args.config, args.out_dir, args.trust)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(manifest["parts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
