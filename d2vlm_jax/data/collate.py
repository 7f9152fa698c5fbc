"""Padding examples to static bucketed shapes and stacking them into batches.

Every field of :mod:`d2vlm_jax.batch` has named padded dimensions (:data:`FIELD_DIMS`):
``N`` frames, ``L`` Q-Former text, ``P`` prefix, ``R`` response, ``M`` evidence tokens per
response, ``K`` events, ``Q`` question-side evidence tokens, ``C`` rejected branches. A
:data:`Buckets` mapping gives, per dimension, the sizes it may be padded to; a dimension is
padded to the smallest bucket that holds it (XLA compiles one program per bucket
combination, not per example).

Padding values: 0 for ids, positions, intervals and pixels, ``False`` for masks, 0.0 for
``frame_times``; padding never touches real entries (validity masks say which are real).
``example_id`` is -1 only in :func:`padding_row` rows.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from d2vlm_jax.batch import FPO_KEYS, HOST_KEYS

DIM_NAMES = ("N", "L", "P", "R", "M", "K", "Q", "C")

#: Padded dimension name of every axis of every per-example field (``None`` = fixed axis).
FIELD_DIMS: dict[str, tuple[str | None, ...]] = {
    "frames": ("N", None, None, None),
    "frame_valid": ("N",),
    "frame_times": ("N",),
    "frame_positions": ("N",),
    "qformer_ids": ("L",),
    "qformer_valid": ("L",),
    "prefix_ids": ("P",),
    "prefix_valid": ("P",),
    "question_evi_positions": ("Q",),
    "question_evi_intervals": ("Q", None),
    "question_evi_valid": ("Q",),
    "response_ids": ("R",),
    "response_valid": ("R",),
    "response_loss_mask": ("R",),
    "evi_positions": ("M",),
    "evi_event": ("M",),
    "evi_stage": ("M",),
    "evi_valid": ("M",),
    "event_intervals": ("K", None),
    "event_valid": ("K",),
    "rejected_ids": ("C", "R"),
    "rejected_valid": ("C", "R"),
    "rejected_evi_positions": ("C", "M"),
    "rejected_evi_event": ("C", "M"),
    "rejected_evi_stage": ("C", "M"),
    "rejected_evi_valid": ("C", "M"),
    "rejected_event_intervals": ("C", "K", None),
    "event_frame_positions": ("K", None),
    "rejected_event_frame_positions": ("C", "K", None),
    "rejected_event_valid": ("C", "K"),
    "rejected_valid_pair": ("C",),
    "conflict_token_mask": ("C", "R"),
    "conflict_evi_mask": ("C", "M"),
    "rejected_conflict_token_mask": ("C", "R"),
    "rejected_conflict_evi_mask": ("C", "M"),
    "example_id": (),
}

#: dtype of every field in a batch (the contract of ``d2vlm_jax.batch``).
FIELD_DTYPES: dict[str, np.dtype] = {
    key: np.dtype(bool) if (key.endswith("_valid") or key.endswith("_mask") or key == "rejected_valid_pair")
    else np.dtype(np.int32)
    for key in FIELD_DIMS
}
FIELD_DTYPES.update(frames=np.dtype(np.uint8), frame_times=np.dtype(np.float32), example_id=np.dtype(np.int64),
                    event_frame_positions=np.dtype(np.float32),
                    rejected_event_frame_positions=np.dtype(np.float32))

assert set(FIELD_DIMS) == set(FPO_KEYS) | set(HOST_KEYS), "FIELD_DIMS out of sync with d2vlm_jax.batch"

Buckets = Mapping[str, Sequence[int]]


class PaddingError(ValueError):
    """An example does not fit the configured buckets or has malformed fields (names the field)."""


def _check_buckets(buckets: Buckets, dim: str) -> tuple[int, ...]:
    if dim not in buckets:
        raise PaddingError(f"no bucket sizes configured for dimension {dim!r} (buckets: {sorted(buckets)})")
    sizes = tuple(sorted(int(b) for b in buckets[dim]))
    if not sizes or sizes[0] < 1:
        raise PaddingError(f"bucket sizes for dimension {dim!r} must be positive, got {tuple(buckets[dim])}")
    return sizes


def natural_sizes(example: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Size of each padded dimension in an (unpadded or padded) example, with the field that
    sets it. Raises :class:`PaddingError` naming a field of unknown name or wrong rank, and
    fields whose fixed axes disagree with the contract."""
    sizes: dict[str, int] = {}
    for key, value in example.items():
        if key not in FIELD_DIMS:
            raise PaddingError(f"unknown example field {key!r}")
        dims = FIELD_DIMS[key]
        shape = np.shape(value)
        if len(shape) != len(dims):
            raise PaddingError(f"field {key!r}: expected rank {len(dims)} (axes {dims}), got shape {shape}")
        for dim, size in zip(dims, shape, strict=True):
            if dim is None:
                if key.endswith("_intervals") and size != 2:
                    raise PaddingError(f"field {key!r}: last axis must be 2 ([first, last]), got shape {shape}")
                continue
            sizes[dim] = max(sizes.get(dim, 0), int(size))
    return sizes


