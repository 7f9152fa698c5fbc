"""EVA-ViT-g/14 vision tower (SPEC §1.1), frozen.

The same block as BLIP-2 / InstructBLIP's vision model: pre-LN transformer blocks, one fused
``qkv`` projection without bias plus learned ``q_bias`` / ``v_bias`` (the key bias is zero),
exact (erf) GELU MLP, learned absolute position embedding over ``[CLS; patches]``, no layer
scale, no relative position bias, **no final norm**.

Which block's output is used (``VisionConfig.output_layer``) follows HF's
``hidden_states[k]`` convention: ``hidden_states[0]`` is the embedding output and
``hidden_states[k]`` the output of the k-th block (blocks ``0 .. k-1`` run). The released
EVA-ViT-g has 40 blocks; D²VLM (E.T. Chat ``vision_output_layer=-2``, i.e. a tower built with
``depth = 40 - 2 + 1 = 39``) uses ``hidden_states[39]``, the output of block index 38 = the
39th block = the second-to-last one. HF's InstructBLIP conversion keeps exactly those 39
blocks (``InstructBlipVisionConfig.num_hidden_layers = 39``). Only the blocks needed are
created and run: the parameter tree holds ``blocks_0 .. blocks_{output_layer-1}``.

Frames are folded into the batch: the tower takes ``[F, H, W, 3]`` (``F`` = batch × frames)
and its activations are constrained with the logical axis ``frames`` so long videos spread
over the data/fsdp mesh axes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vlm_jax import sharding
from d2vlm_jax.models import stacking
from d2vlm_jax.models.attention import dot_product_attention
from d2vlm_jax.models.layers import Dense, LayerNorm, dtype_from_name, remat_layer

# CLIP normalization (SPEC §1.1), applied to pixels in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """EVA-ViT-g/14 hyper-parameters (defaults: the full-size tower of SPEC §1.1).

    Attributes:
      image_size: input side in pixels (frames are square, already resized/cropped).
      patch_size: patch side; ``(image_size // patch_size) ** 2`` patches.
      width: hidden size (1408).
      depth: number of blocks of the pretrained tower (40); only used to resolve a
        negative ``output_layer`` and to validate it.
      num_heads: attention heads (16, head dim 88).
      mlp_dim: MLP hidden size (``int(1408 * 4.3637) = 6144``).
      layer_norm_eps: LayerNorm epsilon of the blocks (1e-6).
      output_layer: HF ``hidden_states`` index of the returned features = number of blocks
        run (39). Negative values count like E.T. Chat's ``vision_output_layer``:
        ``-1`` = all ``depth`` blocks, ``-2`` = ``depth - 1`` blocks.
      dtype: computation dtype name ("float32" / "bfloat16").
      param_dtype: parameter dtype name.
      remat_policy: ``layers.remat_policy`` name for each block (None = no remat). The tower
        is never differentiated, so this only matters if someone unfreezes it.
      frame_chunks: the video encoder runs the tower over the folded frames in this many
        sequential chunks (a ``scan`` with the parameters broadcast; 1 = all frames at
        once). Results are identical; peak memory of the tower's activations (its f32
        attention scores dominate) shrinks by about this factor. Chunk ``i`` takes frames
        ``i, i + C, i + 2C, ...`` so it stays spread over the ``frames`` mesh axes; choose
        ``C`` dividing the frames per device to avoid resharding.
      scan_layers: run the blocks as one ``nn.scan`` over a stacked ``blocks`` subtree
        (``[num_blocks_run, ...]`` leaves) instead of ``blocks_{i}``; same results.
    """
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    output_layer: int = 39
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str | None = None
    frame_chunks: int = 1
    scan_layers: bool = False

    def __post_init__(self):
        if self.frame_chunks < 1:
            raise ValueError(f"frame_chunks must be >= 1, got {self.frame_chunks}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 1 <= self.num_blocks_run <= self.depth:
            raise ValueError(f"output_layer {self.output_layer} resolves to {self.num_blocks_run} blocks; "
                             f"need 1..depth={self.depth}")

    @property
    def num_blocks_run(self) -> int:
        """Number of blocks created and run (= HF ``hidden_states`` index)."""
        return self.output_layer if self.output_layer >= 0 else self.depth + self.output_layer + 1

    @property
    def layer_stack(self) -> stacking.LayerStack:
        """Where the blocks sit in the tower's parameter tree, and in which layout."""
        return stacking.LayerStack((), "blocks_", "blocks", self.num_blocks_run, 1, self.scan_layers)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


