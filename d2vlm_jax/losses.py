"""SFT losses and the FPO loss (SPEC §3.3, §4.1), as pure functions of forward outputs.

Per sample (every average below is first taken within one sample):
* ``L_lm``: token cross-entropy over the sample's supervised response tokens;
* ``L_gnd = w_gnd * BCEWithLogits(s, y)``: mean over its (evidence query, valid frame) pairs;
* ``L_cons = w_cons * mean|evi(h_ground(k)) - evi(h_answer(k))|``: mean over its pairs'
  elements;
* ``L_FPO = -log sigmoid(beta * margin)`` over its valid (prefix, rejected) pairs; ``beta``
  is applied exactly once.

How samples are combined is ``LossConfig.normalization``:
* ``"sample"`` (default; the authors' runs: batch 1 per device and gradient accumulation,
  which HF's Trainer averages with equal weights): every term is the plain mean over the
  batch's samples of the sample's own average (``L_lm`` its token mean; ``L_gnd`` /
  ``L_cons`` / ``L_FPO`` 0 for a sample without evidence / pairs, which still counts);
* ``"token"`` (the project's original form): ``L_lm`` is the token mean over all supervised
  tokens of the batch, ``L_gnd`` / ``L_cons`` average over the samples that have evidence,
  ``L_FPO`` over all valid pairs.

Every average divides by a denominator computed from the batch masks (:func:`normalizers`),
so every loss and metric is a *sum over samples* divided by a batch constant: micro-batch
shares computed with the whole batch's normalizers add up exactly to the whole-batch value
(in both modes: a sample's own averages never look at other samples).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from d2vlm_jax.models.d2vlm import ForwardOutputs, branches_from_batch

FPO_REFERENCES = ("none", "lora_disabled", "frozen_params")
NORMALIZATIONS = ("sample", "token")
FPO_GROUNDING_TARGETS = ("seconds", "frames")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    alpha: float = 2.0          # soft grounding target base
    gnd_weight: float = 10.0
    cons_weight: float = 10.0
    fpo_beta: float = 0.1
    fpo_weight: float = 1.0
    fpo_reference: str = "none"  # reference-free (authors), LoRA disabled, or frozen SFT params
    # module docstring; "sample" = the authors' batch-1 + accumulation (docs/ARCHITECTURE.md
    # "Training semantics"), "token" = the project's original token mean
    normalization: str = "sample"
    # FPO grounding log-likelihood targets: "seconds" = the preference pair's raw (float)
    # interval mapped to fractional frame positions (the authors'), "frames" = rounded to frames
    fpo_grounding_targets: str = "seconds"

    def __post_init__(self):
        if self.fpo_reference not in FPO_REFERENCES:
            raise ValueError(f"loss.fpo_reference must be one of {FPO_REFERENCES}, got {self.fpo_reference!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"loss.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.fpo_grounding_targets not in FPO_GROUNDING_TARGETS:
            raise ValueError(f"loss.fpo_grounding_targets must be one of {FPO_GROUNDING_TARGETS}, got "
                             f"{self.fpo_grounding_targets!r}")


def interval_distances(intervals: jax.Array, num_frames: int) -> jax.Array:
    """``dist(t, [s, e]) = max(s - t, 0) + max(t - e, 0)`` (0 inside), in frames.

    intervals: int32 or float32[..., 2] ``[start, end]`` in frame units (float intervals
    are the raw fractional positions of the FPO preference pairs) -> float32[..., N].
    """
    t = jnp.arange(num_frames, dtype=jnp.float32)
    s = intervals[..., :1].astype(jnp.float32)
    e = intervals[..., 1:].astype(jnp.float32)
    return jnp.maximum(s - t, 0.0) + jnp.maximum(t - e, 0.0)


def soft_targets(intervals: jax.Array, num_frames: int, alpha: float) -> jax.Array:
    """``y[..., t] = alpha ** -dist(t, [s, e])`` (1 inside): int32/float32[..., 2] -> float32[..., N]."""
    return jnp.power(jnp.float32(alpha), -interval_distances(intervals, num_frames))


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise ``BCEWithLogits`` (soft targets), numerically stable."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _safe_div(num, den):
    return num / jnp.maximum(den, 1.0)


def normalizers(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The denominators of every batch average, from the batch masks alone.

    Passing the normalizers of a whole batch to the losses of its micro-batches makes the
    accumulated loss and gradient exactly those of the whole batch.
    """
    frame_any = batch["frame_valid"].astype(bool).any(-1)
    has_evidence = batch["evi_valid"].astype(bool).any(-1) & frame_any
    norm = {"tokens": jnp.sum(batch["response_loss_mask"].astype(jnp.float32)),
            "samples": jnp.sum(batch["response_loss_mask"].astype(bool).any(-1).astype(jnp.float32)),
            "samples_with_evidence": jnp.sum(has_evidence.astype(jnp.float32)),
            "evidence": jnp.sum((batch["evi_valid"].astype(bool) & frame_any[:, None]).astype(jnp.float32))}
    if "rejected_valid_pair" in batch:
        norm["pairs"] = jnp.sum(batch["rejected_valid_pair"].astype(jnp.float32))
    return norm


