"""Grounding-then-answering generation (SPEC §5): prefill once, then a jitted decode loop.

Algorithm (one padded batch, rows independent):

1. **Prefill.** Encode the video, build the prefix embeddings with
   :func:`~d2vlm_jax.models.d2vlm.build_prefix_embeds` (the function training uses) and run
   the prefix into a :class:`~d2vlm_jax.models.decoder.KVCache` of static size
   ``S = P + max_new_tokens`` (prefix slots ``[0, P)``, generated token ``i`` at slot
   ``P + i``). Kept from the prefix: the layer-``k_evi`` frame states ``F`` (SPEC §3.1) and
   the ``frm_head`` keys of the frames (from the second-to-last layer), computed once.
2. **Decode loop** (``jax.lax.while_loop``, static shapes, compiled once). At every step the
   hidden state of the current last position gives the next-token logits and the
   grounding probabilities ``p_t = sigmoid(s[last, t])`` over the valid frames. The token is
   chosen (greedy, or temperature / top-k / top-p sampling, optional repetition penalty);
   when it is ``<evi>`` its interval is
   :func:`~d2vlm_jax.evaluation.intervals.select_interval_jnp` of that ``p`` (computed only at
   steps where some row emits ``<evi>``; the evidence query is the position *before*
   ``<evi>``, SPEC §1.5; tie rule and arithmetic from the config), and the
   embedding fed back is ``embed(<evi>) + mean(F[first..last])`` through
   :func:`~d2vlm_jax.models.d2vlm.inject_evidence` (again the training function).
3. Rows stop independently at ``<|end|>`` (or any of ``stop_token_ids``). A finished row
   keeps emitting ``pad``; its later
   slots are never marked valid, so nothing it computes is ever attended to. The loop ends
   when every row has finished or after ``max_new_tokens`` steps.

Position ids continue from the number of valid prefix tokens (``P`` is a padded size; the
prefix padding slots stay invalid in the layout and are skipped).

Host-side helpers turn the output into per-row Python lists and :func:`render_answer` turns
a row into the SPEC §5.4 text, with the tokenizer kept abstract (a ``decode`` callable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2vlm_jax import sharding
from d2vlm_jax.evaluation.intervals import ARITHMETICS, DEFAULT_THRESHOLD, TIE_RULES, select_interval_jnp
from d2vlm_jax.evaluation.parsing import render_interval
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models.d2vlm import (D2VLM, build_prefix_embeds, gather_slots, inject_evidence,
                                    prefix_layout)
from d2vlm_jax.models.decoder import KVCache

# The batch fields generation reads (the prefix side of ``d2vlm_jax.batch``).
PREFIX_KEYS = ("frames", "frame_valid", "qformer_ids", "qformer_valid", "prefix_ids", "prefix_valid",
               "frame_positions", "question_evi_positions", "question_evi_intervals",
               "question_evi_valid")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding settings (hashable). Static: everything except the four sampling knobs
    ``temperature``, ``top_k``, ``top_p`` and ``repetition_penalty``, which are only the
    *defaults* of runtime arguments (changing them per call does not recompile; the penalty
    may differ per row).

    max_new_tokens: decode steps (the cache has ``P + max_new_tokens`` slots).
    evi_token_id / end_token_id: ids of ``<evi>`` and ``<|end|>``; ``end_token_id=None``
      never stops early (benchmarks).
    stop_token_ids: further ids that end a row (HF ``generate`` stops at every id of the
      generation config's ``eos_token_id``; Phi-3: ``<|endoftext|>``, ``<|assistant|>``,
      ``<|end|>``). The stop token is part of the output, as in HF.
    pad_token_id: emitted by rows that have finished.
    temperature: 0 = greedy decoding (argmax; static: a greedy config compiles no sampling
      code and ignores the PRNG); > 0 = sampling from softmax(logits / temperature).
    top_k: keep the ``top_k`` largest logits (ties with the k-th kept; HF's
      ``TopKLogitsWarper``, applied after the temperature). 0 = off. Sampling only.
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
      reaches ``top_p`` (the most likely token is always kept), after top-k. 1 = off.
    repetition_penalty: CTRL/HF rule: a logit ``l`` of a penalized token becomes ``l / r`` if
      ``l > 0`` else ``l * r`` (once per token, however often it occurred). 1 = off.
    penalize_prompt: the penalized tokens are the prompt's text tokens (frame slots excluded)
      and the generated ones (the authors' processor sees HF's whole ``input_ids``); False =
      the generated tokens only.
    penalty_exempt_ids: never penalized (the authors exempt ``<evi>``).
    evidence_threshold: relative threshold of the interval rule (SPEC §5.3).
    interval_tie_rule / interval_arithmetic: ``evaluation.intervals`` options (``"first"`` /
      ``"span"``; ``"exact"`` / ``"float16"`` / ``"bfloat16"``).
    return_probabilities: also return the grounding curve ``p`` of every ``<evi>`` step.
    """
    max_new_tokens: int
    evi_token_id: int
    end_token_id: int | None
    pad_token_id: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    penalize_prompt: bool = False
    penalty_exempt_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    evidence_threshold: float = DEFAULT_THRESHOLD
    interval_tie_rule: str = "first"
    interval_arithmetic: str = "exact"
    return_probabilities: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"DecodeConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"DecodeConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"DecodeConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"DecodeConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.evidence_threshold <= 1:
            raise ValueError(f"DecodeConfig.evidence_threshold must be in [0, 1], got {self.evidence_threshold}")
        if self.top_k < 0:
            raise ValueError(f"DecodeConfig.top_k must be >= 0, got {self.top_k}")
        if self.interval_tie_rule not in TIE_RULES:
            raise ValueError(f"DecodeConfig.interval_tie_rule must be one of {TIE_RULES}, got "
                             f"{self.interval_tie_rule!r}")
        if self.interval_arithmetic not in ARITHMETICS:
            raise ValueError(f"DecodeConfig.interval_arithmetic must be one of {ARITHMETICS}, got "
                             f"{self.interval_arithmetic!r}")
        object.__setattr__(self, "penalty_exempt_ids", tuple(int(i) for i in self.penalty_exempt_ids))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))

    @property
    def all_stop_ids(self) -> tuple[int, ...]:
        """``end_token_id`` and ``stop_token_ids`` (empty: never stop early)."""
        ids = () if self.end_token_id is None else (self.end_token_id,)
        return ids + tuple(i for i in self.stop_token_ids if i not in ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationOutput(NamedTuple):
    """What :func:`generate` returns (T = max_new_tokens, N = padded frames).

    tokens:          int32[B, T]      generated ids; ``pad_token_id`` after a row finished
    num_tokens:      int32[B]         tokens generated per row (the final ``<|end|>`` included)
    finished:        bool[B]          the row emitted ``<|end|>``
    token_logprobs:  float32[B, T]    log p of each generated token under the model (raw
                                      logits: before penalty, temperature and top-p); 0 after
                                      the row finished
    evi_intervals:   int32[B, T, 2]   at a step that emitted ``<evi>``: its ``[first, last]``
                                      frame interval (inclusive); ``[-1, -1]`` elsewhere
    evi_probs:       float32[B, T, N] (``return_probabilities`` only) the grounding curve ``p``
                                      that chose the interval, at ``<evi>`` steps; 0 elsewhere
    """
    tokens: jax.Array
    num_tokens: jax.Array
    finished: jax.Array
    token_logprobs: jax.Array
    evi_intervals: jax.Array
    evi_probs: jax.Array | None


class Prefill(NamedTuple):
    """State after the prefix pass (S = P + max_new_tokens slots)."""
    cache: KVCache             # float[L, B, S, Hkv, Dh] keys and values; slots >= P empty
    layout: attn_lib.SequenceLayout  # [B, S]; generated slots not yet valid
    num_prefix: jax.Array      # int32[B] valid prefix tokens (= first generated position id)
    frame_states: jax.Array    # float[B, N, D]: F, layer-k_evi states of the frames
    frame_keys: jax.Array      # float32[B, N, D]: frm_head(h^(L-1)) of the frames
    last_hidden: jax.Array     # float[B, D]: h^(L-1) of the last valid prefix token
    last_final: jax.Array      # float[B, D]: final-norm output of the last valid prefix token


# ----------------------------------------------------------------------------- model pieces


def _frame_keys(module: D2VLM, frame_hidden: jax.Array) -> jax.Array:
    return module.frm_head(frame_hidden).astype(jnp.float32)


def _evidence_queries(module: D2VLM, query_hidden: jax.Array) -> jax.Array:
    return module.evi_head(query_hidden).astype(jnp.float32)


def grounding_probs_from_keys(evidence_queries: jax.Array, frame_keys: jax.Array,
                              frame_valid: jax.Array) -> jax.Array:
    """``p[b, n] = sigmoid(<q_b, k_bn> / sqrt(d))``, 0 at padded frames.

    The score of :meth:`D2VLM.grounding_scores` with the frame keys computed once per video
    (the decode step only runs ``evi_head`` on one position). Equality with
    ``grounding_scores`` is tested.
    evidence_queries: float32[B, D]; frame_keys: float32[B, N, D]; frame_valid: bool[B, N]
    -> float32[B, N].
    """
    scores = jnp.einsum("bd,bnd->bn", evidence_queries, frame_keys) / jnp.sqrt(jnp.float32(frame_keys.shape[-1]))
    return jnp.where(frame_valid, jax.nn.sigmoid(scores), 0.0)


def prefill(model: D2VLM, variables, batch: Mapping[str, jax.Array], max_new_tokens: int) -> Prefill:
    """Runs the prompt+frames prefix once into a cache of ``P + max_new_tokens`` slots."""
    c = model.config
    num_layers = c.llm.num_layers
    apply = functools.partial(model.apply, variables)
    frame_tokens = apply(batch["frames"], batch["frame_valid"], batch["qformer_ids"], batch["qformer_valid"],
                         method=D2VLM.encode_video)
    prefix_emb = build_prefix_embeds(model, variables, batch, frame_tokens)
    p_layout = prefix_layout(batch)
    b, p = p_layout.valid.shape
    num_prefix = p_layout.valid.sum(-1).astype(jnp.int32)
    pre = apply(inputs_embeds=prefix_emb, positions=attn_lib.positions_from_valid(p_layout.valid), layout=p_layout,
                cache=KVCache.zeros(c.llm, b, p), query_start=0, output_hidden_layers=(c.k_evi, num_layers - 1),
                compute_logits=False, method=D2VLM.run_llm)
    frame_states = gather_slots(pre.hidden_states[c.k_evi], batch["frame_positions"])
    frame_hidden = gather_slots(pre.hidden_states[num_layers - 1], batch["frame_positions"])
    frame_keys = apply(frame_hidden, method=_frame_keys)
    last = jnp.maximum(num_prefix - 1, 0)
    empty = jnp.zeros((b, max_new_tokens), jnp.int32)
    layout = attn_lib.SequenceLayout(jnp.concatenate([p_layout.valid, empty.astype(bool)], 1),
                                     jnp.concatenate([p_layout.branch, empty], 1),
                                     jnp.concatenate([p_layout.block, empty], 1))
    return Prefill(pre.cache.pad_to(p + max_new_tokens), layout, num_prefix, frame_states, frame_keys,
                   gather_slots(pre.hidden_states[num_layers - 1], last[:, None])[:, 0],
                   gather_slots(pre.final_hidden, last[:, None])[:, 0])


# ----------------------------------------------------------------------------- token choice


class SamplingKnobs(NamedTuple):
    """Runtime sampling parameters (traced, so changing them never recompiles): float32
    scalars, ``top_k`` int32, ``repetition_penalty`` a scalar or float32[B] (one per row).
    ``temperature``, ``top_k`` and ``top_p`` are unused by a greedy config."""
    temperature: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    top_k: jax.Array

    @staticmethod
    def from_config(config: DecodeConfig, temperature: float | None = None, top_p: float | None = None,
                    repetition_penalty: float | Sequence[float] | None = None,
                    top_k: int | None = None) -> "SamplingKnobs":
        values = dict(temperature=config.temperature if temperature is None else temperature,
                      top_p=config.top_p if top_p is None else top_p,
                      repetition_penalty=(config.repetition_penalty if repetition_penalty is None
                                          else repetition_penalty),
                      top_k=config.top_k if top_k is None else top_k)
        for name, value in values.items():   # the same checks as DecodeConfig, for Python values
            if isinstance(value, (int, float)):
                dataclasses.replace(config, **{name: value})
            elif name == "repetition_penalty" and not isinstance(value, jax.Array):
                for v in np.asarray(value, np.float64).reshape(-1):
                    dataclasses.replace(config, repetition_penalty=float(v))
        if isinstance(values["temperature"], (int, float)) and (values["temperature"] == 0) != config.greedy:
            raise ValueError("generate: temperature 0 (greedy) and temperature > 0 (sampling) are different "
                             "compiled programs: choose one with DecodeConfig.temperature, then vary it "
                             f"within that mode (config {config.temperature}, call {values['temperature']})")
        return SamplingKnobs(**{k: jnp.asarray(v, jnp.int32 if k == "top_k" else jnp.float32)
                                for k, v in values.items()})


def _process_logits(logits: jax.Array, generated: jax.Array, knobs: SamplingKnobs, greedy: bool) -> jax.Array:
    """Repetition penalty, then (sampling only) temperature, top-k and top-p, on float32[B, V]
    logits (HF's order: processors, then warpers); ``generated``: bool[B, V] penalized tokens
    of each row. Removed tokens get -inf."""
    r = jnp.asarray(knobs.repetition_penalty, jnp.float32)
    r = r[:, None] if r.ndim == 1 else r
    logits = jnp.where(generated, jnp.where(logits > 0, logits / r, logits * r), logits)
    if greedy:
        return logits
    logits = logits / knobs.temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where((knobs.top_k > 0) & (knobs.top_k < vocab), knobs.top_k, vocab)
    kth = jax.lax.dynamic_index_in_dim(sorted_logits, k - 1, axis=-1, keepdims=True)   # [B, 1]
    sorted_logits = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)           # ties with the k-th stay
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < knobs.top_p) | (knobs.top_p >= 1.0)
    keep_sorted = keep_sorted.at[:, 0].set(True)                   # the most likely token always stays
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)           # ties with the cutoff stay too


