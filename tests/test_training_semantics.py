"""Training-semantics switches: FPO grounding targets from unrounded intervals, and
question-side evidence injection before / after the video (model.question_evidence)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vlm_jax import losses, sharding, testing
from d2vlm_jax.models.d2vlm import D2VLM, D2VLMConfig, ForwardOutputs, build_prefix_embeds, init_variables


def test_fpo_grounding_targets_seconds_vs_frames():
    config = testing.tiny_d2vlm_config()
    batch = testing.random_batch(config, seed=3, batch=2, rejected=2)
    b, c1, m, n = 2, 3, batch["evi_positions"].shape[1], batch["frame_valid"].shape[1]
    rng = np.random.default_rng(0)
    out = ForwardOutputs(jnp.asarray(rng.normal(size=(b, c1, batch["response_ids"].shape[1])), jnp.float32), None,
                         jnp.asarray(rng.normal(0, 8, (b, c1, m, n)), jnp.float32), None, None, None)
    frames = losses.factorized_logps(out, batch, 2.0, "frames")
    seconds = losses.factorized_logps(out, batch, 2.0, "seconds")
    np.testing.assert_array_equal(frames["chosen_text"], seconds["chosen_text"])     # text terms unchanged
    assert np.max(np.abs(np.asarray(frames["chosen_grounding"]) - np.asarray(seconds["chosen_grounding"]))) > 1e-3
    # "seconds" is the log-likelihood of the unrounded intervals: recompute one branch by hand
    positions = np.asarray(losses.evidence_frame_positions(batch))                    # [B, C1, M, 2]
    ev = batch["rejected_evi_event"][0, 0, 0]
    np.testing.assert_allclose(positions[0, 1, 0], batch["rejected_event_frame_positions"][0, 0, ev])
    t = np.arange(n)
    s, e = positions[0, 1, :, 0], positions[0, 1, :, 1]                               # all M evidences
    dist = np.maximum(s[:, None] - t, 0) + np.maximum(t - e[:, None], 0)
    y = 2.0 ** -dist
    sc = np.asarray(out.scores, np.float64)[0, 1]
    ll = np.log(y / (1 + np.exp(-sc)) + (1 - y) / (1 + np.exp(sc)) + 1e-10)
    ll = np.where(batch["frame_valid"][0], ll, 0).sum(-1) * batch["rejected_evi_valid"][0, 0]
    want = np.sum(ll * batch["rejected_conflict_evi_mask"][0, 0])
    np.testing.assert_allclose(seconds["rejected_grounding"][0, 0], want, rtol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        losses.factorized_logps(out, batch, 2.0, "rounded")


def _prefix_embeds(question_evidence, question_before_frames):
    config = dataclasses.replace(testing.tiny_d2vlm_config(), question_evidence=question_evidence)
    batch = testing.random_batch(config, seed=1, batch=2)
    if question_before_frames:
        batch["question_evi_positions"][:, 0] = 1                         # frames start at slot 3
        batch["prefix_ids"][:, 1] = testing.EVI_ID
    model = D2VLM(config)
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0), batch))
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.05, s.dtype), sharding.unbox(shapes))
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, batch["frame_valid"].shape[1],
                                                               config.llm.hidden_size)), jnp.float32)
    emb = build_prefix_embeds(model, params, batch, tokens)
    plain = model.apply(params, batch["prefix_ids"], method=D2VLM.embed)
    slot = batch["question_evi_positions"][:, 0]
    return np.asarray(emb)[np.arange(2), slot], np.asarray(plain)[np.arange(2), slot]


def test_question_evidence_after_frames_skips_a_question_before_the_video():
    injected, plain = _prefix_embeds("always", question_before_frames=True)
    assert np.max(np.abs(injected - plain)) > 1e-3
    injected, plain = _prefix_embeds("after_frames", question_before_frames=True)
    np.testing.assert_array_equal(injected, plain)
    # a question after the video is injected in both modes, identically
    a, _ = _prefix_embeds("always", question_before_frames=False)
    b, plain = _prefix_embeds("after_frames", question_before_frames=False)
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - plain)) > 1e-3
    with pytest.raises(ValueError, match="model.question_evidence"):
        D2VLMConfig(llm=testing.tiny_d2vlm_config().llm, video=testing.tiny_d2vlm_config().video,
                    question_evidence="never")
