"""Interval selection rule of SPEC §5.3: hand-made curves, padding, numpy vs jnp."""

import jax
import numpy as np
import pytest

from d2vlm_jax.evaluation.intervals import select_interval, select_interval_jnp


def _jnp_one(probs, valid=None):
    probs = np.asarray(probs, np.float32)[None]
    valid = np.ones_like(probs, bool) if valid is None else np.asarray(valid, bool)[None]
    return tuple(int(x) for x in np.asarray(select_interval_jnp(probs, valid))[0])


CASES = [
    # (probs, valid, expected)   threshold 0.6 * max
    ([0.1, 0.2, 0.9, 0.8, 0.1], None, (2, 3)),
    # two runs: [0.7, 0.7] mean 0.7 vs [1.0, 0.6] mean 0.8 -> second
    ([0.7, 0.7, 0.1, 1.0, 0.6, 0.0], None, (3, 4)),
    # two runs with equal means 0.875 -> the first wins
    ([0.75, 1.0, 0.0, 0.875, 0.875], None, (0, 1)),
    # the max frame alone vs a longer run with a higher mean is impossible; long run with
    # lower mean loses to a single peak: run1 [0.6, 0.6, 0.6] mean 0.6, run2 [1.0]
    ([0.6, 0.6, 0.6, 0.1, 1.0], None, (4, 4)),
    # single frame video
    ([0.3], None, (0, 0)),
    # all equal -> everything kept, one run
    ([0.25, 0.25, 0.25, 0.25], None, (0, 3)),
    # all zero (sigmoid underflow) -> every valid frame kept
    ([0.0, 0.0, 0.0], None, (0, 2)),
    # frame exactly at the threshold is kept (p >= 0.6 max)
    ([0.5, 0.3, 0.0, 0.0], None, (0, 1)),
    # just below the threshold is dropped
    ([0.5, 0.29, 0.0, 0.0], None, (0, 0)),
]


@pytest.mark.parametrize("probs,valid,expected", CASES)
def test_hand_made_curves(probs, valid, expected):
    assert select_interval(np.asarray(probs, np.float32), valid) == expected
    assert _jnp_one(probs, valid) == expected


def test_threshold_boundary_keeps_equal_frame():
    # 0.6 * 1.0 == 0.6 in float32: the 0.6 frame survives and joins the run.
    # run [1.0, 0.6] mean 0.8 beats nothing else.
    assert select_interval(np.asarray([1.0, 0.6, 0.59], np.float32)) == (0, 1)
    assert _jnp_one([1.0, 0.6, 0.59]) == (0, 1)


def test_padded_frames_never_selected():
    # Padded frames carry huge probabilities; they must be ignored, and the max is taken
    # over valid frames only (so 0.3 survives relative to 0.4, not relative to 9.0).
    probs = [0.4, 0.3, 9.0, 9.0, 0.1]
    valid = [True, True, False, False, True]
    assert select_interval(probs, valid) == (0, 1)
    assert _jnp_one(probs, valid) == (0, 1)


def test_padding_breaks_runs():
    # frames 0-1 and 3-4 are kept but frame 2 is padding: two runs, not one.
    probs = [0.75, 1.0, 1.0, 0.875, 0.875]
    valid = [True, True, False, True, True]
    assert select_interval(probs, valid) == (0, 1)  # mean 0.875 == 0.875 -> first run
    assert _jnp_one(probs, valid) == (0, 1)


