"""Bucketed padding and batching: shapes, dtypes, padding values, round trips, errors."""

from __future__ import annotations

import numpy as np
import pytest

from d2vlm_jax.batch import FPO_KEYS, HOST_KEYS, SFT_KEYS
from d2vlm_jax.data.collate import (FIELD_DIMS, FIELD_DTYPES, PaddingError, collate, pad_batch, pad_example,
                                    padding_row)
from d2vlm_jax.data.template import TemplateConfig, build_preference_example, build_sft_example
from tests.test_data_template import CHOSEN, FRAME_TIMES, IMG, make_word_tokenizer

BUCKETS = {"N": (4, 8, 16), "L": (8, 16), "P": (16, 32, 64), "R": (8, 16, 32), "M": (2, 4, 8), "K": (1, 2, 4),
           "Q": (1, 2), "C": (1, 2, 4)}


def random_example(rng, *, n, lq, p, r, m, k, q, c=None, r_rej=None, m_rej=None, k_rej=None):
    """An example with the natural sizes given and random contents (non-zero where possible, so
    that padding zeros are distinguishable from data)."""
    ints = lambda *shape: rng.integers(1, 50, shape, dtype=np.int32)  # noqa: E731
    ex = {
        "frames": rng.integers(1, 255, (n, 3, 3, 3), dtype=np.uint8), "frame_valid": np.ones(n, bool),
        "frame_times": rng.uniform(0.5, 9, n).astype(np.float32), "frame_positions": ints(n),
        "qformer_ids": ints(lq), "qformer_valid": np.ones(lq, bool),
        "prefix_ids": ints(p), "prefix_valid": np.ones(p, bool),
        "question_evi_positions": ints(q), "question_evi_intervals": ints(q, 2), "question_evi_valid": np.ones(q, bool),
        "response_ids": ints(r), "response_valid": np.ones(r, bool), "response_loss_mask": np.ones(r, bool),
        "evi_positions": ints(m), "evi_event": ints(m), "evi_stage": ints(m), "evi_valid": np.ones(m, bool),
        "event_intervals": ints(k, 2), "event_valid": np.ones(k, bool),
        "example_id": np.asarray(rng.integers(0, 1000), np.int64),
    }
    if c is not None:
        ex.update({
            "rejected_ids": ints(c, r_rej), "rejected_valid": np.ones((c, r_rej), bool),
            "rejected_evi_positions": ints(c, m_rej), "rejected_evi_event": ints(c, m_rej),
            "rejected_evi_stage": ints(c, m_rej), "rejected_evi_valid": np.ones((c, m_rej), bool),
            "rejected_event_intervals": ints(c, k_rej, 2), "rejected_event_valid": np.ones((c, k_rej), bool),
            "rejected_valid_pair": np.ones(c, bool),
            "conflict_token_mask": rng.random((c, r)) < 0.5, "conflict_evi_mask": rng.random((c, m)) < 0.5,
            "rejected_conflict_token_mask": rng.random((c, r_rej)) < 0.5,
            "rejected_conflict_evi_mask": rng.random((c, m_rej)) < 0.5,
            "event_frame_positions": rng.uniform(0.5, 9, (k, 2)).astype(np.float32),
            "rejected_event_frame_positions": rng.uniform(0.5, 9, (c, k_rej, 2)).astype(np.float32),
        })
    return ex


def assert_padded_copy(original, padded, key):
    """The leading block equals the original; everything else is the padding value (0 / False)."""
    region = tuple(slice(0, s) for s in np.shape(original))
    np.testing.assert_array_equal(padded[region], original, err_msg=key)
    rest = np.ones(padded.shape, bool)
    rest[region] = False
    assert not np.any(padded[rest]), f"{key}: padding region is not all zero/False"