def _choose(logits: jax.Array, rng: jax.Array, config: DecodeConfig) -> jax.Array:
    """int32[B] next tokens from processed float32[B, V] logits."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- generation


class _LoopState(NamedTuple):
    step: jax.Array            # int32[]
    cache: KVCache
    valid: jax.Array           # bool[B, S]
    last_hidden: jax.Array     # float[B, D]
    last_final: jax.Array      # float[B, D]
    done: jax.Array            # bool[B]
    generated: jax.Array       # bool[B, V] tokens each row has emitted (repetition penalty)
    rng: jax.Array
    out: GenerationOutput


def generate(model: D2VLM, variables, batch: Mapping[str, jax.Array], config: DecodeConfig,
             rng: jax.Array | None = None, knobs: SamplingKnobs | None = None) -> GenerationOutput:
    """Grounding-then-answering generation for a padded batch (pure; jit it, see
    :func:`make_generate_fn`).

    Args:
      model: the D2VLM module; variables: ``{"params": ...}``.
      batch: the prefix fields of ``d2vlm_jax.batch`` (:data:`PREFIX_KEYS`); response fields
        are ignored. A row whose prefix has no valid token is a padding row: it generates
        nothing (``num_tokens`` 0).
      config: static decoding settings.
      rng: PRNG key, required when ``config.temperature > 0``.
      knobs: runtime temperature / top-p / repetition penalty (default: the config's).
    Returns:
      :class:`GenerationOutput`.
    """
    c = model.config
    vocab = c.llm.vocab_size
    checked = [("evi_token_id", config.evi_token_id), ("end_token_id", config.end_token_id),
               ("pad_token_id", config.pad_token_id)]
    checked += [("stop_token_ids", i) for i in config.stop_token_ids]
    checked += [("penalty_exempt_ids", i) for i in config.penalty_exempt_ids]
    for name, token_id in checked:
        if token_id is not None and not 0 <= token_id < vocab:
            raise ValueError(f"DecodeConfig.{name}={token_id} outside the vocabulary [0, {vocab})")
    if not config.greedy and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs an rng key")
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    if knobs is None:
        knobs = SamplingKnobs.from_config(config)
    apply = functools.partial(model.apply, variables)
    num_layers = c.llm.num_layers
    steps = config.max_new_tokens
    pre = prefill(model, variables, batch, steps)
    frame_valid = batch["frame_valid"].astype(bool)
    b, p = batch["prefix_ids"].shape
    n = frame_valid.shape[1]

    out = GenerationOutput(
        tokens=jnp.full((b, steps), config.pad_token_id, jnp.int32),
        num_tokens=jnp.zeros((b,), jnp.int32),
        finished=jnp.zeros((b,), bool),
        token_logprobs=jnp.zeros((b, steps), jnp.float32),
        evi_intervals=jnp.full((b, steps, 2), -1, jnp.int32),
        evi_probs=jnp.zeros((b, steps, n), jnp.float32) if config.return_probabilities else None)
    exempt = jnp.zeros((vocab,), bool)
    if config.penalty_exempt_ids:
        exempt = exempt.at[jnp.asarray(config.penalty_exempt_ids, jnp.int32)].set(True)
    penalized = jnp.zeros((b, vocab), bool)
    if config.penalize_prompt:
        penalized = prompt_token_mask(batch, vocab)
    stop_ids = jnp.asarray(config.all_stop_ids or (-1,), jnp.int32)
    state = _LoopState(step=jnp.int32(0), cache=pre.cache, valid=pre.layout.valid,
                       last_hidden=pre.last_hidden, last_final=pre.last_final,
                       done=pre.num_prefix == 0,  # padding rows generate nothing
                       generated=penalized & ~exempt, rng=rng, out=out)

    def cond(s: _LoopState) -> jax.Array:
        return (s.step < steps) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        i = s.step
        active = ~s.done
        logits = apply(s.last_final[:, None], method=D2VLM.lm_logits)[:, 0]            # float32[B, V]
        queries = apply(s.last_hidden, method=_evidence_queries)                      # float32[B, D]
        probs = grounding_probs_from_keys(queries, pre.frame_keys, frame_valid)        # float32[B, N]
        rng, step_rng = jax.random.split(s.rng)
        token = _choose(_process_logits(logits, s.generated, knobs, config.greedy), step_rng, config)
        token = jnp.where(active, token, config.pad_token_id)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
        is_evi = active & (token == config.evi_token_id)
        interval = jax.lax.cond(                                                        # int32[B, 2]
            jnp.any(is_evi),
            lambda: select_interval_jnp(probs, frame_valid, config.evidence_threshold,
                                        tie_rule=config.interval_tie_rule, arithmetic=config.interval_arithmetic),
            lambda: jnp.full((b, 2), -1, jnp.int32))

        emb = apply(token[:, None], method=D2VLM.embed)                                # float[B, 1, D]
        emb = inject_evidence(emb, jnp.zeros((b, 1), jnp.int32), interval[:, None], is_evi[:, None],
                              pre.frame_states, frame_valid)
        slot = p + i
        valid = jax.lax.dynamic_update_slice_in_dim(s.valid, active[:, None], slot, axis=1)
        layout = attn_lib.SequenceLayout(valid, pre.layout.branch, pre.layout.block)
        positions = (pre.num_prefix + i)[:, None]
        res = apply(inputs_embeds=emb, positions=positions, layout=layout, cache=s.cache, query_start=slot,
                    output_hidden_layers=(num_layers - 1,), compute_logits=False, method=D2VLM.run_llm)

        o = s.out
        if not config.all_stop_ids:
            stopped = jnp.zeros_like(active)
        else:
            stopped = active & jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        evi_interval = jnp.where(is_evi[:, None], interval, -1)
        new_out = GenerationOutput(
            tokens=o.tokens.at[:, i].set(token),
            num_tokens=o.num_tokens + active.astype(jnp.int32),
            finished=o.finished | stopped,
            token_logprobs=o.token_logprobs.at[:, i].set(jnp.where(active, logprob, 0.0)),
            evi_intervals=o.evi_intervals.at[:, i].set(evi_interval),
            evi_probs=None if o.evi_probs is None else o.evi_probs.at[:, i].set(jnp.where(is_evi[:, None], probs, 0.0)))
        generated = s.generated | ((jnp.arange(vocab) == token[:, None]) & active[:, None] & ~exempt[None, :])
        return _LoopState(step=i + 1, cache=res.cache, valid=valid,
                          last_hidden=res.hidden_states[num_layers - 1][:, 0].astype(s.last_hidden.dtype),
                          last_final=res.final_hidden[:, 0].astype(s.last_final.dtype),
                          done=s.done | new_out.finished, generated=generated, rng=rng, out=new_out)

    return jax.lax.while_loop(cond, body, state).out


def prompt_token_mask(batch: Mapping[str, jax.Array], vocab: int) -> jax.Array:
    """bool[B, V]: the ids of each row's prompt text tokens (valid prefix slots that are not
    frame slots): what HF's ``input_ids`` holds before generation (the authors' single
    image placeholder -200 is never a vocabulary id)."""
    ids = batch["prefix_ids"]
    b, p = ids.shape
    is_frame = ((batch["frame_positions"][..., None] == jnp.arange(p)) & batch["frame_valid"][..., None]).any(1)
    text = batch["prefix_valid"].astype(bool) & ~is_frame
    ids = jnp.where(text, ids, vocab)                                   # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
    return jnp.zeros((b, vocab), bool).at[rows, ids].set(True, mode="drop")


def select_prefix_fields(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The fields generation reads; a missing one is a clear error."""
    missing = [k for k in PREFIX_KEYS if k not in batch]
    if missing:
        raise KeyError(f"generate: batch lacks the prefix field(s) {missing} (see d2vlm_jax/batch.py)")
    return {k: batch[k] for k in PREFIX_KEYS}


