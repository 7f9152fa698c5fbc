r"""How to read intermediate hidden states out of the scanned decoder: memory under grad.

The D²VLM forward needs two intermediate states of one decoder pass (layer ``k_evi`` and
``L-1``). Three ways, compiled for the host CPU (nothing run), temporaries of the gradient of
a loss on the logits and both states, remat ``full`` on every layer:

* ``buffers``  (what ``Decoder`` does): one carried buffer per requested layer, replaced by
  ``select`` when the layer index matches;
* ``ys``       every layer's output stacked ``[L, B, T, D]`` as the scan's ys, then indexed;
* ``unrolled`` the Python loop over ``layers_{i}``.

    .venv/bin/python benchmarks/scan_hidden_states.py [--layers 8 --hidden 256 --tokens 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from d2vlm_jax import sharding  # noqa: E402
from d2vlm_jax.models import attention as attn_lib  # noqa: E402
from d2vlm_jax.models import decoder as dec  # noqa: E402
from d2vlm_jax.models import stacking  # noqa: E402


def scan_with_ys(self, x, cache, positions, mask, query_start, deterministic, taken_layers):
    """The ``ys`` alternative: every layer's output comes back stacked."""

    def body(layer, carry, i, positions, mask, query_start):
        x, cache = carry
        x, cache = dec._layer_step(layer, x, cache, i, positions, mask, query_start, deterministic)
        return (x, cache), x

    run = stacking.scan_layers(body, self.config.num_layers, broadcast_args=3)
    (x, cache), every = run(self.layers, (x, cache), jnp.arange(self.config.num_layers, dtype=jnp.int32),
                            positions, mask, jnp.asarray(query_start, jnp.int32))
    return x, cache, {w: every[w - 1] for w in taken_layers}


def temporaries(config: dec.DecoderConfig, batch: int, tokens: int, taken: tuple[int, ...]) -> int:
    params = jax.eval_shape(lambda: sharding.unbox(dec.init_decoder(config, jax.random.key(0)))["params"])
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)

    def loss(p, ids):
        layout = attn_lib.SequenceLayout.causal(jnp.ones(ids.shape, bool))
        out = dec.Decoder(config).apply({"params": p}, input_ids=ids, positions=attn_lib.positions_from_valid(
            layout.valid), layout=layout, output_hidden_layers=taken)
        return jnp.mean(out.logits ** 2) + sum(jnp.mean(out.hidden_states[w] ** 2) for w in taken)

    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    base = dec.DecoderConfig(family="llama", vocab_size=512, hidden_size=args.hidden,
                             intermediate_size=4 * args.hidden, num_layers=args.layers, num_heads=4,
                             num_kv_heads=4, remat_policy="full")
    taken = (2, args.layers - 1)   # k_evi and L - 1
    results = {}
    for name in ("unrolled", "buffers", "ys"):
        config = dataclasses.replace(base, scan_layers=name != "unrolled")
        original = dec.Decoder._scan
        if name == "ys":
            dec.Decoder._scan = scan_with_ys
        try:
            results[name] = temporaries(config, args.batch, args.tokens, taken)
        finally:
            dec.Decoder._scan = original
    state = args.batch * args.tokens * args.hidden * 4
    print(f"decoder {args.layers} layers x d {args.hidden}, {args.batch} x {args.tokens} tokens, hidden states "
          f"{taken}, remat full; one [B, T, D] f32 state = {state / 2**20:.1f} MiB")
    for name, value in results.items():
        print(f"{name:>9}: temporaries {value / 2**20:8.1f} MiB ({(value - results['buffers']) / state:+.1f} states "
              f"vs buffers)")


if __name__ == "__main__":
    main()
