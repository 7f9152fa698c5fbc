"""Video encoder: frames -> one LLM token per frame (SPEC §1.1–1.3).

``VideoEncoder`` composes three submodules (top-level parameter names):

* ``vision``     — :class:`~d2vlm_jax.models.vision.VisionTower` (EVA-ViT-g, frozen);
* ``qformer``    — :class:`~d2vlm_jax.models.qformer.QFormer` (with ``query_tokens`` and
  ``ln_vision``);
* ``compressor`` — :class:`~d2vlm_jax.models.compressor.FrameCompressor`.

Frames of all samples are folded into one axis ``F = B * N`` (logical axis ``frames``, sharded
over the data/fsdp mesh axes); every frame is processed independently, so a padded frame can
never change a real frame's token. The question text of a sample conditions each of its frames
(the ids are repeated per frame, as in the authors' code).

Which parameters train (SPEC §1.6) is one regex table over ``'a/b/c'`` parameter paths,
:data:`VIDEO_ENCODER_TRAINABLE_PATTERNS`: the first matching pattern decides; no match =
frozen. It mirrors the authors' ``tuning_mode='attention'`` (``'qformer' in name and
('attention' in name or 'qformer_bert' not in name)``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vlm_jax import sharding
from d2vlm_jax.models import stacking
from d2vlm_jax.models.compressor import CompressorConfig, FrameCompressor
from d2vlm_jax.models.layers import path_str
from d2vlm_jax.models.qformer import QFormer, QFormerConfig
from d2vlm_jax.models.vision import VisionConfig, VisionTower

# (pattern, trainable) over parameter paths relative to the VideoEncoder ('qformer/...').
# First match wins; a path matching nothing is frozen.
VIDEO_ENCODER_TRAINABLE_PATTERNS: tuple[tuple[str, bool], ...] = (
    (r"vision/.*", False),                                   # EVA-ViT tower
    (r"qformer/query_tokens", True),                         # learned queries
    (r"qformer/ln_vision/.*", True),                         # LayerNorm on patch features
    # layers unrolled (layers_{i}) or scanned (layers/sub_{j}, every layer at once)
    (r"qformer/layers(_\d+|/sub_\d+)/(self_attn|cross_attn)/.*", True),  # attention sub-layers (incl. their LN)
    (r"qformer/layers(_\d+|/sub_\d+)/ffn_(query|text)/.*", False),       # BERT FFNs
    (r"qformer/embeddings/.*", False),                       # word/position embeddings + LN
    (r"compressor/.*", True),                                # proj, q_proj, k_proj, v_proj
)


def is_trainable(path: str, patterns: Iterable[tuple[str, bool]] = VIDEO_ENCODER_TRAINABLE_PATTERNS) -> bool:
    """Whether the parameter at ``path`` ('qformer/layers_0/self_attn/query/kernel') trains."""
    for pattern, trainable in patterns:
        if re.fullmatch(pattern, path):
            return trainable
    return False


def trainable_mask(params: Any, patterns: Iterable[tuple[str, bool]] = VIDEO_ENCODER_TRAINABLE_PATTERNS,
                   prefix: str = "") -> Any:
    """Bool pytree like ``params``: True where the leaf trains (paths relative to the encoder;
    ``prefix`` is stripped first, e.g. ``'video/'`` when the encoder is a submodule)."""
    patterns = tuple(patterns)

    def one(path, _):
        p = path_str(path)
        if prefix and p.startswith(prefix):
            p = p[len(prefix):]
        return is_trainable(p, patterns)

    return jax.tree_util.tree_map_with_path(one, params)


@dataclasses.dataclass(frozen=True)
class VideoEncoderConfig:
    """The three sub-configs; their shared sizes must agree."""
    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    compressor: CompressorConfig = CompressorConfig()

    def __post_init__(self):
        if self.qformer.encoder_width != self.vision.width:
            raise ValueError(f"qformer.encoder_width {self.qformer.encoder_width} != vision.width {self.vision.width}")
        if self.compressor.vision_dim != self.vision.width:
            raise ValueError(f"compressor.vision_dim {self.compressor.vision_dim} != vision.width {self.vision.width}")
        if self.compressor.query_dim != self.qformer.hidden_size:
            raise ValueError(f"compressor.query_dim {self.compressor.query_dim} != "
                             f"qformer.hidden_size {self.qformer.hidden_size}")

    @property
    def layer_stacks(self) -> tuple[stacking.LayerStack, ...]:
        """The vision tower's blocks and the Q-Former's layers (paths relative to the encoder)."""
        return (self.vision.layer_stack.with_prefix(("vision",)), self.qformer.layer_stack.with_prefix(("qformer",)))


class VideoEncoder(nn.Module):
    """frames + question -> one token per frame."""
    config: VideoEncoderConfig
    rules: tuple = sharding.DEFAULT_RULES

    def setup(self):
        self.vision = VisionTower(self.config.vision, self.rules)
        self.qformer = QFormer(self.config.qformer, self.rules)
        self.compressor = FrameCompressor(self.config.compressor)

    def __call__(self, frames: jax.Array, frame_valid: jax.Array, qformer_ids: jax.Array,
                 qformer_valid: jax.Array) -> jax.Array:
        """Encodes a batch of videos.

        Args:
          frames: uint8[B, N, H, W, 3] RGB in [0, 255] (or float in [0, 1]), resized and
            center-cropped, not normalized.
          frame_valid: bool[B, N] False at padded frames.
          qformer_ids: int32[B, L] Q-Former WordPiece ids of each sample's question.
          qformer_valid: bool[B, L] False at text padding.

        Returns:
          float[B, N, d_llm] frame tokens; exactly 0 at padded frames. The vision tower's
          output is gradient-stopped: training never differentiates it.
        """
        b, n = frames.shape[:2]
        flat = frames.reshape((b * n,) + frames.shape[2:])
        patches = self.vision_features(flat)  # [F, P, Dv], under stop_gradient
        patches = sharding.constrain(patches, ("frames", None, "act_embed"), self.rules)
        ids = jnp.repeat(qformer_ids, n, axis=0)        # [F, L]: sample b's text for its n frames
        valid = jnp.repeat(qformer_valid, n, axis=0)
        queries = self.qformer(patches, ids, valid)      # [F, Q, Hq]
        tokens = self.compressor(queries, patches)       # [F, d_llm]
        tokens = tokens.reshape(b, n, -1)
        tokens = jnp.where(frame_valid[:, :, None], tokens, jnp.zeros((), tokens.dtype))
        return sharding.constrain(tokens, ("batch", None, "act_embed"), self.rules)

    def vision_features(self, flat: jax.Array) -> jax.Array:
        """The vision tower over folded frames ``[F, H, W, 3]``, in ``vision.frame_chunks``
        sequential chunks (a ``scan`` sharing the parameters), so only one chunk's activations
        are alive at a time. Chunk ``i`` holds frames ``i, i + C, ...``: each device keeps its
        own frames. ``F`` is zero-padded to a multiple of ``C``; the padding is dropped."""
        c = self.config.vision.frame_chunks
        if c == 1:
            return self.vision(flat)
        f = flat.shape[0]
        pad = -f % c
        if pad:
            flat = jnp.concatenate([flat, jnp.zeros((pad,) + flat.shape[1:], flat.dtype)])
        per = (f + pad) // c
        chunks = flat.reshape((per, c) + flat.shape[1:]).swapaxes(0, 1)  # [C, F/C, H, W, 3]
        chunks = sharding.constrain(chunks, (None, "frames", None, None, None), self.rules)
        run = nn.scan(lambda tower, carry, x: (carry, tower(x)), variable_broadcast="params",
                      split_rngs={"params": False}, length=c)
        _, out = run(self.vision, None, chunks)  # [C, F/C, P, Dv]
        out = out.swapaxes(0, 1).reshape((per * c,) + out.shape[2:])
        return out[:f]