def make_generate_fn(model: D2VLM, config: DecodeConfig) -> Callable[..., GenerationOutput]:
    """A jitted ``fn(variables, batch, rng=None, *, temperature=None, top_k=None, top_p=None,
    repetition_penalty=None) -> GenerationOutput`` (None = the config's value;
    ``repetition_penalty`` may be one value per row).

    Host-only and response fields of the batch are dropped before the jitted call, so they
    never change its cache key. Same shapes => no recompilation, whatever the sampling
    knobs (tested). The jitted inner function is ``fn.jitted`` (``fn.jitted._cache_size()``).
    """
    jitted = jax.jit(lambda variables, batch, rng, knobs: generate(model, variables, batch, config, rng, knobs))
    program = sharding.compile_in_lockstep(jitted, "generate")

    def fn(variables, batch: Mapping[str, Any], rng: jax.Array | None = None, *, temperature: float | None = None,
           top_k: int | None = None, top_p: float | None = None,
           repetition_penalty: float | Sequence[float] | None = None) -> GenerationOutput:
        if rng is None:
            if not config.greedy:
                raise ValueError("generate: sampling (temperature > 0) needs an rng key")
            rng = jax.random.key(0)
        knobs = SamplingKnobs.from_config(config, temperature, top_p, repetition_penalty, top_k)
        rows = batch["prefix_ids"].shape[0]
        penalty = jnp.asarray(knobs.repetition_penalty, jnp.float32)
        if penalty.ndim == 1 and penalty.shape[0] != rows:
            raise ValueError(f"generate: {penalty.shape[0]} repetition penalties for {rows} rows")
        knobs = knobs._replace(repetition_penalty=jnp.broadcast_to(penalty, (rows,)))   # one shape: one program
        return program(variables, select_prefix_fields(batch), rng, knobs)

    fn.jitted = jitted
    return fn


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass
class RowResult:
    """One row of a :class:`GenerationOutput`, as Python values."""
    token_ids: list[int]                  # generated ids (the final <|end|> included)
    finished: bool
    evidence_intervals: list[tuple[int, int]]  # frame intervals of the <evi> tokens, in order
    evidence_probs: list[np.ndarray] | None    # float32[N] grounding curve of each <evi>


