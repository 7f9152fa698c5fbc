"""Evidence interval selection at inference (SPEC §5.3), in numpy and in jnp.

When the model emits ``<evi>``, its frame interval is read off the per-frame grounding
probabilities ``p_t = sigmoid(s[last, t])``:

1. zero every ``p_t < threshold * max p`` (max over the valid frames; threshold 0.6);
2. each maximal run of consecutive frames that survive is scored by its mean ``p``;
3. the run with the highest mean (the earliest run on ties) gives ``[first, last]``,
   an inclusive frame interval.

Degenerate curves (documented behaviour, tested):

* With ``max p > 0`` the frame holding the max always survives, so at least one run
  exists: "every frame below the threshold" cannot happen.
* All probabilities equal (including all zero) keeps every valid frame. The authors' rule
  "runs of non-zero frames" would find no run at all when every ``p`` is exactly 0 (a
  float32 sigmoid can underflow); we define surviving frames as ``p_t >= threshold * max p``
  instead, which is the same set whenever ``max p > 0`` and keeps all valid frames when the
  curve is flat at 0, so the selection is then the first run of valid frames ("no
  preference: the whole clip").
* Padded (invalid) frames never survive: they also break runs, so a run never spans a gap
  of padding.
* A row with no valid frame at all: the numpy function raises ``ValueError``; the jnp
  function (which cannot raise inside ``jit``) returns ``[-1, -1]`` for that row.

Both versions compute in float32 (threshold product, run sums, run means) so that they
agree exactly on the same inputs; run sums are exact whenever the probabilities are
multiples of a power of two, which the agreement tests use to make ties common.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_THRESHOLD = 0.6


def select_interval(probs: np.ndarray, valid: np.ndarray | None = None,
                    threshold: float = DEFAULT_THRESHOLD) -> tuple[int, int]:
    """Selects the evidence interval of one ``<evi>`` token (numpy reference).

    Args:
      probs: float[N] per-frame grounding probabilities (non-negative).
      valid: bool[N] real (True) vs padded (False) frames; None = all frames valid.
      threshold: relative threshold; frames with ``p < threshold * max p`` are dropped.

    Returns:
      ``(first, last)``: inclusive frame indices of the selected run.

    Raises:
      ValueError: probs is not 1-D, shapes differ, no frame is valid, or a valid
        probability is negative or not finite.
    """
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
    valid_p = p[valid]
    if not np.all(np.isfinite(valid_p)) or np.any(valid_p < 0):
        raise ValueError("select_interval: valid probabilities must be finite and >= 0")
    cutoff = np.float32(threshold) * valid_p.max()
    kept = valid & (p >= cutoff)

    best_mean, best_run = np.float32(-np.inf), (-1, -1)
    n = p.shape[0]
    t = 0
    while t < n:
        if not kept[t]:
            t += 1
            continue
        first = t
        run_sum = np.float32(0.0)
        while t < n and kept[t]:
            run_sum = np.float32(run_sum + p[t])
            t += 1
        last = t - 1
        mean = np.float32(run_sum / np.float32(last - first + 1))
        if mean > best_mean:  # strict: the earliest run wins ties
            best_mean, best_run = mean, (first, last)
    return int(best_run[0]), int(best_run[1])


def select_interval_jnp(probs: jax.Array, valid: jax.Array,
                        threshold: float = DEFAULT_THRESHOLD) -> jax.Array:
    """Batched, jit-friendly version of :func:`select_interval` (static shapes).

    Args:
      probs: float[B, N] per-frame grounding probabilities.
      valid: bool[B, N] real (True) vs padded (False) frames.
      threshold: static Python float.

    Returns:
      int32[B, 2]: ``[first, last]`` inclusive frame indices per row; ``[-1, -1]`` for a
      row without any valid frame.
    """
    if probs.ndim != 2 or valid.shape != probs.shape:
        raise ValueError(f"select_interval_jnp: need probs float[B, N] and valid bool[B, N], "
                         f"got {probs.shape} and {valid.shape}")
    num_frames = probs.shape[1]
    valid = valid.astype(bool)
    p = jnp.where(valid, probs, 0).astype(jnp.float32)
    max_p = jnp.max(jnp.where(valid, p, -jnp.inf), axis=1, keepdims=True)  # [B, 1]
    kept = valid & (p >= jnp.float32(threshold) * max_p)  # [B, N]

    previous_kept = jnp.pad(kept[:, :-1], ((0, 0), (1, 0)))
    run_starts = kept & ~previous_kept
    run_id = jnp.cumsum(run_starts.astype(jnp.int32), axis=1) - 1  # [B, N]
    run_id = jnp.where(kept, run_id, num_frames)  # non-kept frames go to a dump segment

    def per_row(p_row, run_row):
        sums = jax.ops.segment_sum(p_row, run_row, num_segments=num_frames + 1)
        counts = jax.ops.segment_sum(jnp.ones_like(p_row), run_row,
                                     num_segments=num_frames + 1)
        return sums[:num_frames], counts[:num_frames]

    run_sums, run_counts = jax.vmap(per_row)(p, run_id)  # [B, N] each
    run_means = jnp.where(run_counts > 0, run_sums / jnp.maximum(run_counts, 1), -jnp.inf)
    best_run = jnp.argmax(run_means, axis=1)  # first maximum on ties

    frame_index = jnp.arange(num_frames, dtype=jnp.int32)[None, :]
    in_best = kept & (run_id == best_run[:, None])
    first = jnp.min(jnp.where(in_best, frame_index, num_frames), axis=1)
    last = jnp.max(jnp.where(in_best, frame_index, -1), axis=1)
    any_valid = jnp.any(valid, axis=1)
    first = jnp.where(any_valid, first, -1)
    last = jnp.where(any_valid, last, -1)
    return jnp.stack([first, last], axis=1).astype(jnp.int32)
