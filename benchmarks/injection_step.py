"""Single-prefix-pass evidence injection vs the authors' two passes, and packed FPO pairs vs
two separate forwards: one jitted train step (forward + backward) each, side by side on the
same tiny model, for 32 / 128 / 256 frames. Prints times and speed ratios.

    .venv/bin/python benchmarks/injection_step.py [--frames 32,128,256] [--repeats 5]

Ratios are measured in one process, alternating the variants, so machine noise affects both
alike; absolute times depend on the machine (printed in the header). The FLOP ratios come
from XLA's cost analysis of the compiled steps and do not depend on machine load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from d2vlm_jax import losses, objective, partition, sharding, testing  # noqa: E402
from d2vlm_jax.models.d2vlm import D2VLM, forward, init_variables  # noqa: E402

LOSS = losses.LossConfig()


def model_and_batch(frames: int, injection: str, rejected: int):
    config = testing.tiny_d2vlm_config(hidden=128, layers=4, vocab=512, injection=injection, k_evi=2)
    batch = testing.random_batch(config, seed=0, batch=2, frames=frames, qformer_len=16, prefix=frames + 40,
                                 response=48, evidence=8, events=4, question_evidence=2, rejected=rejected,
                                 lengths_fraction=1.0)
    params = sharding.unbox(init_variables(config, jax.random.key(0), batch))["params"]
    return config, batch, params


def sft_step(config):
    model = D2VLM(config)

    def loss(trainable, frozen, batch):
        return objective.loss_and_metrics(model, partition.merge(trainable, frozen), batch, LOSS, stage="sft")[0]
    return jax.jit(jax.value_and_grad(loss))


def fpo_packed_step(config):
    model = D2VLM(config)

    def loss(trainable, frozen, batch):
        return objective.loss_and_metrics(model, partition.merge(trainable, frozen), batch, LOSS, stage="fpo")[0]
    return jax.jit(jax.value_and_grad(loss))


def fpo_separate_step(config):
    """The same FPO loss from two forwards: chosen alone and rejected alone (each re-encodes the
    video and re-runs the prefix), as an implementation without packing would do."""
    model = D2VLM(config)

    def loss(trainable, frozen, batch):
        params = {"params": partition.merge(trainable, frozen)}
        chosen = forward(model, params, batch)
        alone = dict(batch)
        for f in ("evi_positions", "evi_event", "evi_stage", "evi_valid", "event_intervals", "event_valid"):
            alone[f] = batch[f"rejected_{f}"][:, 0]
        alone["response_ids"], alone["response_valid"] = batch["rejected_ids"][:, 0], batch["rejected_valid"][:, 0]
        rejected = forward(model, params, alone)
        packed_like = chosen._replace(
            token_logp=jnp.concatenate([chosen.token_logp, rejected.token_logp], 1),
            scores=jnp.concatenate([chosen.scores, rejected.scores], 1))
        sft, _ = losses.sft_losses(chosen, batch, LOSS)
        fpo, _ = losses.fpo_loss(losses.factorized_logps(packed_like, batch, LOSS.alpha), None,
                                 batch["rejected_valid_pair"], LOSS.fpo_beta)
        return sft + fpo
    return jax.jit(jax.value_and_grad(loss))


def flops(fn, args) -> float:
    """XLA's FLOP count of the compiled step (deterministic, unlike timings)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def time_variants(variants: dict, repeats: int) -> dict:
    """Median seconds per variant; the variants are run in turn (round robin) so a burst of
    machine load hits all of them alike."""
    for fn, args in variants.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, args) in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="32,128,256")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}, devices {jax.devices()}")
    print(f"{'frames':>6}  {'single ms':>10}  {'two-pass ms':>11}  {'speedup':>7}  {'FLOP ratio':>10}  "
          f"{'FPO packed ms':>13}  {'FPO separate ms':>15}  {'speedup':>7}  {'FLOP ratio':>10}")
    for n in [int(x) for x in args.frames.split(",")]:
        variants = {}
        for injection in ("single_pass", "two_pass"):
            config, batch, params = model_and_batch(n, injection, rejected=0)
            t, f = partition.split(params, partition.D2VLM_TRAINABLE)
            variants[injection] = (sft_step(config), (t, f, batch))
        config, batch, params = model_and_batch(n, "single_pass", rejected=1)
        t, f = partition.split(params, partition.D2VLM_TRAINABLE)
        variants["packed"] = (fpo_packed_step(config), (t, f, batch))
        variants["separate"] = (fpo_separate_step(config), (t, f, batch))
        row = time_variants(variants, args.repeats)
        fl = {name: flops(fn, a) for name, (fn, a) in variants.items()}
        print(f"{n:>6}  {1e3 * row['single_pass']:>10.1f}  {1e3 * row['two_pass']:>11.1f}  "
              f"{row['two_pass'] / row['single_pass']:>6.2f}x  {fl['two_pass'] / fl['single_pass']:>9.2f}x  "
              f"{1e3 * row['packed']:>13.1f}  {1e3 * row['separate']:>15.1f}  "
              f"{row['separate'] / row['packed']:>6.2f}x  {fl['separate'] / fl['packed']:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
