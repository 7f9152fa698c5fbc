r"""Imports the authors' D²VLM checkpoint (PyTorch, safetensors) into d2vlm-jax.

Usage:
  python launch/import_checkpoint.py --src /ckpt/d2vlm_sft --dst /ckpt/d2vlm_jax \
      [--base /ckpt/etchat_stage2] [--lora keep|merge] [--param_dtype float32|bfloat16] \
      [--mesh data=1,fsdp=-1,tensor=1] [--override video.vision.num_heads=16]

--src is a full checkpoint (config.json + model*.safetensors [+ index]) or the split form
(config.json + adapter_model.safetensors + adapter_config.json + pytorch_model.safetensors on
top of the base model directory, --base or config.json's model_name_or_path). Pickled
.bin/.pt files are refused with the one-line conversion recipe.

Output in --dst: params/ (Orbax), d2vlm_config.json (load with
d2vlm_jax.weights.d2vlm_checkpoint.load_model_config), authors_config.json,
import_report.json (ignored keys with reasons, shadowed base keys, tokenizer check) and the
tokenizer files.
"""

from __future__ import annotations

import json

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

from d2vlm_jax import cli  # noqa: E402

from d2vlm_jax import sharding
from d2vlm_jax.weights import d2vlm_checkpoint as ck

_SRC = flags.DEFINE_string("src", None, "The authors' checkpoint directory.", required=True)
_DST = flags.DEFINE_string("dst", None, "Output directory (created).", required=True)
_BASE = flags.DEFINE_string("base", None, "Base model directory of a split (LoRA) checkpoint "
                            "(default: config.json model_name_or_path).")
_LORA = flags.DEFINE_enum("lora", "keep", ["keep", "merge"], "Keep LoRA adapters as lora_a/lora_b "
                          "(model config gets their rank/alpha) or merge them into the base kernels.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Dtype of the written params.")
_MESH = flags.DEFINE_string("mesh", None, "Place each converted tensor straight onto this mesh, e.g. "
                            "'data=1,fsdp=-1,tensor=1' (default: host memory).")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Dotted model-config override, e.g. "
                                      "'video.vision.num_heads=16' (value parsed as JSON when it can be).")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise cli.UsageError(f"--override {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv):
    del argv
    mesh = None
    if _MESH.value:
        sizes = {k: int(v) for k, v in (p.split("=") for p in _MESH.value.split(","))}
        mesh = sharding.make_mesh(sizes)
    result = ck.import_checkpoint(_SRC.value, _DST.value, base=_BASE.value, lora=_LORA.value,
                                  param_dtype=_PARAM_DTYPE.value, overrides=_parse_overrides(_OVERRIDE.value),
                                  mesh=mesh)
    r = result.report
    print(f"imported {r['form']} checkpoint {r['src']} -> {_DST.value}: {r['num_params']:,} parameters, "
          f"lora={r['lora']}, {len(r['ignored'])} ignored key(s), {len(r['shadowed'])} shadowed base key(s)")
    for key, reason in sorted(r["ignored"].items()):
        print(f"  ignored {key}: {reason}")
    if r["tokenizer"]:
        t = r["tokenizer"]
        print(f"tokenizer: {t['size']} ids ({t['kind']}), model vocab rows {t['model_vocab_rows']}, "
              f"<evi>={t['evi_id']} </evi>={t['evi_end_id']}")


if __name__ == "__main__":
    cli.run(main)