def bucket_sizes(sizes: Mapping[str, int], buckets: Buckets, *, example: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, int]:
    """Smallest bucket holding each size; :class:`PaddingError` names the dimension and the
    field(s) that overflow."""
    out = {}
    for dim, size in sizes.items():
        options = _check_buckets(buckets, dim)
        fitting = [b for b in options if b >= size]
        if not fitting:
            fields = [k for k, d in FIELD_DIMS.items() if example is not None and dim in d and k in example
                      and np.shape(example[k])[d.index(dim)] == size]
            raise PaddingError(f"field {fields[0] if fields else '?'!r}: dimension {dim!r} has size {size}, larger "
                               f"than the largest bucket {options[-1]} (buckets {options})")
        out[dim] = fitting[0]
    return out


def _pad_field(key: str, value: np.ndarray, target: Mapping[str, int]) -> np.ndarray:
    value = np.asarray(value)
    dtype = FIELD_DTYPES[key]
    if value.dtype != dtype:
        if dtype == np.dtype(bool) and value.dtype != bool:
            raise PaddingError(f"field {key!r}: expected a bool mask, got dtype {value.dtype}")
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer) and value.size:
            raise PaddingError(f"field {key!r}: expected integers, got dtype {value.dtype}")
        value = value.astype(dtype)
    dims = FIELD_DIMS[key]
    widths = []
    for dim, size in zip(dims, value.shape, strict=True):
        pad = 0 if dim is None else target[dim] - size
        if pad < 0:
            raise PaddingError(f"field {key!r}: dimension {dim!r} of size {size} exceeds the target {target[dim]}")
        widths.append((0, pad))
    if not any(w for _, w in widths):
        return value.copy()
    return np.pad(value, widths, mode="constant", constant_values=np.zeros((), dtype))


def pad_to(example: Mapping[str, np.ndarray], target: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Pads every field of ``example`` to the dimension sizes in ``target`` (no buckets)."""
    natural_sizes(example)  # validates names and ranks
    return {key: _pad_field(key, value, target) for key, value in example.items()}


def pad_example(example: Mapping[str, np.ndarray], buckets: Buckets) -> dict[str, np.ndarray]:
    """Pads each dimension of one example to its smallest fitting bucket."""
    target = bucket_sizes(natural_sizes(example), buckets, example=example)
    return pad_to(example, target)


def collate(examples: Sequence[Mapping[str, np.ndarray]], buckets: Buckets) -> dict[str, np.ndarray]:
    """Stacks examples into a batch: every dimension padded to the bucket of the largest
    example, then a leading batch axis. All examples must have the same keys (SFT or FPO)."""
    if not examples:
        raise PaddingError("collate: no examples")
    keys = set(examples[0])
    for i, example in enumerate(examples):
        if set(example) != keys:
            diff = sorted(keys.symmetric_difference(example))
            raise PaddingError(f"collate: example {i} has different fields than example 0: {diff}")
    target: dict[str, int] = {}
    for i, example in enumerate(examples):
        try:  # per example, so that an overflow names the example and its field
            own = bucket_sizes(natural_sizes(example), buckets, example=example)
        except PaddingError as e:
            raise PaddingError(f"collate: example {i} (example_id {example.get('example_id', '?')}): {e}") from e
        for dim, size in own.items():
            target[dim] = max(target.get(dim, 0), size)
    padded = [pad_to(example, target) for example in examples]
    return {key: np.stack([p[key] for p in padded]) for key in examples[0]}


def padding_row(like_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An all-invalid row (no batch axis) shaped like one row of ``like_batch``: zeros,
    ``False`` masks, ``example_id = -1``. Fills the last partial batch."""
    row = {key: np.zeros(np.shape(value)[1:], FIELD_DTYPES.get(key, np.asarray(value).dtype))
           for key, value in like_batch.items()}
    if "example_id" in row:
        row["example_id"] = np.asarray(-1, np.int64)
    return row


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Appends :func:`padding_row` rows to a stacked batch until it has ``batch_size`` rows."""
    current = len(next(iter(batch.values())))
    if current > batch_size:
        raise PaddingError(f"pad_batch: batch has {current} rows, more than batch_size {batch_size}")
    if current == batch_size:
        return dict(batch)
    row = padding_row(batch)
    extra = batch_size - current
    return {key: np.concatenate([np.asarray(value), np.repeat(row[key][None], extra, axis=0)])
            for key, value in batch.items()}