def normalize_frames(frames: jax.Array) -> jax.Array:
    """CLIP normalization. uint8 pixels are in [0, 255]; float pixels must be in [0, 1].

    Args:
      frames: uint8 or float[..., H, W, 3] RGB.

    Returns:
      float32[..., H, W, 3] ``(x - mean) / std``.
    """
    if jnp.issubdtype(frames.dtype, jnp.integer):
        x = frames.astype(jnp.float32) / 255.0
    else:
        x = frames.astype(jnp.float32)
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (x - mean) / std


class VisionAttention(nn.Module):
    """EVA attention: fused bias-free ``qkv`` + learned ``q_bias``/``v_bias``, ``proj``."""
    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[F, T, D] -> float[F, T, D]."""
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        d, h = cfg.width, cfg.num_heads
        qkv = Dense(3 * d, ("embed", "qkv"), use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    name="qkv")(x)
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("qkv",))
        q_bias = self.param("q_bias", bias_init, (d,), param_dtype)
        v_bias = self.param("v_bias", bias_init, (d,), param_dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # HF/EVA column layout: [3, heads, head_dim]
        q = q + q_bias.astype(dtype)
        v = v + v_bias.astype(dtype)
        f, t, _ = x.shape
        q, k, v = (a.reshape(f, t, h, d // h) for a in (q, k, v))
        everything = jnp.ones((1, t, t), bool)  # no mask: every token sees every token
        out = dot_product_attention(q, k, v, everything).reshape(f, t, d)
        return Dense(d, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype, name="proj")(out)


class VisionBlock(nn.Module):
    """Pre-LN block: ``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``."""
    config: VisionConfig
    rules: tuple = sharding.DEFAULT_RULES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[F, T, D] -> float[F, T, D]."""
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)
        x = x + VisionAttention(cfg, name="attn")(norm("norm1")(x))
        y = norm("norm2")(x)
        y = Dense(cfg.mlp_dim, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, name="fc1")(y)
        y = jax.nn.gelu(y, approximate=False)
        y = Dense(cfg.width, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, name="fc2")(y)
        x = x + y
        return sharding.constrain(x, ("frames", None, "act_embed"), self.rules)


class VisionTower(nn.Module):
    """EVA-ViT-g/14 up to block ``output_layer``; frozen (output under ``stop_gradient``).

    Parameters: ``patch_embed/{kernel [P*P*3, D], bias}`` (the stride-P convolution as a
    Dense over patches flattened in (row, col, channel) order), ``cls_token [D]``,
    ``pos_embed [1 + num_patches, D]``, ``blocks_{i}/{norm1, attn/{qkv, q_bias, v_bias,
    proj}, norm2, fc1, fc2}`` (scanned: ``blocks/...`` with a leading ``[num_blocks_run]`` axis).
    """
    config: VisionConfig
    rules: tuple = sharding.DEFAULT_RULES

    @nn.compact
    def __call__(self, frames: jax.Array) -> jax.Array:
        """Patch features of ``hidden_states[output_layer]`` without CLS.

        Args:
          frames: uint8[F, H, W, 3] in [0, 255] or float[F, H, W, 3] in [0, 1], RGB, already
            resized to ``image_size``; frames of all videos folded into ``F``.

        Returns:
          float[F, num_patches, width] (``dtype``), gradient-stopped: the train step never
          differentiates the tower (it has no optimizer state either).
        """
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        f, hgt, wid, c = frames.shape
        if (hgt, wid, c) != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"vision tower expects frames [F, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {frames.shape}")
        p, g = cfg.patch_size, cfg.grid
        x = normalize_frames(frames)
        x = x.reshape(f, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(f, g * g, p * p * 3)
        x = sharding.constrain(x, ("frames", None, None), self.rules)
        x = Dense(cfg.width, (None, "embed"), dtype=dtype, param_dtype=param_dtype, name="patch_embed")(x)
        cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                         (cfg.width,), param_dtype)
        pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   ("positions", "embed")),
                         (cfg.num_patches + 1, cfg.width), param_dtype)
        cls = jnp.broadcast_to(cls.astype(dtype), (f, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(dtype)
        x = sharding.constrain(x, ("frames", None, "act_embed"), self.rules)

        block_cls = remat_layer(VisionBlock, cfg.remat_policy, scanned=cfg.scan_layers)
        if cfg.scan_layers:
            run = stacking.scan_layers(lambda block, x, _: (block(x), None), cfg.num_blocks_run)
            x, _ = run(block_cls(cfg, self.rules, name="blocks"), x, None)
        else:
            for i in range(cfg.num_blocks_run):
                x = block_cls(cfg, self.rules, name=f"blocks_{i}")(x)
        return jax.lax.stop_gradient(x[:, 1:])
