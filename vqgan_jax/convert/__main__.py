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
            disc, variables = taming.discriminator_from_taming(
                state, ndf=loss.get("disc_ndf", 64), n_layers=loss.get("disc_num_layers", 3),
                prefix="loss.discriminator.")
            write("discriminator", disc, variables)
    elif "transformer_config" in config:
        model, params = taming.gpt_from_taming(state, config, prefix="transformer.")
        write("transformer", model, {"params": params})
        model, params = taming.vqgan_from_taming(state, config["first_stage_config"], prefix="first_stage_model.")
        write("first_stage", model, {"params": params})
        cond = config.get("cond_stage_config")
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
