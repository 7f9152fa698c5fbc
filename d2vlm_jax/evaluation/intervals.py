"""Evidence interval selection at inference (SPEC §5.3), in numpy and in jnp.

When the model emits ``<evi>``, its frame interval is read off the per-frame grounding
probabilities ``p_t = sigmoid(s[last, t])``:

1. drop every frame with ``p_t < threshold * max p`` (max over the valid frames; threshold
   0.6);
2. each maximal run of consecutive surviving frames is scored by its mean ``p``;
3. the run with the highest mean gives ``[first, last]``, an inclusive frame interval. On
   equal means the **tie rule** decides: ``"first"`` takes the earliest tied run (the
   project's original rule), ``"span"`` runs from the first tied run's start to the last
   tied run's end (the authors' ``find_and_merge``, which takes the first and last frame
   holding the maximal run mean).

**Arithmetic.** ``"exact"`` (default) compares ``p_t >= threshold * max p`` and the run
means as exact rationals: no two different means compare equal, whatever float32 would
round them to. Every surviving ``p_t`` lies within a factor 2 of ``max p``, so in units of
the float32 ulp of ``max p / 2`` it is an integer below 2^25; run sums are exact integer
sums (two int32 limbs), each mean is kept as ``quotient + remainder / length`` (long
division) and two means are compared by quotients, then by ``remainder_i * length_j``
against ``remainder_j * length_i`` (< 2^28). The threshold must be a rational with a small
denominator (0.6 = 3/5). ``"float16"`` / ``"bfloat16"`` reproduce the authors' arithmetic
in that dtype: ``p`` rounded to it, threshold ``dtype(float32(max p) * float32(0.6))``,
frames with ``p = 0`` never in a run, each run mean computed in float32 from the exact sum
and rounded to the dtype, and ties between those rounded means (frequent in fp16: 15–55 %
of real curves have tied runs). numpy and jnp compute the same integer / IEEE operations
and agree exactly (tested).

Degenerate curves (documented behaviour, tested):

* With ``max p > 0`` the frame holding the max always survives, so at least one run exists.
* All probabilities equal (including all zero) keeps every valid frame: one run of the valid
  frames (the authors' rule also returns ``[0, N - 1]`` for an all-zero curve).
* Padded (invalid) frames never survive and break runs.
* A row with no valid frame at all: the numpy function raises ``ValueError``; the jnp
  function (which cannot raise inside ``jit``) returns ``[-1, -1]`` for that row.
* Probabilities that are float32 subnormals (every logit below about -87) are not exact
  multiples of the ulp unit; they are truncated to it (sigmoid outputs are never that
  small in practice).
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_THRESHOLD = 0.6
TIE_RULES = ("first", "span")
ARITHMETICS = ("exact", "float16", "bfloat16")
MAX_THRESHOLD_DENOMINATOR = 63            # den * 2^25 must fit int32
MAX_FRAMES_EXACT = 1 << 14                # lengths <= 2^14 keep every product below 2^31
_LIMB = 13                                # q = high * 2^13 + low


def threshold_fraction(threshold: float) -> fractions.Fraction:
    """``threshold`` as the rational it reads as in decimal (0.6 -> 3/5); its denominator
    must be at most 63 (the exact comparison is done in int32)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"interval threshold must be in [0, 1], got {threshold}")
    frac = fractions.Fraction(repr(float(threshold)))
    if frac.denominator > MAX_THRESHOLD_DENOMINATOR:
        raise ValueError(f"interval threshold {threshold} = {frac}: the exact rule needs a denominator "
                         f"<= {MAX_THRESHOLD_DENOMINATOR} (e.g. 0.6 = 3/5)")
    return frac


def _check_options(tie_rule: str, arithmetic: str) -> None:
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")


def _max_frames(arithmetic: str) -> int:
    # 16-bit values are integers < 2^12 (fp16) / 2^9 (bf16) in their ulp unit: float32 run
    # sums stay exact while they are below 2^24.
    return {"exact": MAX_FRAMES_EXACT, "float16": 1 << 12, "bfloat16": 1 << 15}[arithmetic]


def _np_dtype(arithmetic: str):
    return jnp.float16 if arithmetic == "float16" else jnp.bfloat16


# ----------------------------------------------------------------------------- numpy


def _runs(kept: np.ndarray) -> list[tuple[int, int]]:
    runs, t, n = [], 0, kept.shape[0]
    while t < n:
        if kept[t]:
            first = t
            while t < n and kept[t]:
                t += 1
            runs.append((first, t - 1))
        else:
            t += 1
    return runs


