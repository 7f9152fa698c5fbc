r"""Exports a d2vlm-jax checkpoint directory to the authors' PyTorch layout (safetensors).

Usage:
  python launch/export_checkpoint.py --src /ckpt/d2vlm_jax --dst /ckpt/d2vlm_hf \
      [--lora merged|adapter] [--dtype float32|bfloat16] [--max_shard_gb 2]

--src holds params/ (Orbax) and d2vlm_config.json (as written by import_checkpoint.py or
training). --lora merged writes model*.safetensors + model.safetensors.index.json +
config.json with the LoRA adapters folded into the base weights (the authors'
save_full_model form); --lora adapter writes the split form: adapter_model.safetensors +
adapter_config.json (PEFT names) + pytorch_model.safetensors (the trained non-LoRA tensors)
and the un-merged base model under --dst/base (config.json model_name_or_path points to it).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

from d2vlm_jax import cli  # noqa: E402

from d2vlm_jax.weights import d2vlm_checkpoint as ck

_SRC = flags.DEFINE_string("src", None, "d2vlm-jax checkpoint directory (params/ + d2vlm_config.json).",
                           required=True)
_DST = flags.DEFINE_string("dst", None, "Output directory in the authors' layout (created).", required=True)
_LORA = flags.DEFINE_enum("lora", "merged", ["merged", "adapter"], "Fold LoRA into the base weights, or "
                          "write it as a PEFT adapter (split form).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Dtype of the written tensors.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 2.0, "Largest safetensors shard, GiB.", lower_bound=0.001)


def main(argv):
    del argv
    files = ck.export_checkpoint(_SRC.value, _DST.value, lora=_LORA.value, dtype=_DTYPE.value,
                                 max_shard_bytes=int(_MAX_SHARD_GB.value * (1 << 30)))
    print(f"exported {_SRC.value} -> {_DST.value} (lora={_LORA.value}, {_DTYPE.value}):")
    for f in files:
        print(f"  {f}")


if __name__ == "__main__":
    cli.run(main)