def test_pad_example_uses_smallest_fitting_bucket_and_keeps_data():
    rng = np.random.default_rng(0)
    ex = random_example(rng, n=5, lq=8, p=17, r=9, m=3, k=2, q=0, c=2, r_rej=12, m_rej=4, k_rej=1)
    padded = pad_example(ex, BUCKETS)
    want = {"N": 8, "L": 8, "P": 32, "R": 16, "M": 4, "K": 2, "Q": 1, "C": 2}  # R from the longer rejected branch
    for key, value in padded.items():
        expected_shape = tuple(want[d] if d else s for d, s in zip(FIELD_DIMS[key], np.shape(ex[key]), strict=True))
        assert value.shape == expected_shape, key
        assert value.dtype == FIELD_DTYPES[key], key
        assert_padded_copy(ex[key], value, key)
    assert padded["frames"].shape == (8, 3, 3, 3)


def test_collate_pads_to_the_largest_bucket_and_stacks():
    rng = np.random.default_rng(1)
    examples = [random_example(rng, n=3, lq=5, p=10, r=4, m=2, k=1, q=1),
                random_example(rng, n=9, lq=8, p=40, r=20, m=5, k=3, q=2),
                random_example(rng, n=4, lq=16, p=16, r=8, m=0, k=0, q=0)]
    batch = collate(examples, BUCKETS)
    assert set(batch) == set(SFT_KEYS) | set(HOST_KEYS)
    assert batch["frames"].shape == (3, 16, 3, 3, 3)
    assert batch["qformer_ids"].shape == (3, 16) and batch["prefix_ids"].shape == (3, 64)
    assert batch["response_ids"].shape == (3, 32) and batch["evi_positions"].shape == (3, 8)
    assert batch["event_intervals"].shape == (3, 4, 2) and batch["question_evi_intervals"].shape == (3, 2, 2)
    assert batch["example_id"].shape == (3,) and batch["example_id"].dtype == np.int64
    for i, ex in enumerate(examples):
        for key in ex:
            assert batch[key].dtype == FIELD_DTYPES[key], key
            assert_padded_copy(ex[key], batch[key][i], key)
    # validity masks count exactly the real entries
    np.testing.assert_array_equal(batch["frame_valid"].sum(1), [3, 9, 4])
    np.testing.assert_array_equal(batch["evi_valid"].sum(1), [2, 5, 0])


def test_collate_preference_examples_with_different_branch_counts():
    rng = np.random.default_rng(2)
    a = random_example(rng, n=4, lq=8, p=16, r=10, m=2, k=1, q=1, c=1, r_rej=6, m_rej=2, k_rej=1)
    b = random_example(rng, n=4, lq=8, p=16, r=5, m=2, k=1, q=1, c=3, r_rej=14, m_rej=4, k_rej=2)
    batch = collate([a, b], BUCKETS)
    assert set(batch) == set(FPO_KEYS) | set(HOST_KEYS)
    assert batch["rejected_ids"].shape == (2, 4, 16) and batch["conflict_token_mask"].shape == (2, 4, 16)
    assert batch["response_ids"].shape == (2, 16)  # chosen and rejected share the R bucket
    assert batch["rejected_event_intervals"].shape == (2, 4, 2, 2)
    np.testing.assert_array_equal(batch["rejected_valid_pair"],
                                  [[True, False, False, False], [True, True, True, False]])
    for i, ex in enumerate([a, b]):
        for key in ex:
            assert_padded_copy(ex[key], batch[key][i], key)


def test_padding_row_and_pad_batch():
    rng = np.random.default_rng(3)
    examples = [random_example(rng, n=3, lq=5, p=10, r=4, m=2, k=1, q=1, c=1, r_rej=3, m_rej=1, k_rej=1)
                for _ in range(2)]
    batch = collate(examples, BUCKETS)
    row = padding_row(batch)
    assert set(row) == set(batch)
    for key, value in row.items():
        assert value.shape == batch[key].shape[1:] and value.dtype == batch[key].dtype, key
        if key != "example_id":
            assert not value.any(), key
    assert row["example_id"] == -1
    full = pad_batch(batch, 4)
    np.testing.assert_array_equal(full["example_id"], list(batch["example_id"]) + [-1, -1])
    assert not full["prefix_valid"][2:].any() and not full["rejected_valid_pair"][2:].any()
    for key in batch:
        np.testing.assert_array_equal(full[key][:2], batch[key], err_msg=key)
    with pytest.raises(PaddingError, match="more than batch_size"):
        pad_batch(batch, 1)


