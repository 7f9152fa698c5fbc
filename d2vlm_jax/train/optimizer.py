"""AdamW with parameter groups (SPEC §7): LoRA adapters get ``lora_lr``, every other
trainable parameter ``lr``; cosine schedule with linear warmup; no weight decay on norms,
biases and other vectors; global-norm clipping. Only trainable parameters reach here, so
frozen parameters have no optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from d2vlm_jax.models.layers import path_str


def group_of(path: str) -> str:
    return "lora" if path.rsplit("/", 1)[-1] in ("lora_a", "lora_b") else "base"


def make_schedule(peak_lr: float, total_steps: int, warmup_ratio: float, kind: str = "cosine") -> optax.Schedule:
    warmup = int(round(total_steps * warmup_ratio))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(warmup, 0), max(total_steps, warmup + 1), 0.0)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, max(warmup, 1)), optax.constant_schedule(peak_lr)],
                                    [max(warmup, 1)])
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {kind!r}")


def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
    """Returns the transformation and the schedules ``{'base': fn, 'lora': fn}`` (for logging)."""
    schedules = {"base": make_schedule(optim["lr"], total_steps, optim["warmup_ratio"], optim.get("schedule", "cosine")),
                 "lora": make_schedule(optim["lora_lr"], total_steps, optim["warmup_ratio"],
                                       optim.get("schedule", "cosine"))}

    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: group_of(path_str(p)), params)

    def adamw(schedule):
        return optax.adamw(schedule, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                           weight_decay=optim["weight_decay"], mask=decay_mask)

    tx = optax.chain(
        optax.clip_by_global_norm(optim["grad_clip"]) if optim["grad_clip"] > 0 else optax.identity(),
        optax.multi_transform({"base": adamw(schedules["base"]), "lora": adamw(schedules["lora"])}, labels),
    )
    return tx, schedules