def metric_normalizer(cfg: LossConfig, key: str) -> str:
    """The :func:`normalizers` entry that ``key`` (``loss/lm``, ``loss/gnd``, ``loss/cons``,
    ``grounding/accuracy``) is a sum divided by: how batch means combine over batches."""
    if key == "grounding/accuracy":
        return "evidence"
    if cfg.normalization == "sample":
        return "samples"
    return "tokens" if key == "loss/lm" else "samples_with_evidence"


def sft_losses(out: ForwardOutputs, batch: Mapping[str, jax.Array], cfg: LossConfig,
               norm: Mapping[str, jax.Array] | None = None):
    """``L_sft = L_lm + L_gnd + L_cons`` on the chosen branch (index 0). Returns (loss, metrics).

    ``norm``: the batch's :func:`normalizers` (default: computed from ``batch``).
    """
    per_sample = cfg.normalization == "sample"
    norm = normalizers(batch) if norm is None else norm
    br = branches_from_batch(batch, with_rejected=False)
    frame_valid = batch["frame_valid"].astype(bool)
    n = frame_valid.shape[-1]

    mask = batch["response_loss_mask"].astype(jnp.float32)
    if per_sample:
        token_weights = mask / (jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0) * jnp.maximum(norm["samples"], 1.0))
        lm = -jnp.sum(out.token_logp[:, 0] * token_weights)
    else:
        lm = -_safe_div(jnp.sum(out.token_logp[:, 0] * mask), norm["tokens"])

    evi_valid = br.evi_valid[:, 0].astype(bool)                                   # [B, M]
    intervals = br.evi_intervals[:, 0]                                            # [B, M, 2]
    scores = out.scores[:, 0]                                                     # [B, M, N]
    y = soft_targets(intervals, n, cfg.alpha)
    pair = (evi_valid[:, :, None] & frame_valid[:, None, :]).astype(jnp.float32)
    bce_per_sample = _safe_div(jnp.sum(bce_with_logits(scores, y) * pair, (1, 2)), jnp.sum(pair, (1, 2)))
    has_evidence = (jnp.sum(pair, (1, 2)) > 0).astype(jnp.float32)
    num_with = norm["samples"] if per_sample else norm["samples_with_evidence"]
    gnd = cfg.gnd_weight * _safe_div(jnp.sum(bce_per_sample * has_evidence), num_with)

    # consistency: grounding-stage vs answer-stage evidence query of the same event
    k = br.event_valid.shape[-1]
    ev = jax.nn.one_hot(br.evi_event[:, 0], k, dtype=jnp.float32) * evi_valid[..., None]    # [B, M, K]
    ground = ev * (br.evi_stage[:, 0] == 0)[..., None]
    answer = ev * (br.evi_stage[:, 0] == 1)[..., None]
    emb = out.evidence_embeddings[:, 0]                                            # [B, M, D]
    g = jnp.einsum("bmk,bmd->bkd", ground, emb)
    a = jnp.einsum("bmk,bmd->bkd", answer, emb)
    pair_valid = ((ground.sum(1) > 0) & (answer.sum(1) > 0)).astype(jnp.float32)   # [B, K]
    d = emb.shape[-1]
    l1_per_sample = _safe_div(jnp.sum(jnp.abs(g - a).sum(-1) * pair_valid, -1), jnp.sum(pair_valid, -1) * d)
    cons = cfg.cons_weight * _safe_div(jnp.sum(l1_per_sample * has_evidence), num_with)

    # teacher-forced grounding accuracy: argmax frame inside the GT interval
    masked = jnp.where(frame_valid[:, None, :], scores, -jnp.inf)
    argmax = jnp.argmax(masked, -1)
    hit = (argmax >= intervals[..., 0]) & (argmax <= intervals[..., 1])
    acc = _safe_div(jnp.sum(hit * evi_valid * frame_valid.any(-1)[:, None]), norm["evidence"])

    loss = lm + gnd + cons
    metrics = {"loss/lm": lm, "loss/gnd": gnd, "loss/cons": cons, "loss/sft": loss,
               "grounding/accuracy": acc}
    return loss, metrics


LOGLIK_EPS = 1e-10   # the authors' additive constant inside the log