def select_interval(probs: np.ndarray, valid: np.ndarray | None = None, threshold: float = DEFAULT_THRESHOLD,
                    *, tie_rule: str = "first", arithmetic: str = "exact") -> tuple[int, int]:
    """Selects the evidence interval of one ``<evi>`` token (numpy reference).

    Args:
      probs: float[N] per-frame grounding probabilities (non-negative).
      valid: bool[N] real (True) vs padded (False) frames; None = all frames valid.
      threshold: relative threshold; frames with ``p < threshold * max p`` are dropped.
      tie_rule: ``"first"`` | ``"span"`` (module docstring).
      arithmetic: ``"exact"`` | ``"float16"`` | ``"bfloat16"`` (module docstring).

    Returns:
      ``(first, last)``: inclusive frame indices of the selected run (or span of runs).

    Raises:
      ValueError: probs is not 1-D, shapes differ, no frame is valid, a valid probability
        is negative or not finite, or an option is unknown.
    """
    _check_options(tie_rule, arithmetic)
    frac = threshold_fraction(threshold)
    probs = np.asarray(probs)
    if probs.ndim != 1:
        raise ValueError(f"select_interval: probs must be float[N], got shape {probs.shape}")
    if valid is None:
        valid = np.ones(probs.shape, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != probs.shape:
        raise ValueError(f"select_interval: valid shape {valid.shape} != probs shape {probs.shape}")
    if not valid.any():
        raise ValueError("select_interval: no valid frame to select an interval from")
    p = np.where(valid, probs, 0).astype(np.float32)
    if not np.all(np.isfinite(p[valid])) or np.any(p[valid] < 0):
        raise ValueError("select_interval: valid probabilities must be finite and >= 0")

    if arithmetic == "exact":
        exact = [fractions.Fraction(float(x)) for x in p]
        top = max(x for x, v in zip(exact, valid) if v)
        kept = np.array([bool(v) and (top == 0 or x >= frac * top) for x, v in zip(exact, valid)])
        runs = _runs(kept)
        means = [sum(exact[first:last + 1], fractions.Fraction(0)) / (last - first + 1) for first, last in runs]
    else:
        dt = _np_dtype(arithmetic)
        p16 = p.astype(dt)
        top16 = p16[valid].max()
        cutoff = (np.float32(top16) * np.float32(threshold)).astype(dt)
        kept = valid & (p16 >= cutoff) & ((p16 > 0) | (top16 == 0))
        runs = _runs(kept)
        means = [(np.float32(p16[first:last + 1].astype(np.float32).sum()) / np.float32(last - first + 1)).astype(dt)
                 for first, last in runs]
    best = max(means)
    tied = [run for run, mean in zip(runs, means) if mean == best]
    if tie_rule == "first":
        return int(tied[0][0]), int(tied[0][1])
    return int(tied[0][0]), int(tied[-1][1])


# ----------------------------------------------------------------------------- jnp


def _segment_sums(values: jax.Array, run_id: jax.Array, num_frames: int) -> jax.Array:
    """Per-run sums of ``values`` [B, N] (run ``num_frames`` = not kept, dropped) -> [B, N]."""
    def per_row(v, r):
        return jax.ops.segment_sum(v, r, num_segments=num_frames + 1)[:num_frames]
    return jax.vmap(per_row)(values, run_id)


def _exact_better(q: jax.Array, run_id: jax.Array, counts: jax.Array, num_frames: int):
    """Exact run-mean comparison: returns ``(greater, equal)`` bool[B, N, N] with
    ``greater[b, i, j]`` = mean of run i > mean of run j (integer values ``q`` < 2^25)."""
    high = _segment_sums(q >> _LIMB, run_id, num_frames)                 # < L * 2^12
    low = _segment_sums(q & ((1 << _LIMB) - 1), run_id, num_frames)      # < L * 2^13
    high = high + (low >> _LIMB)
    low = low & ((1 << _LIMB) - 1)
    length = jnp.maximum(counts, 1)
    q_high, r_high = high // length, high % length
    t = r_high * (1 << _LIMB) + low                                      # < 2^27 + 2^13
    quotient = q_high * (1 << _LIMB) + t // length                       # floor(sum / length)
    remainder = t % length
    qi, qj = quotient[:, :, None], quotient[:, None, :]
    cross_i = remainder[:, :, None] * length[:, None, :]                 # < 2^28
    cross_j = remainder[:, None, :] * length[:, :, None]
    greater = (qi > qj) | ((qi == qj) & (cross_i > cross_j))
    equal = (qi == qj) & (cross_i == cross_j)
    return greater, equal


def select_interval_jnp(probs: jax.Array, valid: jax.Array, threshold: float = DEFAULT_THRESHOLD, *,
                        tie_rule: str = "first", arithmetic: str = "exact") -> jax.Array:
    """Batched, jit-friendly version of :func:`select_interval` (static shapes).

    Args:
      probs: float[B, N] per-frame grounding probabilities.
      valid: bool[B, N] real (True) vs padded (False) frames.
      threshold, tie_rule, arithmetic: static options (module docstring).

    Returns:
      int32[B, 2]: ``[first, last]`` inclusive frame indices per row; ``[-1, -1]`` for a
      row without any valid frame.
    """
    _check_options(tie_rule, arithmetic)
    frac = threshold_fraction(threshold)
    if probs.ndim != 2 or valid.shape != probs.shape:
        raise ValueError(f"select_interval_jnp: need probs float[B, N] and valid bool[B, N], "
                         f"got {probs.shape} and {valid.shape}")
    num_frames = probs.shape[1]
    if num_frames > _max_frames(arithmetic):
        raise ValueError(f"select_interval_jnp: {num_frames} frames > {_max_frames(arithmetic)}, the most the "
                         f"{arithmetic!r} arithmetic keeps exact")
    valid = valid.astype(bool)
    p = jnp.where(valid, probs, 0).astype(jnp.float32)
    any_valid = jnp.any(valid, axis=1)

    if arithmetic == "exact":
        top = jnp.max(jnp.where(valid, p, 0.0), axis=1, keepdims=True)         # [B, 1], p >= 0
        _, exponent = jnp.frexp(top)                                          # top = m 2^x, m in [0.5, 1)
        candidate = valid & (p >= jnp.ldexp(jnp.ones_like(top), exponent - 2))  # p >= top's binade / 2
        q = jnp.where(candidate, jnp.ldexp(p, 25 - exponent), 0.0).astype(jnp.int32)   # integers < 2^25
        q_top = jnp.ldexp(top, 25 - exponent).astype(jnp.int32)
        passes = candidate & (frac.denominator * q >= frac.numerator * q_top)
        kept = jnp.where((top > 0) & (frac.numerator > 0), passes, valid)
    else:
        dt = _np_dtype(arithmetic)
        p16 = p.astype(dt)
        top16 = jnp.max(jnp.where(valid, p16, jnp.zeros((), dt)), axis=1, keepdims=True)
        cutoff = (top16.astype(jnp.float32) * jnp.float32(threshold)).astype(dt)
        kept = valid & (p16 >= cutoff) & ((p16 > 0) | (top16 == 0))

    previous_kept = jnp.pad(kept[:, :-1], ((0, 0), (1, 0)))
    run_starts = kept & ~previous_kept
    run_id = jnp.cumsum(run_starts.astype(jnp.int32), axis=1) - 1            # [B, N]
    run_id = jnp.where(kept, run_id, num_frames)                             # not kept: dump segment
    counts = _segment_sums(jnp.ones_like(run_id), run_id, num_frames)        # [B, N] run lengths
    exists = counts > 0

    if arithmetic == "exact":
        greater, _ = _exact_better(q, run_id, counts, num_frames)
        beaten = jnp.any(greater & exists[:, :, None], axis=1)              # some run i beats run j
        is_best = exists & ~beaten                                           # [B, N] runs of maximal mean
    else:
        sums = _segment_sums(p16.astype(jnp.float32), run_id, num_frames)     # exact float32 sums
        means = (sums / jnp.maximum(counts, 1).astype(jnp.float32)).astype(dt)
        means = jnp.where(exists, means.astype(jnp.float32), -jnp.inf)
        is_best = exists & (means == jnp.max(means, axis=1, keepdims=True))

    run_index = jnp.arange(num_frames, dtype=jnp.int32)[None, :]
    first_best = jnp.min(jnp.where(is_best, run_index, num_frames), axis=1)
    last_best = first_best if tie_rule == "first" else jnp.max(jnp.where(is_best, run_index, -1), axis=1)
    frame_index = jnp.arange(num_frames, dtype=jnp.int32)[None, :]
    first = jnp.min(jnp.where(kept & (run_id == first_best[:, None]), frame_index, num_frames), axis=1)
    last = jnp.max(jnp.where(kept & (run_id == last_best[:, None]), frame_index, -1), axis=1)
    first = jnp.where(any_valid, first, -1)
    last = jnp.where(any_valid, last, -1)
    return jnp.stack([first, last], axis=1).astype(jnp.int32)
