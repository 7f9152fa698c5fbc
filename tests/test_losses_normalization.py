"""loss.normalization: per-sample means averaged over samples (the authors') vs token means."""

import jax.numpy as jnp
import numpy as np
import pytest

from d2vlm_jax import losses
from d2vlm_jax.models.d2vlm import ForwardOutputs


def _outputs(token_logp, scores, evidence_embeddings):
    z = jnp.zeros((1,))
    return ForwardOutputs(jnp.asarray(token_logp, jnp.float32), None, jnp.asarray(scores, jnp.float32),
                          jnp.asarray(evidence_embeddings, jnp.float32), z, z)


def _batch():
    # sample 0: 2 supervised tokens, one event [1, 1] with a grounding and an answer <evi>;
    # sample 1: 1 supervised token, no evidence; sample 2: a padding row (nothing supervised)
    return {
        "frame_valid": np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], bool),
        "response_ids": np.zeros((3, 3), np.int32), "response_valid": np.array([[1, 1, 1], [1, 1, 1], [0, 0, 0]], bool),
        "response_loss_mask": np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool),
        "evi_positions": np.array([[0, 1], [0, 0], [0, 0]], np.int32), "evi_event": np.zeros((3, 2), np.int32),
        "evi_stage": np.array([[0, 1], [0, 0], [0, 0]], np.int32),
        "evi_valid": np.array([[1, 1], [0, 0], [0, 0]], bool),
        "event_intervals": np.array([[[1, 1]], [[0, 0]], [[0, 0]]], np.int32),
        "event_valid": np.array([[1], [0], [0]], bool),
    }


def test_sample_normalization_by_hand():
    b = _batch()
    token_logp = np.log([[[0.5, 0.25, 0.9]], [[0.125, 0.9, 0.9]], [[0.3, 0.3, 0.3]]])
    scores = np.array([[[[0.0, 1.0, 5.0], [2.0, -1.0, 5.0]]], [[[9, 9, 9], [9, 9, 9]]], [[[1, 1, 1], [1, 1, 1]]]])
    emb = np.array([[[[1.0, 2.0], [0.0, 4.0]]], [[[7, 7], [1, 1]]], [[[3, 3], [3, 3]]]])
    out = _outputs(token_logp, scores, emb)
    cfg = losses.LossConfig(normalization="sample")
    loss, m = losses.sft_losses(out, b, cfg)

    def bce(s, t):
        return max(s, 0) - s * t + np.log1p(np.exp(-abs(s)))
    y = [0.5, 1.0]
    gnd_0 = 10 * np.mean([bce(0, y[0]), bce(1, y[1]), bce(2, y[0]), bce(-1, y[1])])
    cons_0 = 10 * (abs(1 - 0) + abs(2 - 4)) / 2
    lm = (-(np.log(0.5) + np.log(0.25)) / 2 - np.log(0.125)) / 2          # two real samples, equal weights
    np.testing.assert_allclose(m["loss/lm"], lm, rtol=1e-6)
    np.testing.assert_allclose(m["loss/gnd"], gnd_0 / 2, rtol=1e-6)      # sample 1 counts with 0
    np.testing.assert_allclose(m["loss/cons"], cons_0 / 2, rtol=1e-6)
    np.testing.assert_allclose(loss, lm + gnd_0 / 2 + cons_0 / 2, rtol=1e-6)
    # the token form of the same batch
    _, t = losses.sft_losses(out, b, losses.LossConfig(normalization="token"))
    np.testing.assert_allclose(t["loss/lm"], -(np.log(0.5) + np.log(0.25) + np.log(0.125)) / 3, rtol=1e-6)
    np.testing.assert_allclose(t["loss/gnd"], gnd_0, rtol=1e-6)
    # the weights that combine batch means
    norm = losses.normalizers(b)
    assert float(norm["samples"]) == 2.0 and float(norm["tokens"]) == 3.0
    assert losses.metric_normalizer(cfg, "loss/gnd") == "samples"
    assert losses.metric_normalizer(losses.LossConfig(normalization="token"), "loss/gnd") == "samples_with_evidence"


def test_micro_batch_shares_add_up_in_sample_mode():
    b = _batch()
    rng = np.random.default_rng(0)
    out = _outputs(np.log(rng.uniform(0.1, 0.9, (3, 1, 3))), rng.normal(size=(3, 1, 2, 3)),
                   rng.normal(size=(3, 1, 2, 2)))
    cfg = losses.LossConfig(normalization="sample")
    whole, _ = losses.sft_losses(out, b, cfg)
    norm = losses.normalizers(b)
    parts = 0.0
    for r in range(3):
        rows = {k: v[r:r + 1] for k, v in b.items()}
        part = _outputs(*(np.asarray(x)[r:r + 1] for x in (out.token_logp, out.scores, out.evidence_embeddings)))
        parts += float(losses.sft_losses(part, rows, cfg, norm)[0])
    np.testing.assert_allclose(parts, float(whole), rtol=1e-6)


def test_fpo_pair_weights():
    valid = np.array([[1, 1], [1, 0], [0, 0]], bool)
    norm = {"samples": jnp.float32(3.0), "pairs": jnp.float32(3.0)}
    np.testing.assert_allclose(losses.fpo_pair_weights(valid, losses.LossConfig(normalization="sample"), norm),
                               [[1 / 6, 1 / 6], [1 / 3, 0], [0, 0]])
    np.testing.assert_allclose(losses.fpo_pair_weights(valid, losses.LossConfig(normalization="token"), norm),
                               [[1 / 3, 1 / 3], [1 / 3, 0], [0, 0]])
    policy = {"chosen_text": jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
              "rejected_text": jnp.array([[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]),
              "chosen_grounding": jnp.zeros((3, 2)), "rejected_grounding": jnp.zeros((3, 2))}
    weights = losses.fpo_pair_weights(valid, losses.LossConfig(normalization="sample"), norm)
    loss, m = losses.fpo_loss(policy, None, valid, 1.0, pair_weights=weights)
    per_pair = -np.log(1 / (1 + np.exp(-np.array([[0.0, -2.0], [1.0, 0.0]]))))
    np.testing.assert_allclose(loss, (per_pair[0].mean() + per_pair[1, 0]) / 3, rtol=1e-6)


def test_bad_normalization_names_the_field():
    with pytest.raises(ValueError, match="loss.normalization"):
        losses.LossConfig(normalization="batch")
    with pytest.raises(ValueError, match="loss.fpo_grounding_targets"):
        losses.LossConfig(fpo_grounding_targets="round")