def unbatch(output: GenerationOutput, evi_token_id: int) -> list[RowResult]:
    """Splits a (device) :class:`GenerationOutput` into per-row :class:`RowResult`.

    A row without any valid frame gets ``(-1, -1)`` for each of its ``<evi>`` tokens
    (:func:`render_answer` rejects those with a clear error)."""
    host = jax.device_get(output)
    rows = []
    for r in range(host.tokens.shape[0]):
        count = int(host.num_tokens[r])
        ids = [int(t) for t in host.tokens[r, :count]]
        evi_steps = [i for i in range(count) if ids[i] == evi_token_id]
        intervals = [(int(host.evi_intervals[r, i, 0]), int(host.evi_intervals[r, i, 1])) for i in evi_steps]
        probs = None if host.evi_probs is None else [np.asarray(host.evi_probs[r, i]) for i in evi_steps]
        rows.append(RowResult(ids, bool(host.finished[r]), intervals, probs))
    return rows


def _pieces(token_ids: Sequence[int], cuts: Sequence[int], decode_fn: Callable[[Sequence[int]], str]) -> list[str]:
    """Text of ``token_ids[cuts[k]:cuts[k+1]]`` for consecutive cuts, decoded in context.

    ``decode(ids[:cut])`` differences keep the spacing a tokenizer produces between pieces
    (SentencePiece strips the leading space of a decode call's first token); where a
    decoder is not prefix-stable at a cut, the piece is decoded on its own.
    """
    texts, previous_text = [], ""
    for start, end in zip(cuts[:-1], cuts[1:]):
        full = decode_fn(list(token_ids[:end]))
        if full.startswith(previous_text):
            texts.append(full[len(previous_text):])
        else:
            texts.append(decode_fn(list(token_ids[start:end])))
        previous_text = full
    return texts


