"""The train step: a pure function ``(state, frozen, batch, reference) -> (state, metrics)``.

* ``state`` holds only what changes: step, trainable params, optimizer state, RNG.
* ``frozen`` (vision tower, LLM base weights, Q-Former FFNs, ...) is an input, never
  differentiated and never donated.
* Gradient accumulation runs ``lax.scan`` over micro-batches inside the step; micro-batch
  ``m`` takes rows ``m, m + M, m + 2M, ...`` so each stays spread over the data axes, and
  every micro-batch loss is normalized by the whole batch's denominators
  (``losses.normalizers``), so accumulating equals one big batch.
* A non-finite loss or gradient leaves the state unchanged and reports ``finite = 0``; the
  loop stops with a clear message and the last good checkpoint stays the latest.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from d2vlm_jax import losses, objective, partition, sharding
from d2vlm_jax.models.d2vlm import D2VLM


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any          # trainable parameters only
    opt_state: Any
    rng: jax.Array


def init_state(trainable: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable), rng=rng)


def split_micro_batches(batch: Mapping[str, jax.Array], num_micro: int, rules) -> dict[str, jax.Array]:
    """[B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m+M, ... (strided across devices)."""
    out = {}
    for k, v in batch.items():
        b = v.shape[0]
        if b % num_micro:
            raise ValueError(f"batch size {b} is not divisible by micro_batches={num_micro}")
        v = v.reshape((b // num_micro, num_micro) + v.shape[1:]).swapaxes(0, 1)
        out[k] = sharding.constrain(v, (None, "batch") + (None,) * (v.ndim - 2), rules)
    return out


def make_train_step(model: D2VLM, loss_cfg: losses.LossConfig, tx: optax.GradientTransformation, *,
                    stage: str, micro_batches: int = 1, dropout: bool = False,
                    schedules: Mapping[str, Callable] | None = None) -> Callable:
    rules = model.config.llm.sharding_rules

    def loss_of(trainable, frozen, batch, reference, norm, key):
        params = partition.merge(trainable, frozen)
        return objective.loss_and_metrics(model, params, batch, loss_cfg, stage=stage, reference_params=reference,
                                          deterministic=not dropout, rngs={"dropout": key} if dropout else None,
                                          normalizers=norm)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array], reference: Any = None):
        rng, step_key = jax.random.split(state.rng)
        norm = losses.normalizers(batch)
        if micro_batches == 1:
            (loss, metrics), grads = grad_fn(state.params, frozen, batch, reference, norm, step_key)
        else:
            micro = split_micro_batches(batch, micro_batches, rules)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (_, metrics_shape), _ = jax.eval_shape(grad_fn, state.params, frozen,
                                                   jax.tree.map(lambda x: x[0], micro), reference, norm, step_key)
            init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))

            def body(carry, xs):
                g_acc, l_acc, m_acc = carry
                mb, i = xs
                (l, m), g = grad_fn(state.params, frozen, mb, reference, norm, jax.random.fold_in(step_key, i))
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, m_acc, m)), None

            (grads, loss, metrics), _ = jax.lax.scan(body, init, (micro, jnp.arange(micro_batches)))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(new_params, state.params),
                               opt_state=keep(new_opt_state, state.opt_state), rng=rng)
        metrics = dict(metrics)
        metrics.update({"loss/total": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)})
        if schedules:
            for name, fn in schedules.items():
                metrics[f"lr/{name}"] = fn(state.step)
        return new_state, metrics

    return train_step