def test_errors_name_the_field():
    rng = np.random.default_rng(4)
    too_long = random_example(rng, n=4, lq=8, p=70, r=4, m=2, k=1, q=1)
    with pytest.raises(PaddingError, match=r"field 'prefix_ids'.*dimension 'P' has size 70.*largest bucket 64"):
        pad_example(too_long, BUCKETS)
    with pytest.raises(PaddingError, match=r"example 1 .*field 'prefix_ids'"):
        collate([random_example(rng, n=4, lq=8, p=10, r=4, m=2, k=1, q=1), too_long], BUCKETS)
    ok = random_example(rng, n=4, lq=8, p=10, r=4, m=2, k=1, q=1)
    with pytest.raises(PaddingError, match="no bucket sizes configured for dimension 'Q'"):
        pad_example(ok, {d: s for d, s in BUCKETS.items() if d != "Q"})
    bad_rank = dict(ok, evi_positions=np.zeros((2, 2), np.int32))
    with pytest.raises(PaddingError, match=r"field 'evi_positions': expected rank 1"):
        pad_example(bad_rank, BUCKETS)
    with pytest.raises(PaddingError, match="unknown example field 'evi_positons'"):
        pad_example(dict(ok, evi_positons=np.zeros(2, np.int32)), BUCKETS)
    with pytest.raises(PaddingError, match=r"field 'event_intervals': last axis must be 2"):
        pad_example(dict(ok, event_intervals=np.zeros((1, 3), np.int32)), BUCKETS)
    with pytest.raises(PaddingError, match=r"field 'prefix_valid': expected a bool mask"):
        pad_example(dict(ok, prefix_valid=np.ones(10, np.int32)), BUCKETS)
    with pytest.raises(PaddingError, match="example 1 has different fields"):
        collate([ok, {k: v for k, v in ok.items() if k != "frames"}], BUCKETS)


def test_built_examples_collate_end_to_end(tmp_path):
    tok, qtok = make_word_tokenizer(tmp_path)
    config = TemplateConfig(image_token_id=IMG, train=True)
    rejected = [{"answer": CHOSEN["answer"], "events": [[3, 4], [2, 5]], "family": "temporal_shift", "event_index": 1}]
    examples = []
    for index in range(3):
        ex = build_preference_example(CHOSEN, rejected, frame_times=FRAME_TIMES[: 4 + index], tokenizer=tok,
                                      qformer_tokenizer=qtok, config=config, example_index=index)
        ex["frames"] = np.full((4 + index, 2, 2, 3), 7, np.uint8)
        examples.append(ex)
    batch = collate(examples, BUCKETS)
    assert set(batch) == set(FPO_KEYS) | set(HOST_KEYS)
    np.testing.assert_array_equal(batch["example_id"], [0, 1, 2])
    for i, ex in enumerate(examples):
        for key in ex:
            assert_padded_copy(ex[key], batch[key][i], key)
        # padded frame slots point at slot 0 and are invalid; real ones are where the placeholder sits
        real = batch["frame_positions"][i][batch["frame_valid"][i]]
        assert (batch["prefix_ids"][i][real] == IMG).all()
    sft_batch = collate([build_sft_example(CHOSEN, frame_times=FRAME_TIMES, tokenizer=tok, qformer_tokenizer=qtok,
                                           config=config, example_index=5)], BUCKETS)
    assert set(sft_batch) | {"frames"} == set(SFT_KEYS) | set(HOST_KEYS)