def render_answer(token_ids: Sequence[int], intervals: Sequence[tuple[int, int]],
                  decode_fn: Callable[[Sequence[int]], str], frame_times: Sequence[float], *,
                  evi_token_id: int, evi_end_token_id: int, stop_token_ids: Sequence[int] = (),
                  decimals: int = 1) -> tuple[str, list[tuple[float, float]]]:
    """The SPEC §5.4 output of one generated row.

    Args:
      token_ids: the row's generated ids (generation stops at the first of
        ``stop_token_ids``, e.g. ``<|end|>`` and pad; it is not rendered).
      intervals: the ``[first, last]`` frame interval of each ``<evi>`` in ``token_ids``, in
        order (``RowResult.evidence_intervals``).
      decode_fn: ``ids -> text``, e.g. ``TextTokenizer.decode`` (keeping special tokens, its
        default). It is called on prefixes of ``token_ids``; the text a ``<evi>`` adds is
        replaced by its interval (a space the tokenizer puts before it is kept).
      frame_times: float[N] timestamp in seconds of each frame (``batch["frame_times"][b]``).
    Returns:
      ``(answer_text, grounding_intervals_seconds)``: the text after the last ``</evi>``
      (everything when there is none) with every ``<evi>`` rendered as ``"{start} - {end}"``
      seconds (its own predicted interval), stripped; and the ``(start, end)`` seconds of the
      grounding-stage ``<evi>`` tokens (those before the first ``</evi>``; [] without one).
    Raises:
      ValueError: the number of intervals differs from the number of ``<evi>`` tokens, or an
        interval lies outside ``frame_times``.
    """
    ids = [int(t) for t in token_ids]
    stops = set(int(t) for t in stop_token_ids)
    for k, t in enumerate(ids):
        if t in stops:
            ids = ids[:k]
            break
    evi_at = [k for k, t in enumerate(ids) if t == evi_token_id]
    if len(evi_at) != len(intervals):
        raise ValueError(f"render_answer: {len(evi_at)} <evi> token(s) but {len(intervals)} interval(s)")
    times = np.asarray(frame_times, np.float64)
    seconds = []
    for k, (first, last) in enumerate(intervals):
        if not (0 <= first <= last < times.shape[0]):
            raise ValueError(f"render_answer: interval {k} = [{first}, {last}] outside the {times.shape[0]} "
                             f"frames of frame_times")
        seconds.append((float(times[first]), float(times[last])))
    ends = [k for k, t in enumerate(ids) if t == evi_end_token_id]
    grounding = [sec for k, sec in zip(evi_at, seconds) if ends and k < ends[0]]

    # ordinary text between special tokens is decoded in context; specials are rendered here
    special = sorted(evi_at + ends)
    cuts = sorted(set([0, len(ids)] + special + [k + 1 for k in special]))
    pieces = _pieces(ids, cuts, decode_fn)
    answer_from = ends[-1] + 1 if ends else 0
    evi_rank = {k: r for r, k in enumerate(evi_at)}
    parts = []
    for start, text in zip(cuts[:-1], pieces):
        if start < answer_from:
            continue
        if start in evi_rank:
            lead = text[:len(text) - len(text.lstrip())]   # keep the space before <evi>
            parts.append(lead + render_interval(*seconds[evi_rank[start]], decimals=decimals))
        else:
            parts.append(text)
    return "".join(parts).strip(), grounding


# ----------------------------------------------------------------------------- compile counting


@contextlib.contextmanager
def count_compilations() -> Iterator[list[float]]:
    """Counts XLA backend compilations inside the block: yields a list that gets one entry
    (the compile time in seconds) per compilation."""
    events: list[float] = []

    def listener(event: str, duration_secs: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
