"""The D²VLM model: video encoder -> frame tokens spliced into the prompt -> decoder with
evidence injection -> LM head + grounding heads (SPEC §1, §3).

The forward pass is a pure function, :func:`forward`, of ``(model, variables, batch)``. It
runs the prompt+frames *prefix* once, keeps its per-layer keys/values and the layer-``k_evi``
frame states ``F``, injects ``mean(F[s..e])`` into every response ``<evi>`` embedding and runs
all response branches (chosen + rejected, packed, mutually invisible) against the prefix
cache (SPEC §3.2, §4.2). ``injection="two_pass"`` runs the authors' algorithm instead (prefix
alone to read ``F``, then the whole sequence again from scratch); both give the same loss and
gradients (tested), the single pass at about half the prefix cost.

:func:`build_prefix_embeds` and :func:`inject_evidence` are the only places where frame
tokens and evidence features enter embeddings; inference uses the same two functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vlm_jax import sharding
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models import stacking
from d2vlm_jax.models.decoder import Decoder, DecoderConfig, KVCache
from d2vlm_jax.models.layers import Dense, LayerNorm, dtype_from_name
from d2vlm_jax.models.video_encoder import VideoEncoder, VideoEncoderConfig

INJECTION_MODES = ("single_pass", "two_pass")
QUESTION_EVIDENCE_MODES = ("always", "after_frames")


@dataclasses.dataclass(frozen=True)
class D2VLMConfig:
    llm: DecoderConfig = DecoderConfig()
    video: VideoEncoderConfig = VideoEncoderConfig()
    k_evi: int = 6                 # layer whose frame states are injected (0 = embeddings)
    alpha: float = 2.0             # soft-target base: y = alpha ** -dist
    injection: str = "single_pass"
    # Response tokens per chunk of the LM head + log-softmax (0 = all tokens at once). With
    # a chunk size the float32[B, C1, R, V] logits are never materialized: a rematerialized
    # scan over token chunks keeps one chunk's logits alive (forward and backward).
    lm_logits_chunk: int = 0
    # question-side <evi>: "always" injected (the project's default), or "after_frames" only
    # when it follows the video in the prompt (the authors' code adds nothing to a question
    # written before <image>; see docs/ARCHITECTURE.md "Training semantics")
    question_evidence: str = "always"

    def __post_init__(self):
        if self.lm_logits_chunk < 0:
            raise ValueError(f"model.lm_logits_chunk={self.lm_logits_chunk} must be >= 0 (0 = no chunking)")
        if self.injection not in INJECTION_MODES:
            raise ValueError(f"model.injection must be one of {INJECTION_MODES}, got {self.injection!r}")
        if self.question_evidence not in QUESTION_EVIDENCE_MODES:
            raise ValueError(f"model.question_evidence must be one of {QUESTION_EVIDENCE_MODES}, got "
                             f"{self.question_evidence!r}")
        if not 0 <= self.k_evi <= self.llm.num_layers:
            raise ValueError(f"model.k_evi={self.k_evi} must be in [0, llm.num_layers={self.llm.num_layers}]")
        if self.llm.num_layers < 2:
            raise ValueError("the grounding heads read the second-to-last layer: llm.num_layers must be >= 2")
        if self.video.compressor.out_dim != self.llm.hidden_size:
            raise ValueError(f"video.compressor.out_dim {self.video.compressor.out_dim} != "
                             f"llm.hidden_size {self.llm.hidden_size}")

    @property
    def layer_stacks(self) -> tuple[stacking.LayerStack, ...]:
        """Every layer stack of the model (decoder, vision tower, Q-Former) with the layout this
        config uses; ``stacking.to_layout(params, config.layer_stacks)`` converts a parameter
        tree (or a train state, or abstract shapes) of either layout to it."""
        return (self.llm.layer_stack.with_prefix(("llm",)),) + stacking.with_prefix(self.video.layer_stacks, ("video",))

    def with_scan_layers(self, scan: bool) -> "D2VLMConfig":
        """The same model with the decoder, vision tower and Q-Former scanned (or unrolled)."""
        video = dataclasses.replace(self.video, vision=dataclasses.replace(self.video.vision, scan_layers=scan),
                                    qformer=dataclasses.replace(self.video.qformer, scan_layers=scan))
        return dataclasses.replace(self, llm=dataclasses.replace(self.llm, scan_layers=scan), video=video)


class GroundingHead(nn.Module):
    """``LayerNorm -> Linear(d, d/2) -> GELU (exact) -> Linear(d/2, d)`` (SPEC §1.5)."""
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(eps=1e-5, name="norm", **kw)(x)
        x = Dense(self.hidden_size // 2, ("embed", "mlp"), name="fc1", **kw)(x)
        x = nn.gelu(x, approximate=False)
        return Dense(self.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class D2VLM(nn.Module):
    """Parameter tree: ``video`` (encoder), ``llm`` (decoder), ``frm_head``, ``evi_head``."""
    config: D2VLMConfig

    def setup(self):
        c = self.config
        self.video = VideoEncoder(c.video, c.llm.sharding_rules)
        self.llm = Decoder(c.llm)
        kw = dict(dtype=dtype_from_name(c.llm.dtype), param_dtype=dtype_from_name(c.llm.param_dtype))
        self.frm_head = GroundingHead(c.llm.hidden_size, **kw)
        self.evi_head = GroundingHead(c.llm.hidden_size, **kw)

    def encode_video(self, frames, frame_valid, qformer_ids, qformer_valid):
        return self.video(frames, frame_valid, qformer_ids, qformer_valid)

    def embed(self, ids):
        return self.llm.embed(ids)

    def run_llm(self, **kwargs):
        return self.llm(**kwargs)

    def lm_logits(self, final_hidden):
        return self.llm.logits(final_hidden)

    def grounding_scores(self, query_hidden: jax.Array, frame_hidden: jax.Array) -> jax.Array:
        """``s[..., m, n] = <evi_head(h_m), frm_head(h_n)> / sqrt(d)``.

        query_hidden: float[B, ..., M, D]; frame_hidden: float[B, N, D] -> float32[B, ..., M, N].
        """
        q = self.evi_head(query_hidden).astype(jnp.float32)
        k = self.frm_head(frame_hidden).astype(jnp.float32)
        lead = q.shape[:-1]                                   # [B, ..., M]
        q = q.reshape(q.shape[0], -1, q.shape[-1])
        s = jnp.einsum("bmd,bnd->bmn", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
        return s.reshape(lead + s.shape[-1:])

    def evidence_embeddings(self, query_hidden):
        """evi_head output (for the consistency loss)."""
        return self.evi_head(query_hidden)

    def __call__(self, batch: Mapping[str, jax.Array]):
        """Touches every submodule once (used by ``init`` only)."""
        tokens = self.encode_video(batch["frames"], batch["frame_valid"], batch["qformer_ids"], batch["qformer_valid"])
        emb = self.embed(batch["prefix_ids"]) + tokens[:, :1] * 0
        layout = attn_lib.SequenceLayout.causal(batch["prefix_valid"])
        out = self.llm(inputs_embeds=emb, positions=attn_lib.positions_from_valid(batch["prefix_valid"]), layout=layout)
        return self.grounding_scores(out.final_hidden, out.final_hidden)


# ----------------------------------------------------------------------------- helpers


def gather_slots(x: jax.Array, index: jax.Array) -> jax.Array:
    """x: [B, T, ...], index: int[B, ...idx] -> [B, ...idx, ...]."""
    b = x.shape[0]
    flat = index.reshape(b, -1)
    out = jnp.take_along_axis(x, flat.reshape(flat.shape + (1,) * (x.ndim - 2)), axis=1)
    return out.reshape(index.shape + x.shape[2:])


def interval_weights(intervals: jax.Array, feature_valid: jax.Array) -> jax.Array:
    """Averaging weights of inclusive frame intervals.

    intervals: int32[B, M, 2]; feature_valid: bool[B, N] -> float32[B, M, N], rows sum to 1
    (or 0 when an interval covers no valid frame).
    """
    n = jnp.arange(feature_valid.shape[-1])
    inside = ((n >= intervals[..., :1]) & (n <= intervals[..., 1:]) & feature_valid[:, None, :]).astype(jnp.float32)
    return inside / jnp.maximum(inside.sum(-1, keepdims=True), 1.0)


def inject_evidence(embeds: jax.Array, token_positions: jax.Array, intervals: jax.Array, token_valid: jax.Array,
                    features: jax.Array, feature_valid: jax.Array) -> jax.Array:
    """Adds ``mean(features[s..e])`` to the embedding of every evidence token (SPEC §3.1).

    embeds: float[B, T, D]; token_positions: int32[B, M] slots in ``embeds``;
    intervals: int32[B, M, 2] inclusive frame intervals; token_valid: bool[B, M];
    features: float[B, N, D] (frame states of layer k_evi, or the input frame tokens for
    question-side evidence); feature_valid: bool[B, N].
    """
    ev = jnp.einsum("bmn,bnd->bmd", interval_weights(intervals, feature_valid), features.astype(jnp.float32))
    onehot = ((token_positions[..., None] == jnp.arange(embeds.shape[1])) & token_valid[..., None])
    added = jnp.einsum("bmt,bmd->btd", onehot.astype(jnp.float32), ev)
    return (embeds.astype(jnp.float32) + added).astype(embeds.dtype)


def build_prefix_embeds(model: D2VLM, variables, batch: Mapping[str, jax.Array], frame_tokens: jax.Array) -> jax.Array:
    """Prompt embeddings with frame tokens spliced at ``frame_positions`` and question-side
    ``<evi>`` tokens enriched with the mean input frame token of their interval: float[B, P, D]
    (with ``question_evidence="after_frames"`` only those placed after the frames)."""
    emb = model.apply(variables, batch["prefix_ids"], method=D2VLM.embed)
    p = emb.shape[1]
    frame_onehot = ((batch["frame_positions"][..., None] == jnp.arange(p)) & batch["frame_valid"][..., None])
    is_frame = frame_onehot.any(1)
    spliced = jnp.einsum("bnp,bnd->bpd", frame_onehot.astype(frame_tokens.dtype), frame_tokens)
    emb = jnp.where(is_frame[..., None], spliced.astype(emb.dtype), emb)
    question_valid = batch["question_evi_valid"].astype(bool)
    if model.config.question_evidence == "after_frames":
        last_frame = jnp.max(jnp.where(batch["frame_valid"], batch["frame_positions"], -1), axis=1, keepdims=True)
        question_valid = question_valid & (batch["question_evi_positions"] > last_frame)
    return inject_evidence(emb, batch["question_evi_positions"], batch["question_evi_intervals"],
                           question_valid, frame_tokens, batch["frame_valid"])


def prefix_layout(batch: Mapping[str, jax.Array]) -> attn_lib.SequenceLayout:
    """Prefix slots: causal, frames one bidirectional block (id 1), padding invalid."""
    p = batch["prefix_ids"].shape[1]
    is_frame = ((batch["frame_positions"][..., None] == jnp.arange(p)) & batch["frame_valid"][..., None]).any(1)
    valid = batch["prefix_valid"].astype(bool)
    return attn_lib.SequenceLayout(valid, jnp.zeros(valid.shape, jnp.int32), (is_frame & valid).astype(jnp.int32))


class Branches(NamedTuple):
    """Response branches packed after the prefix: index 0 = chosen, 1.. = rejected."""
    ids: jax.Array             # int32[B, C1, R]
    valid: jax.Array           # bool[B, C1, R]
    evi_positions: jax.Array   # int32[B, C1, M]
    evi_event: jax.Array       # int32[B, C1, M]
    evi_stage: jax.Array       # int32[B, C1, M]
    evi_valid: jax.Array       # bool[B, C1, M]
    event_intervals: jax.Array  # int32[B, C1, K, 2]
    event_valid: jax.Array     # bool[B, C1, K]

    @property
    def evi_intervals(self) -> jax.Array:
        """int32[B, C1, M, 2]: the interval of each evidence token's event."""
        idx = jnp.clip(self.evi_event, 0, self.event_intervals.shape[2] - 1)
        return jnp.take_along_axis(self.event_intervals, idx[..., None].repeat(2, -1), axis=2)