def log_bernoulli_mixture(scores: jax.Array, log_y: jax.Array, log_1my: jax.Array,
                          eps: float = LOGLIK_EPS) -> jax.Array:
    """``log(y p + (1 - y)(1 - p) + eps)`` with ``p = sigmoid(scores)``, in log space.

    The three terms are ``log y + log_sigmoid(s)``, ``log(1 - y) + log_sigmoid(-s)`` and
    ``log eps``; their log-sum-exp is taken around the largest with ``log1p`` of the rest,
    so the result keeps float32 relative accuracy for any ``|s|`` (a float32 ``sigmoid``
    rounds to 1 beyond |s| ~ 17 and the direct formula then returns ``log(eps)`` for the
    ``(1 - y)(1 - p)`` term). ``log_y`` / ``log_1my`` may be ``-inf`` (y exactly 1 or 0):
    that term then contributes nothing, and the gradient stays finite.

    scores, log_y, log_1my: broadcastable float arrays -> float32 of their broadcast shape.
    """
    s = scores.astype(jnp.float32)
    pos, neg = jnp.broadcast_arrays(log_y.astype(jnp.float32) + jax.nn.log_sigmoid(s),
                                    log_1my.astype(jnp.float32) + jax.nn.log_sigmoid(-s))
    log_eps = jnp.log(jnp.float32(eps))
    # log-sum-exp = top + log1p(the other terms relative to it): the largest term is taken
    # out of the sum exactly (an equal second largest adds exactly 1), so a tiny remainder
    # (eps next to p ~ 1) is not lost in ``1 + tiny``; the eps term enters as
    # ``eps * exp(-top)`` (top >= log eps, no overflow), not through the rounded log eps.
    # The gradient of ``top`` goes to the largest term (split over ties), which makes the
    # whole expression's gradient the softmax-weighted one.
    top = jnp.maximum(jnp.maximum(pos, neg), log_eps)

    def share(term):
        below = term < top
        return jnp.where(below, jnp.exp(jnp.where(below, term - top, 0.0)), 0.0), jnp.where(below, 0.0, 1.0)

    (pos_share, pos_tie), (neg_share, neg_tie) = share(pos), share(neg)
    eps_below = log_eps < top
    eps_share = jnp.where(eps_below, jnp.float32(eps) * jnp.exp(-top), 0.0)
    extra_ties = pos_tie + neg_tie + jnp.where(eps_below, 0.0, 1.0) - 1.0     # integer-valued, exact
    rest = pos_share + neg_share + eps_share + extra_ties
    return top + jnp.log1p(rest)


def soft_target_logs(intervals: jax.Array, num_frames: int, alpha: float) -> tuple[jax.Array, jax.Array]:
    """``(log y, log(1 - y))`` of :func:`soft_targets`, computed from the distance itself:
    ``log y = -dist log alpha`` and ``log(1 - y) = log(-expm1(log y))`` (``-inf`` inside the
    interval), both exact where ``y`` itself would underflow or round to 1."""
    log_y = -interval_distances(intervals, num_frames) * jnp.log(jnp.float32(alpha))
    return log_y, jnp.log(-jnp.expm1(log_y))


def grounding_loglik(scores: jax.Array, intervals: jax.Array, frame_valid: jax.Array, alpha: float) -> jax.Array:
    """Per-evidence Bernoulli log-likelihood of the soft frame mask (SPEC §4.1).

    ``sum_t log(y p + (1 - y)(1 - p) + 1e-10)`` over valid frames (the authors' formula),
    computed in log space (:func:`log_bernoulli_mixture`): float32[..., M].
    scores: float32[B, ..., M, N]; intervals: int32 or float32[B, ..., M, 2] in frame units;
    frame_valid: bool[B, N].
    """
    log_y, log_1my = soft_target_logs(intervals, scores.shape[-1], alpha)
    ll = log_bernoulli_mixture(scores, log_y, log_1my)
    fv = frame_valid.reshape(frame_valid.shape[:1] + (1,) * (scores.ndim - 2) + frame_valid.shape[1:])
    return jnp.sum(jnp.where(fv, ll, 0.0), -1)


def evidence_frame_positions(batch: Mapping[str, jax.Array]) -> jax.Array:
    """float32[B, C1, M, 2]: the unrounded fractional frame interval of every evidence token of
    every branch (chosen first), from ``event_frame_positions`` / ``rejected_event_frame_positions``."""
    br = branches_from_batch(batch, with_rejected=True)
    events = jnp.concatenate([batch["event_frame_positions"][:, None],
                              batch["rejected_event_frame_positions"]], axis=1)        # [B, C1, K, 2]
    idx = jnp.clip(br.evi_event, 0, events.shape[2] - 1)
    return jnp.take_along_axis(events, idx[..., None].repeat(2, -1), axis=2)


