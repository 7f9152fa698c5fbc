r"""Peak host memory of converting an authors' checkpoint (a benchmark, not a test).

Writes a synthetic multi-GB D²VLM checkpoint in the authors' layout (random float32 tensors,
sharded safetensors + index + config.json + a tiny tokenizer) into a temporary directory,
then measures, each in a fresh subprocess, the peak RSS (``resource.getrusage``) of

* ``stream``: reading + converting + casting every tensor through ``load_with_rules`` with a
  ``place`` callback that drops the result (the conversion pipeline alone);
* ``import``: the whole ``import_checkpoint`` (params kept, then written with Orbax);
* ``export``: ``export_checkpoint`` back to sharded safetensors.

and prints them against the checkpoint size and its largest tensor. The directory is removed
at the end.

Usage:
  python benchmarks/convert_memory.py [--layers 8] [--hidden 2048] [--vocab 32064] [--keep_dir]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MIB = 1 << 20


def _rss_now() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def make_config(layers: int, hidden: int, vocab: int):
    from d2vlm_jax.models.compressor import CompressorConfig
    from d2vlm_jax.models.d2vlm import D2VLMConfig
    from d2vlm_jax.models.decoder import DecoderConfig
    from d2vlm_jax.models.qformer import QFormerConfig
    from d2vlm_jax.models.video_encoder import VideoEncoderConfig
    from d2vlm_jax.models.vision import VisionConfig

    vision = VisionConfig(output_layer=2)                    # EVA-ViT-g width, 2 blocks
    qformer = QFormerConfig(num_layers=2)
    llm = DecoderConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                        num_layers=layers, num_heads=hidden // 128, num_kv_heads=hidden // 128)
    return D2VLMConfig(llm=llm, video=VideoEncoderConfig(vision, qformer, CompressorConfig(out_dim=hidden)),
                       k_evi=min(6, layers))


def write_checkpoint(directory: str, config, shard_bytes: int = 512 * MIB) -> dict:
    """Random tensors under the authors' names; returns sizes."""
    from d2vlm_jax.data.tokenizer import train_tiny_tokenizers
    from d2vlm_jax.weights import d2vlm_checkpoint as ck
    from d2vlm_jax.weights.common import flatten, write_safetensors

    target = flatten(ck.abstract_params(config)[0])
    rng = np.random.default_rng(0)
    shard, shard_size, weight_map, files, total, largest = {}, 0, {}, [], 0, 0

    def flush():
        nonlocal shard, shard_size
        name = f"model-{len(files) + 1:05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shard)
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_size = {}, 0

    for rule in ck.d2vlm_rules(config):
        value = rng.random(target[rule.flax_path].shape, dtype=np.float32) - 0.5
        value = np.ascontiguousarray(rule.to_source(value))
        if shard and shard_size + value.nbytes > shard_bytes:
            flush()
        shard[rule.source_key] = value
        shard_size += value.nbytes
        total += value.nbytes
        largest = max(largest, value.nbytes)
    flush()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    train_tiny_tokenizers(["synthetic checkpoint for a memory benchmark"], directory, llm_vocab_size=300)
    os.remove(os.path.join(directory, "vocab.txt"))
    cfg = ck.authors_config_json(config, {"vision_output_layer": config.video.vision.num_blocks_run - 1},
                                 {"<evi>": 10, "</evi>": 11})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {"total_bytes": total, "largest_tensor_bytes": largest, "num_files": len(files)}


def child(mode: str, src: str, dst: str) -> None:
    """Runs one measured conversion; prints a JSON line with the RSS figures."""
    import jax

    from d2vlm_jax.weights import d2vlm_checkpoint as ck
    from d2vlm_jax.weights.common import load_with_rules

    jax.numpy.zeros(1).block_until_ready()     # backend up: part of the constant
    t0 = time.time()
    if mode == "stream":
        ckpt = ck.open_authors_checkpoint(src)
        config = ck.config_from_authors(ckpt.hf_config, ckpt.source)
        target, _ = ck.abstract_params(config)
        baseline = _rss_now()
        load_with_rules(ckpt.source, ck.d2vlm_rules(config), target,
                        place=lambda path, value: jax.ShapeDtypeStruct(value.shape, value.dtype),
                        ignore_unused=lambda k: ck.ignored_reason(k, config) is not None)
    elif mode == "import":
        baseline = _rss_now()
        ck.import_checkpoint(src, dst)
    elif mode == "export":
        baseline = _rss_now()
        ck.export_checkpoint(src, dst, max_shard_bytes=512 * MIB)
    else:
        raise ValueError(mode)
    print(json.dumps({"mode": mode, "baseline_rss": baseline, "peak_rss": _peak_rss(),
                      "seconds": round(time.time() - t0, 1)}))


def measure(mode: str, src: str, dst: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--src", src, "--dst", dst],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--small_layers", type=int, default=2,
                        help="also stream a checkpoint with this many LLM layers (same largest tensor) to "
                             "show the peak does not grow with the checkpoint; 0 = skip")
    parser.add_argument("--keep_dir", action="store_true")
    parser.add_argument("--child", choices=["stream", "import", "export"])
    parser.add_argument("--src")
    parser.add_argument("--dst")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.src, args.dst)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    root = tempfile.mkdtemp(prefix="d2vlm_convert_memory_")
    try:
        src, jax_dir, hf_dir = (os.path.join(root, n) for n in ("authors", "jax", "hf"))
        os.makedirs(src)
        t0 = time.time()
        sizes = write_checkpoint(src, make_config(args.layers, args.hidden, args.vocab))
        print(f"synthetic checkpoint: {sizes['total_bytes'] / MIB:,.0f} MiB in {sizes['num_files']} shards, "
              f"largest tensor {sizes['largest_tensor_bytes'] / MIB:,.0f} MiB (written in {time.time() - t0:.0f}s)")
        rows = [measure("stream", src, jax_dir), measure("import", src, jax_dir), measure("export", jax_dir, hf_dir)]
        largest = sizes["largest_tensor_bytes"]
        if args.small_layers:
            small = os.path.join(root, "authors_small")
            os.makedirs(small)
            small_sizes = write_checkpoint(small, make_config(args.small_layers, args.hidden, args.vocab))
            assert small_sizes["largest_tensor_bytes"] == largest
            shutil.rmtree(jax_dir, ignore_errors=True)
            row = measure("stream", small, jax_dir)
            row["total_bytes"] = small_sizes["total_bytes"]
            row["mode"] = f"stream[{small_sizes['total_bytes'] / MIB:,.0f} MiB ckpt]"
            rows.insert(1, row)
            rows[0]["mode"] = f"stream[{sizes['total_bytes'] / MIB:,.0f} MiB ckpt]"
        print()
        print(f"{'mode':26s} {'baseline MiB':>13s} {'peak MiB':>9s} {'peak-base MiB':>14s} "
              f"{'/largest':>9s} {'/checkpoint':>12s} {'s':>6s}")
        for r in rows:
            delta = r["peak_rss"] - r["baseline_rss"]
            print(f"{r['mode']:26s} {r['baseline_rss'] / MIB:13,.0f} {r['peak_rss'] / MIB:9,.0f} "
                  f"{delta / MIB:14,.0f} {delta / largest:9.2f} {delta / sizes['total_bytes']:12.2f} "
                  f"{r['seconds']:6.1f}")
    finally:
        if args.keep_dir:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