def branches_from_batch(batch: Mapping[str, jax.Array], with_rejected: bool) -> Branches:
    fields = ("ids", "valid", "evi_positions", "evi_event", "evi_stage", "evi_valid", "event_intervals", "event_valid")
    chosen = {"ids": batch["response_ids"], "valid": batch["response_valid"]}
    for f in fields[2:]:
        chosen[f] = batch[f]
    out = {}
    for f in fields:
        x = chosen[f][:, None]
        if with_rejected:
            x = jnp.concatenate([x, batch[f"rejected_{f}"]], axis=1)
        out[f] = x
    return Branches(**out)


class ForwardOutputs(NamedTuple):
    token_logp: jax.Array        # float32[B, C1, R]: log p(response token t)
    pred_logits: jax.Array | None  # float32[B, C1, R, V] (only when requested)
    scores: jax.Array            # float32[B, C1, M, N]: grounding logits of each evidence query
    evidence_embeddings: jax.Array  # float32[B, C1, M, D]: evi_head(h at evidence queries)
    frame_tokens: jax.Array      # float[B, N, D]
    frame_states: jax.Array      # float[B, N, D]: layer-k_evi states of the frames (F)


def forward(model: D2VLM, variables, batch: Mapping[str, jax.Array], *, with_rejected: bool = False,
            deterministic: bool = True, rngs: dict | None = None, return_logits: bool = False) -> ForwardOutputs:
    """The D²VLM forward pass over a padded batch (see ``d2vlm_jax.batch``).

    All response branches (chosen, plus the rejected ones when ``with_rejected``) run in one
    packed sequence after the prefix; branch ``c`` gets branch id ``c + 1`` so branches never
    see each other, and its positions restart after the prefix.
    """
    c = model.config
    cfg = c.llm
    L = cfg.num_layers
    calls = iter(range(1 << 30))

    def apply(*args, method, **kwargs):
        # every call gets its own dropout stream
        call_rngs = None if rngs is None else {k: jax.random.fold_in(v, next(calls)) for k, v in rngs.items()}
        return model.apply(variables, *args, method=method, rngs=call_rngs, **kwargs)


    frame_tokens = apply(batch["frames"], batch["frame_valid"], batch["qformer_ids"], batch["qformer_valid"],
                         method=D2VLM.encode_video)
    prefix_emb = build_prefix_embeds(model, variables, batch, frame_tokens)
    p_layout = prefix_layout(batch)
    p_positions = attn_lib.positions_from_valid(p_layout.valid)
    num_prefix = p_layout.valid.sum(-1).astype(jnp.int32)
    b, p = p_layout.valid.shape

    br = branches_from_batch(batch, with_rejected)
    c1, r = br.ids.shape[1:]
    branch_ids = jnp.broadcast_to((jnp.arange(c1, dtype=jnp.int32) + 1)[None, :, None], (b, c1, r))
    r_valid = br.valid.reshape(b, c1 * r).astype(bool)
    r_positions = attn_lib.positions_from_valid(br.valid.reshape(b * c1, r),
                                                jnp.repeat(num_prefix, c1)).reshape(b, c1 * r)
    full_layout = attn_lib.SequenceLayout(
        jnp.concatenate([p_layout.valid, r_valid], 1),
        jnp.concatenate([p_layout.branch, branch_ids.reshape(b, c1 * r)], 1),
        jnp.concatenate([p_layout.block, jnp.zeros((b, c1 * r), jnp.int32)], 1))
    # evidence-token slots in the packed response sequence
    evi_slots = br.evi_positions + (jnp.arange(c1, dtype=jnp.int32) * r)[None, :, None]

    def response_embeds(frame_states):
        emb = apply(br.ids.reshape(b, c1 * r), method=D2VLM.embed)
        return inject_evidence(emb, evi_slots.reshape(b, -1), br.evi_intervals.reshape(b, -1, 2),
                               br.evi_valid.reshape(b, -1), frame_states, batch["frame_valid"])

    llm_kw = dict(deterministic=deterministic, method=D2VLM.run_llm)
    if c.injection == "single_pass":
        pre = apply(inputs_embeds=prefix_emb, positions=p_positions, layout=p_layout,
                    cache=KVCache.zeros(cfg, b, p), query_start=0, output_hidden_layers=(c.k_evi, L - 1),
                    compute_logits=False, **llm_kw)
        frame_states = gather_slots(pre.hidden_states[c.k_evi], batch["frame_positions"])
        out = apply(inputs_embeds=response_embeds(frame_states), positions=r_positions, layout=full_layout,
                    cache=pre.cache.pad_to(p + c1 * r), query_start=p, output_hidden_layers=(L - 1,),
                    compute_logits=False, **llm_kw)
        prefix_h, prefix_final = pre.hidden_states[L - 1], pre.final_hidden
        resp_h, resp_final = out.hidden_states[L - 1], out.final_hidden
    else:  # the authors' two passes
        pre = apply(inputs_embeds=prefix_emb, positions=p_positions, layout=p_layout,
                    output_hidden_layers=(c.k_evi,), compute_logits=False, **llm_kw)
        # The authors' first pass runs the whole LLM forward (autograd then only goes back
        # through layers <= k_evi); without the barrier XLA would drop the forward of the
        # later layers (unused) and the baseline would not be their algorithm.
        hidden_k, _ = jax.lax.optimization_barrier(
            (pre.hidden_states[c.k_evi], jax.lax.stop_gradient(pre.final_hidden)))
        frame_states = gather_slots(hidden_k, batch["frame_positions"])
        full_emb = jnp.concatenate([prefix_emb, response_embeds(frame_states).astype(prefix_emb.dtype)], 1)
        out = apply(inputs_embeds=full_emb, positions=jnp.concatenate([p_positions, r_positions], 1),
                    layout=full_layout, output_hidden_layers=(L - 1,), compute_logits=False, **llm_kw)
        prefix_h, prefix_final = out.hidden_states[L - 1][:, :p], out.final_hidden[:, :p]
        resp_h, resp_final = out.hidden_states[L - 1][:, p:], out.final_hidden[:, p:]

    # The state that predicts response token t: the last prefix token for t = 0, else slot t-1.
    last = jnp.maximum(num_prefix - 1, 0)[:, None]

    def predictors(prefix_x, resp_x):
        d = resp_x.shape[-1]
        last_x = gather_slots(prefix_x, last)                          # [B, 1, D]
        resp_x = resp_x.reshape(b, c1, r, d)
        first = jnp.broadcast_to(last_x[:, None], (b, c1, 1, d))
        return jnp.concatenate([first.astype(resp_x.dtype), resp_x[:, :, :-1]], axis=2)  # [B, C1, R, D]

    pred_final = predictors(prefix_final, resp_final)
    pred_h = predictors(prefix_h, resp_h)
    logits = None
    if return_logits or not c.lm_logits_chunk:
        logits = apply(pred_final, method=D2VLM.lm_logits)              # [B, C1, R, V] float32
        logp = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(logp, br.ids[..., None], axis=-1)[..., 0]
    else:
        head = lambda x: model.apply(variables, x, method=D2VLM.lm_logits)  # noqa: E731
        token_logp = chunked_token_logp(head, pred_final.reshape(b, c1 * r, -1), br.ids.reshape(b, c1 * r),
                                        c.lm_logits_chunk).reshape(b, c1, r)

    query_h = jnp.take_along_axis(pred_h, jnp.clip(br.evi_positions, 0, r - 1)[..., None], axis=2)  # [B,C1,M,D]
    frame_h = gather_slots(prefix_h, batch["frame_positions"])            # [B, N, D]
    scores = apply(query_h, frame_h, method=D2VLM.grounding_scores)
    evidence_emb = apply(query_h, method=D2VLM.evidence_embeddings).astype(jnp.float32)
    return ForwardOutputs(token_logp, logits if return_logits else None, scores, evidence_emb,
                          frame_tokens, frame_states)