def factorized_logps(out: ForwardOutputs, batch: Mapping[str, jax.Array], alpha: float,
                     targets: str = "frames"):
    """``log π`` of chosen and rejected responses over each pair's conflict (SPEC §4.1).

    ``targets``: ``"frames"`` = the grounding log-likelihood's soft targets from the rounded
    frame intervals; ``"seconds"`` = from the events' unrounded fractional frame positions
    (the authors': their float-second intervals against 1 fps frame indices).
    Returns dict of float32[B, C]: ``chosen_text``, ``chosen_grounding``, ``rejected_text``,
    ``rejected_grounding`` (C = rejected branches; the chosen terms are restricted to the
    conflict with each rejected branch).
    """
    if targets not in FPO_GROUNDING_TARGETS:
        raise ValueError(f"factorized_logps: targets must be one of {FPO_GROUNDING_TARGETS}, got {targets!r}")
    br = branches_from_batch(batch, with_rejected=True)
    intervals = br.evi_intervals if targets == "frames" else evidence_frame_positions(batch)
    gll = grounding_loglik(out.scores, intervals, batch["frame_valid"], alpha)           # [B, C1, M]
    gll = gll * br.evi_valid
    tok = out.token_logp * br.valid                                                      # [B, C1, R]
    ctm = batch["conflict_token_mask"].astype(jnp.float32)                               # [B, C, R]
    cem = batch["conflict_evi_mask"].astype(jnp.float32)                                 # [B, C, M]
    rtm = batch["rejected_conflict_token_mask"].astype(jnp.float32)
    rem = batch["rejected_conflict_evi_mask"].astype(jnp.float32)
    return {
        "chosen_text": jnp.einsum("br,bcr->bc", tok[:, 0], ctm),
        "chosen_grounding": jnp.einsum("bm,bcm->bc", gll[:, 0], cem),
        "rejected_text": jnp.sum(tok[:, 1:] * rtm, -1),
        "rejected_grounding": jnp.sum(gll[:, 1:] * rem, -1),
    }


def fpo_pair_weights(pair_valid: jax.Array, cfg: LossConfig, norm: Mapping[str, jax.Array]) -> jax.Array:
    """float32[B, C] weight of each (prefix, rejected) pair in the FPO mean: ``1 / pairs``
    of the batch (``"token"``), or ``1 / (pairs of its sample * samples)`` (``"sample"``)."""
    valid = pair_valid.astype(jnp.float32)
    if cfg.normalization == "sample":
        return _safe_div(_safe_div(valid, jnp.sum(valid, -1, keepdims=True)), norm["samples"])
    return _safe_div(valid, norm["pairs"])


def fpo_loss(policy: Mapping[str, jax.Array], reference: Mapping[str, jax.Array] | None,
             pair_valid: jax.Array, beta: float, num_pairs: jax.Array | None = None,
             pair_weights: jax.Array | None = None):
    """DPO-style loss on factorized log-likelihoods. Returns (mean loss, metrics).

    ``reference=None`` is the authors' reference-free form. ``num_pairs``: the batch's
    number of valid pairs (default: from ``pair_valid``). ``pair_weights``: float32[B, C]
    weights of the mean instead (:func:`fpo_pair_weights`); the metrics use them too.
    """
    pi_w = policy["chosen_text"] + policy["chosen_grounding"]
    pi_l = policy["rejected_text"] + policy["rejected_grounding"]
    if reference is not None:
        pi_w = pi_w - jax.lax.stop_gradient(reference["chosen_text"] + reference["chosen_grounding"])
        pi_l = pi_l - jax.lax.stop_gradient(reference["rejected_text"] + reference["rejected_grounding"])
    reward_w, reward_l = beta * pi_w, beta * pi_l
    margin = reward_w - reward_l
    losses = -jax.nn.log_sigmoid(margin)
    valid = pair_valid.astype(jnp.float32)
    if pair_weights is None:
        num_pairs = jnp.sum(valid) if num_pairs is None else num_pairs
        pair_weights = _safe_div(valid, num_pairs)
    mean = lambda x: jnp.sum(x * pair_weights * valid)  # noqa: E731
    metrics = {
        "loss/fpo": mean(losses),
        "rewards/chosen": mean(reward_w),
        "rewards/rejected": mean(reward_l),
        "rewards/margin": mean(margin),
        "rewards/accuracy": mean((margin > 0).astype(jnp.float32)),
        "fpo/text_margin": mean(policy["chosen_text"] - policy["rejected_text"]),
        "fpo/grounding_margin": mean(policy["chosen_grounding"] - policy["rejected_grounding"]),
    }
    return mean(losses), metrics
