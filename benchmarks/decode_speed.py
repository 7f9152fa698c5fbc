r"""Generation speed of ``d2vlm_jax.inference.decode`` (prefill + cached decode loop).

For each frame count (default 32, 128, 256) and batch size (default 1 and 4) it builds a
random model (``testing.tiny_d2vlm_config`` unless sizes are given), a random prompt of
``frames + --text_tokens`` prefix tokens, and reports after compilation:

  prefill ms      the jitted prefix pass alone (video encoder + LLM over the prefix);
  generate ms     the whole jitted generation of --new_tokens tokens (prefill included);
  decode tok/s    steady-state decode throughput, batch * new_tokens / (generate - prefill);
  compile s       first call of each program (prefill, generate).

``end_token_id`` is None, so every row decodes exactly --new_tokens tokens. The timed calls
run under ``count_compilations``: the program checks that nothing recompiles after the
first call with the same shapes and exits non-zero otherwise. Numbers depend on the
machine and its load (printed with the table). This is a program, not a test.

Usage:
  python benchmarks/decode_speed.py
  python benchmarks/decode_speed.py --frames 32,128 --batches 1,8 --new_tokens 128 --hidden 256 --layers 4
  python benchmarks/decode_speed.py --scan_layers   # the same with the layers scanned
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from d2vlm_jax import sharding, testing
from d2vlm_jax.inference import decode
from d2vlm_jax.models.d2vlm import D2VLM, init_variables

_FRAMES = flags.DEFINE_list("frames", ["32", "128", "256"], "Frame counts.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Batch sizes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 32, "Prompt text tokens besides the frame tokens.")
_HIDDEN = flags.DEFINE_integer("hidden", 32, "LLM hidden size of the tiny config.")
_LAYERS = flags.DEFINE_integer("layers", 3, "LLM layers of the tiny config.")
_VOCAB = flags.DEFINE_integer("vocab", 64, "Vocabulary size of the tiny config.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
_SCAN = flags.DEFINE_boolean("scan_layers", False, "Scan the layers (stacked parameters and KV cache per layer "
                             "written in place) instead of unrolling them.")


def random_variables(config, batch):
    """Random parameters from the shapes (fast: no init pass)."""
    shapes = sharding.unbox(jax.eval_shape(lambda: init_variables(config, jax.random.key(0), batch)))["params"]
    rng = np.random.default_rng(0)

    def make(path, leaf):
        noise = (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return noise + 1 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    return {"params": jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(make, shapes))}


def timed(fn, *args, repeats):
    """(first-call seconds, median of ``repeats`` later calls in seconds)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, (statistics.median(times) if times else float("nan"))


def main(argv):
    del argv
    config = testing.tiny_d2vlm_config(hidden=_HIDDEN.value, layers=_LAYERS.value, vocab=_VOCAB.value,
                                       scan_layers=_SCAN.value)
    model = D2VLM(config)
    steps = _NEW_TOKENS.value
    decode_config = decode.DecodeConfig(max_new_tokens=steps, evi_token_id=testing.EVI_ID, end_token_id=None)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; jax {jax.__version__}; devices {jax.devices()}")
    print(f"model: tiny D2VLM (llm hidden {config.llm.hidden_size}, {config.llm.num_layers} layers, vocab "
          f"{config.llm.vocab_size}; image {config.video.vision.image_size}px; layers "
          f"{'scanned' if config.llm.scan_layers else 'unrolled'}); {steps} new tokens per row, "
          f"greedy, no early stop")
    header = (f"{'frames':>6} {'batch':>5} {'prefix':>6} {'compile s':>14} {'prefill ms':>10} "
              f"{'generate ms':>11} {'decode ms/step':>14} {'decode tok/s':>12} {'recompiles':>10}")
    print(header)
    print("-" * len(header))
    failures = 0
    variables = None
    for frames in (int(f) for f in _FRAMES.value):
        for batch_size in (int(b) for b in _BATCHES.value):
            prefix = frames + _TEXT_TOKENS.value
            batch = testing.random_batch(config, seed=frames + batch_size, batch=batch_size, frames=frames,
                                         prefix=prefix, lengths_fraction=1.0)
            batch = decode.select_prefix_fields(batch)
            if variables is None:
                variables = random_variables(config, batch)
            prefill_fn = jax.jit(lambda v, b: decode.prefill(model, v, b, steps))
            generate_fn = decode.make_generate_fn(model, decode_config)
            prefill_compile, _ = timed(prefill_fn, variables, batch, repeats=0)
            generate_compile, _ = timed(generate_fn, variables, batch, repeats=0)
            produced = generate_fn(variables, batch).num_tokens
            if not np.all(np.asarray(produced) == steps):   # every row decodes every step
                raise RuntimeError(f"expected {steps} tokens per row, got {produced}")
            with decode.count_compilations() as compiles:
                _, prefill_s = timed(prefill_fn, variables, batch, repeats=_REPEATS.value)
                _, generate_s = timed(generate_fn, variables, batch, repeats=_REPEATS.value)
            recompiles = len(compiles) + (generate_fn.jitted._cache_size() - 1) + (prefill_fn._cache_size() - 1)
            failures += recompiles != 0
            decode_s = max(generate_s - prefill_s, 1e-9)
            print(f"{frames:>6} {batch_size:>5} {prefix:>6} {prefill_compile:>6.1f} + {generate_compile:>5.1f} "
                  f"{1e3 * prefill_s:>10.2f} {1e3 * generate_s:>11.2f} {1e3 * decode_s / steps:>14.3f} "
                  f"{batch_size * steps / decode_s:>12.0f} {recompiles:>10}")
    if failures:
        print(f"FAIL: {failures} configuration(s) recompiled after the first call")
        sys.exit(1)
    print("no recompilation after the first call of each program")


if __name__ == "__main__":
    app.run(main)