def chunked_token_logp(logits_fn, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """``log_softmax(logits_fn(hidden))[target]`` computed ``chunk`` tokens at a time.

    hidden: float[B, T, D]; targets: int32[B, T]; ``logits_fn``: float[B, c, D] ->
    float32[B, c, V]. Returns float32[B, T]. A ``lax.scan`` over token chunks (T padded to a
    multiple of ``chunk``) whose body is under ``jax.checkpoint``: forward and backward each
    hold one chunk's ``[B, chunk, V]`` logits; the backward recomputes them (one extra LM-head
    matmul). The batch axis stays first in every chunk, so its sharding is unchanged.
    """
    b, t, d = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, [(0, 0), (0, pad), (0, 0)])
    targets = jnp.pad(targets, [(0, 0), (0, pad)])
    xs = (hidden.reshape(b, n, chunk, d).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1))

    @jax.checkpoint
    def one_chunk(x, target):
        logits = logits_fn(x).astype(jnp.float32)                          # [B, chunk, V]
        target_logit = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return target_logit - jax.nn.logsumexp(logits, axis=-1)

    _, out = jax.lax.scan(lambda carry, xt: (carry, one_chunk(*xt)), None, xs)   # [n, B, chunk]
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def init_variables(config: D2VLMConfig, rng: jax.Array, batch: Mapping[str, jax.Array]):
    """Boxed variables (use under ``jax.eval_shape`` for shapes and shardings)."""
    return D2VLM(config).init(rng, batch)


def abstract_variables(config: D2VLMConfig, batch: Mapping[str, Any]):
    """Shapes (with logical-axis boxes) of the model's variables, without allocating."""
    return jax.eval_shape(lambda: init_variables(config, jax.random.key(0), batch))


def param_shardings(config: D2VLMConfig, batch: Mapping[str, Any], mesh) -> Any:
    return sharding.shardings_for(abstract_variables(config, batch), mesh, config.llm.sharding_rules)
