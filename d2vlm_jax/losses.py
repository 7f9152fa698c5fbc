"""SFT losses and the FPO loss (SPEC §3.3, §4.1), as pure functions of forward outputs.

Averaging follows the authors' code:
* ``L_lm``: mean token cross-entropy over the supervised response tokens of the batch.
* ``L_gnd = w_gnd * BCEWithLogits(s, y)``: mean over the (evidence query, valid frame) pairs
  of a sample, then averaged over the samples that have evidence.
* ``L_cons = w_cons * mean|evi(h_ground(k)) - evi(h_answer(k))|``: mean over the pairs'
  elements of a sample, averaged over the same samples as ``L_gnd``.
* ``L_FPO = -log sigmoid(beta * margin)``, averaged over the valid (prefix, rejected) pairs;
  ``beta`` is applied exactly once.

Every average divides by a denominator computed from the batch masks (:func:`normalizers`),
so every loss and metric is a *sum over samples* divided by a batch constant: micro-batch
shares computed with the whole batch's normalizers add up exactly to the whole-batch value.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from d2vlm_jax.models.d2vlm import ForwardOutputs, branches_from_batch

FPO_REFERENCES = ("none", "lora_disabled", "frozen_params")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    alpha: float = 2.0          # soft grounding target base
    gnd_weight: float = 10.0
    cons_weight: float = 10.0
    fpo_beta: float = 0.1
    fpo_weight: float = 1.0
    fpo_reference: str = "none"  # reference-free (authors), LoRA disabled, or frozen SFT params

    def __post_init__(self):
        if self.fpo_reference not in FPO_REFERENCES:
            raise ValueError(f"loss.fpo_reference must be one of {FPO_REFERENCES}, got {self.fpo_reference!r}")


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
            "samples_with_evidence": jnp.sum(has_evidence.astype(jnp.float32)),
            "evidence": jnp.sum((batch["evi_valid"].astype(bool) & frame_any[:, None]).astype(jnp.float32))}
    if "rejected_valid_pair" in batch:
        norm["pairs"] = jnp.sum(batch["rejected_valid_pair"].astype(jnp.float32))
    return norm


def sft_losses(out: ForwardOutputs, batch: Mapping[str, jax.Array], cfg: LossConfig,
               norm: Mapping[str, jax.Array] | None = None):
    """``L_sft = L_lm + L_gnd + L_cons`` on the chosen branch (index 0). Returns (loss, metrics).

    ``norm``: the batch's :func:`normalizers` (default: computed from ``batch``).
    """
    norm = normalizers(batch) if norm is None else norm
    br = branches_from_batch(batch, with_rejected=False)
    frame_valid = batch["frame_valid"].astype(bool)
    n = frame_valid.shape[-1]

    mask = batch["response_loss_mask"].astype(jnp.float32)
    lm = -_safe_div(jnp.sum(out.token_logp[:, 0] * mask), norm["tokens"])

    evi_valid = br.evi_valid[:, 0].astype(bool)                                   # [B, M]
    intervals = br.evi_intervals[:, 0]                                            # [B, M, 2]
    scores = out.scores[:, 0]                                                     # [B, M, N]
    y = soft_targets(intervals, n, cfg.alpha)
    pair = (evi_valid[:, :, None] & frame_valid[:, None, :]).astype(jnp.float32)
    bce_per_sample = _safe_div(jnp.sum(bce_with_logits(scores, y) * pair, (1, 2)), jnp.sum(pair, (1, 2)))
    has_evidence = (jnp.sum(pair, (1, 2)) > 0).astype(jnp.float32)
    num_with = norm["samples_with_evidence"]
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


def factorized_logps(out: ForwardOutputs, batch: Mapping[str, jax.Array], alpha: float):
    """``log π`` of chosen and rejected responses over each pair's conflict (SPEC §4.1).

    Returns dict of float32[B, C]: ``chosen_text``, ``chosen_grounding``, ``rejected_text``,
    ``rejected_grounding`` (C = rejected branches; the chosen terms are restricted to the
    conflict with each rejected branch).
    """
    br = branches_from_batch(batch, with_rejected=True)
    gll = grounding_loglik(out.scores, br.evi_intervals, batch["frame_valid"], alpha)    # [B, C1, M]
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


def fpo_loss(policy: Mapping[str, jax.Array], reference: Mapping[str, jax.Array] | None,
             pair_valid: jax.Array, beta: float, num_pairs: jax.Array | None = None):
    """DPO-style loss on factorized log-likelihoods. Returns (mean loss, metrics).

    ``reference=None`` is the authors' reference-free form. ``num_pairs``: the batch's
    number of valid pairs (default: from ``pair_valid``).
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
    num_pairs = jnp.sum(valid) if num_pairs is None else num_pairs
    mean = lambda x: _safe_div(jnp.sum(x * valid), num_pairs)  # noqa: E731
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
