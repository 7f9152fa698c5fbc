"""Shared building blocks: dense layers with logical axes, LoRA, norms.

Conventions every model module follows:
* Kernels are ``[in, out]`` (HF ``nn.Linear.weight`` is ``[out, in]``: loaders transpose).
* Every parameter carries logical axis names (see ``d2vlm_jax.sharding.DEFAULT_RULES``).
* Parameters are stored in ``param_dtype`` (float32 master weights); computation runs in
  ``dtype`` (float32 or bfloat16).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


def dtype_from_name(name: str | Dtype) -> Dtype:
    if not isinstance(name, str):
        return name
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class Dense(nn.Module):
    """``y = x @ kernel (+ bias)`` with logical axes ``(in_axis, out_axis)`` on the kernel."""
    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class LoRADense(nn.Module):
    """Dense layer with an optional low-rank adapter (LoRA).

    ``y = x W (+ b) + (alpha / rank) * dropout(x) A B``; ``A`` (``lora_a``, ``[in, rank]``)
    starts random, ``B`` (``lora_b``, ``[rank, out]``) starts at zero, so a fresh adapter
    changes nothing. ``rank = 0`` means no adapter. Dropout draws from the ``dropout`` rng
    when ``deterministic`` is False.
    """
    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        y = Dense(self.features, self.axes, use_bias=self.use_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="base")(x)
        if self.lora_rank > 0:
            a = self.param("lora_a", nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),  # kaiming-uniform(a=sqrt5)
                (self.axes[0], "lora_rank")), (x.shape[-1], self.lora_rank), self.param_dtype)
            b = self.param("lora_b", nn.with_logical_partitioning(
                nn.initializers.zeros, ("lora_rank", self.axes[1])), (self.lora_rank, self.features),
                self.param_dtype)
            h = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic)
            h = jnp.dot(h.astype(self.dtype), a.astype(self.dtype))
            y = y + jnp.dot(h, b.astype(self.dtype)) * (self.lora_alpha / self.lora_rank)
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF Llama/Phi-3), scale initialized to 1."""
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (statistics in float32) with logical axis ``norm`` on scale and bias."""
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


# jax.checkpoint_policies members that are policies themselves (the others build one from names)
_PLAIN_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                   "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")


def remat_policy(name: str | None):
    """A rematerialization policy by name; ``None``/``"none"`` = no remat.

    ``"full"`` saves nothing (everything is recomputed); ``"save:a,b"`` saves only the
    values tagged ``checkpoint_name(x, "a")`` / ``"b"`` inside the layer (the decoder tags
    :data:`d2vlm_jax.models.decoder.CHECKPOINT_NAMES`); any other name is a plain member of
    ``jax.checkpoint_policies`` (``dots_saveable``, ``dots_with_no_batch_dims_saveable``, ...).
    """
    if name in (None, "", "none"):
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name.startswith("save:"):
        names = [n.strip() for n in name[len("save:"):].split(",") if n.strip()]
        if not names:
            raise ValueError(f"remat policy {name!r}: name the values to save, e.g. 'save:attn_out,mlp_out'")
        return jax.checkpoint_policies.save_only_these_names(*names)
    if name not in _PLAIN_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; use 'none', 'full', 'save:<name>,...' or one of "
                         f"{_PLAIN_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


def remat_layer(layer_cls: type, policy_name: str | None, *, scanned: bool, static_argnums: tuple[int, ...] = ()):
    """``layer_cls`` under ``nn.remat`` with the named policy (unchanged for no policy).

    Inside ``nn.scan`` (``scanned``) CSE prevention is off: the scan's loop boundary already
    keeps XLA from merging the recomputation into the forward pass, and the barrier it would
    add costs performance (JAX's advice for ``checkpoint`` under ``scan``).
    ``static_argnums`` counts ``self`` as 0.
    """
    policy = remat_policy(policy_name)
    if policy is None:
        return layer_cls
    return nn.remat(layer_cls, policy=policy, prevent_cse=not scanned, static_argnums=static_argnums)


def path_str(path: Sequence[Any]) -> str:
    """``('llm', 'layers_0', 'attn')`` / jax key paths -> ``'llm/layers_0/attn'``."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return "/".join(parts)