def test_no_valid_frame():
    with pytest.raises(ValueError, match="no valid frame"):
        select_interval([0.5, 0.5], [False, False])
    out = np.asarray(select_interval_jnp(np.full((2, 3), 0.5, np.float32),
                                         np.array([[False] * 3, [True, False, False]])))
    np.testing.assert_array_equal(out, [[-1, -1], [0, 0]])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="float\\[N\\]"):
        select_interval(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        select_interval([0.5, -0.1])
    with pytest.raises(ValueError, match="valid shape"):
        select_interval([0.5, 0.1], [True])


def test_numpy_and_jnp_agree_on_random_curves():
    rng = np.random.default_rng(0)
    batch, frames = 256, 24
    # Quantized to 1/16: exact float32 sums, many exact ties between runs.
    probs = rng.integers(0, 17, size=(batch, frames)).astype(np.float32) / 16.0
    lengths = rng.integers(1, frames + 1, size=batch)
    valid = np.arange(frames)[None, :] < lengths[:, None]
    valid[::7, 3] = False  # holes in the middle of some rows too
    valid[::7, 0] = True
    out = np.asarray(jax.jit(select_interval_jnp)(probs, valid))
    expected = np.array([select_interval(probs[b], valid[b]) for b in range(batch)])
    np.testing.assert_array_equal(out, expected)
    # Unquantized curves as well.
    probs = rng.random((batch, frames), dtype=np.float32)
    out = np.asarray(jax.jit(select_interval_jnp)(probs, valid))
    expected = np.array([select_interval(probs[b], valid[b]) for b in range(batch)])
    np.testing.assert_array_equal(out, expected)
    # Selected frames are always valid and first <= last.
    assert np.all(out[:, 0] <= out[:, 1])
    assert np.all(valid[np.arange(batch), out[:, 0]]) and np.all(valid[np.arange(batch), out[:, 1]])


def test_custom_threshold():
    probs = [0.5, 1.0, 0.85, 0.1]
    assert select_interval(probs, threshold=0.9) == (1, 1)
    assert select_interval(probs, threshold=0.4) == (0, 2)
    out = select_interval_jnp(np.asarray([probs], np.float32), np.ones((1, 4), bool), threshold=0.9)
    np.testing.assert_array_equal(np.asarray(out), [[1, 1]])


def _jnp_opts(probs, valid=None, **opts):
    probs = np.asarray(probs, np.float32)[None]
    valid = np.ones_like(probs, bool) if valid is None else np.asarray(valid, bool)[None]
    return tuple(int(x) for x in np.asarray(select_interval_jnp(probs, valid, **opts))[0])


@pytest.mark.parametrize("arithmetic", ["exact", "float16", "bfloat16"])
def test_span_tie_rule_runs_from_first_to_last_tied_run(arithmetic):
    # runs [0.75, 1.0] and [0.875, 0.875] have equal means 0.875; a third run [0.75] less
    probs = [0.75, 1.0, 0.0, 0.875, 0.875, 0.0, 0.75]
    for opts, expected in ((dict(tie_rule="first"), (0, 1)), (dict(tie_rule="span"), (0, 4))):
        assert select_interval(probs, arithmetic=arithmetic, **opts) == expected
        assert _jnp_opts(probs, arithmetic=arithmetic, **opts) == expected
    # no tie: both rules agree
    probs = [0.75, 1.0, 0.0, 0.875, 0.75]
    assert select_interval(probs, tie_rule="span", arithmetic=arithmetic) == (0, 1)
    assert _jnp_opts(probs, tie_rule="span", arithmetic=arithmetic) == (0, 1)


def test_exact_means_have_no_float32_false_ties():
    # run A = [x]; run B = [x, x + ulp]: exact mean x + ulp/2 > x, but in float32
    # x + (x + ulp) rounds to 2x (ties to even), so a float32 mean says "tie".
    x = np.float32(0.75)
    y = np.nextafter(x, np.float32(1))
    assert np.float32(np.float32(x + y) / np.float32(2)) == x      # the float32 false tie
    probs = np.array([x, 0.0, x, y], np.float32)
    assert select_interval(probs) == (2, 3)
    assert _jnp_opts(probs) == (2, 3)
    assert select_interval(probs, tie_rule="span") == (2, 3)


def test_exact_threshold_is_three_fifths_of_the_max():
    # p = the smallest float32 >= 3/5 * max is kept; float32(0.6) * max (0.6 rounds up to
    # 0.6000000238) often lies above it, so a float32 comparison would drop it.
    rng = np.random.default_rng(0)
    found = 0
    for top in rng.uniform(0.5, 1.0, 500).astype(np.float32):
        p = np.float32(float(top) * 0.6)
        while float(p) * 5 < float(top) * 3:
            p = np.nextafter(p, np.float32(1))
        while float(np.nextafter(p, np.float32(0))) * 5 >= float(top) * 3:
            p = np.nextafter(p, np.float32(0))
        below = np.nextafter(p, np.float32(0))
        assert select_interval(np.array([top, p], np.float32)) == (0, 1)
        assert _jnp_opts([top, p]) == (0, 1)
        assert select_interval(np.array([top, below], np.float32)) == (0, 0)
        assert _jnp_opts([top, below]) == (0, 0)
        found += not p >= np.float32(0.6) * top           # float32 would have dropped it
    assert found > 10


def test_float16_arithmetic_rounds_run_means_like_the_authors():
    # run B = [1, 1 - 2^-11] has mean 1 - 2^-12, exactly between two fp16 values: it rounds
    # (to even) to 1.0 and ties run A = [1]; exactly, A wins.
    probs = np.array([1.0, 0.0, 1.0, 1.0 - 2.0 ** -11], np.float32)
    assert select_interval(probs, tie_rule="span") == (0, 0)
    assert select_interval(probs, tie_rule="span", arithmetic="float16") == (0, 3)
    assert _jnp_opts(probs, tie_rule="span", arithmetic="float16") == (0, 3)
    # the threshold is dtype(float32(max) * float32(0.6)) and p is rounded to the dtype:
    # 0.59997 rounds to fp16 0.6001 >= fp16(0.6) = 0.6001 -> kept in float16, not exactly
    probs = np.array([1.0, 0.59997], np.float32)
    assert select_interval(probs) == (0, 0)
    assert select_interval(probs, arithmetic="float16") == (0, 1)
    assert _jnp_opts(probs, arithmetic="float16") == (0, 1)
    # an all-zero fp16 curve keeps every frame (the authors return [0, N - 1] too)
    assert select_interval(np.full(4, 1e-9, np.float32), tie_rule="span", arithmetic="float16") == (0, 3)


@pytest.mark.parametrize("arithmetic", ["exact", "float16", "bfloat16"])
@pytest.mark.parametrize("tie_rule", ["first", "span"])
def test_numpy_and_jnp_agree_for_every_rule(tie_rule, arithmetic):
    rng = np.random.default_rng(1)
    batch, frames = 128, 24
    quantized = rng.integers(0, 17, size=(batch, frames)).astype(np.float32) / 16.0   # many exact ties
    logits = rng.normal(0.0, 3.0, (batch, frames)).astype(np.float16)                  # real fp16 curves
    fp16_curves = (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float16).astype(np.float32)
    lengths = rng.integers(1, frames + 1, size=batch)
    valid = np.arange(frames)[None, :] < lengths[:, None]
    fn = jax.jit(lambda p, v: select_interval_jnp(p, v, tie_rule=tie_rule, arithmetic=arithmetic))
    for probs in (quantized, fp16_curves, rng.random((batch, frames), dtype=np.float32)):
        out = np.asarray(fn(probs, valid))
        expected = np.array([select_interval(probs[b], valid[b], tie_rule=tie_rule, arithmetic=arithmetic)
                             for b in range(batch)])
        np.testing.assert_array_equal(out, expected)


def test_option_errors():
    with pytest.raises(ValueError, match="tie_rule"):
        select_interval([0.5], tie_rule="last")
    with pytest.raises(ValueError, match="arithmetic"):
        select_interval_jnp(np.ones((1, 2), np.float32), np.ones((1, 2), bool), arithmetic="float64")
    with pytest.raises(ValueError, match="denominator"):
        select_interval([0.5], threshold=0.123456)
