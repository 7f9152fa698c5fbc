"""The FPO grounding log-likelihood in log space: float64 agreement for logits in ±100."""

import jax
import jax.numpy as jnp
import numpy as np

from d2vlm_jax import losses


def float64_loglik(scores, y, eps=1e-10):
    """The authors' formula ``log(y p + (1 - y)(1 - p) + eps)`` evaluated in float64
    (``1 - p`` as ``sigmoid(-s)``, so nothing cancels)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(y, np.float64)
    return np.log(y / (1.0 + np.exp(-s)) + (1.0 - y) / (1.0 + np.exp(s)) + eps)


def float64_grad(scores, y, eps=1e-10):
    s = np.asarray(scores, np.float64)
    y = np.asarray(y, np.float64)
    p, q = 1.0 / (1.0 + np.exp(-s)), 1.0 / (1.0 + np.exp(s))
    return (y - (1.0 - y)) * p * q / (y * p + (1.0 - y) * q + eps)


def distances(intervals, n):
    t = np.arange(n, dtype=np.float64)
    iv = np.asarray(intervals, np.float64)
    return np.maximum(iv[..., :1] - t, 0.0) + np.maximum(t - iv[..., 1:], 0.0)


def test_issue_example_saturated_logits():
    # 41 frames, target [0, 0]: +80 on frame 0, -80 on frames 1..39, +20 on frame 40.
    # The direct float32 formula gives -24.26 (frame 40's (1-y)(1-p) rounds to log(1e-10)).
    s = np.full(41, -80.0, np.float32)
    s[0], s[40] = 80.0, 20.0
    got = losses.grounding_loglik(jnp.asarray(s)[None, None], jnp.array([[[0, 0]]]), jnp.ones((1, 41), bool), 2.0)
    want = float64_loglik(s, 2.0 ** -distances([0, 0], 41)).sum()
    assert abs(want - (-21.19)) < 5e-3
    np.testing.assert_allclose(np.asarray(got)[0, 0], want, rtol=1e-5)


def test_grounding_loglik_matches_float64_for_logits_in_100():
    rng = np.random.default_rng(0)
    b, m, n = 16, 4, 41
    scores = rng.uniform(-100.0, 100.0, (b, m, n)).astype(np.float32)
    scores[0, 0] = np.where(np.arange(n) == 0, 80.0, -80.0)            # saturated rows too
    # float intervals (the raw FPO targets), some reaching outside the clip, and integer ones
    intervals = np.sort(rng.uniform(-5.0, n + 5.0, (b, m, 2)), -1).astype(np.float32)
    intervals[1] = np.round(intervals[1])
    valid = np.arange(n)[None] < rng.integers(5, n + 1, b)[:, None]
    got = np.asarray(losses.grounding_loglik(jnp.asarray(scores), jnp.asarray(intervals), jnp.asarray(valid), 2.0))
    y = 2.0 ** -distances(intervals, n)
    want = np.where(valid[:, None, :], float64_loglik(scores, y), 0.0).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the direct float32 formula fails this (the reason for the log-space form)
    p = jax.nn.sigmoid(jnp.asarray(scores))
    direct = np.where(valid[:, None, :], np.log(y * p + (1 - y) * (1 - p) + 1e-10), 0.0).sum(-1)
    assert np.max(np.abs(direct - want) / np.abs(want)) > 1e-3


def test_elementwise_with_targets_exactly_zero_and_one():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-100.0, 100.0, (64, 41)).astype(np.float32)
    scores[:, :6] = [[-100.0, -30.0, -0.5, 0.0, 30.0, 100.0]]
    y = rng.choice(np.array([0.0, 1.0, 0.5, 0.25, 2.0 ** -20, 1.0 - 2.0 ** -20], np.float32), size=scores.shape)
    log_y, log_1my = jnp.log(jnp.asarray(y)), jnp.log1p(-jnp.asarray(y))
    fn = lambda s: losses.log_bernoulli_mixture(s, log_y, log_1my)  # noqa: E731
    got = np.asarray(fn(jnp.asarray(scores)))
    # Relative 1e-5 everywhere, except that a result far below eps in size is the difference
    # of two ~eps terms (y = 1, p = 1 - eps·(1 + d)): there it is 1e-5 of eps, absolute.
    np.testing.assert_allclose(got, float64_loglik(scores, y), rtol=1e-5, atol=1e-5 * 1e-10)
    grad = np.asarray(jax.grad(lambda s: fn(s).sum())(jnp.asarray(scores)))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, float64_grad(scores, y), rtol=1e-5, atol=1e-6)


def test_gradient_of_grounding_loglik_is_finite_at_saturation():
    scores = jnp.asarray(np.linspace(-100.0, 100.0, 41, dtype=np.float32))[None, None]
    for interval in ([0, 0], [10, 20], [40, 40], [3.25, 7.5]):
        grad = jax.grad(lambda s: losses.grounding_loglik(s, jnp.asarray([[interval]], jnp.float32),
                                                          jnp.ones((1, 41), bool), 2.0).sum())(scores)
        assert np.all(np.isfinite(np.asarray(grad))), interval


def test_soft_target_logs_are_exact_where_y_underflows():
    log_y, log_1my = losses.soft_target_logs(jnp.array([[0.0, 0.0]]), 400, 2.0)
    np.testing.assert_allclose(np.asarray(log_y)[0, 399], -399 * np.log(2.0), rtol=1e-6)   # y = 2^-399
    assert np.asarray(log_1my)[0, 0] == -np.inf and abs(np.asarray(log_1my)[0, 399]) < 1e-30
    # a tiny fractional distance: 1 - y ~ 1e-7 is kept to relative precision
    log_y, log_1my = losses.soft_target_logs(jnp.array([[1e-7, 5.0]]), 1, 2.0)
    np.testing.assert_allclose(np.exp(np.asarray(log_1my)[0, 0]), -np.expm1(-1e-7 * np.log(2.0)), rtol=1e-5)
