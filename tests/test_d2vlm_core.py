"""D²VLM core: single-pass injection == two-pass, loss terms by hand, packed pairs, padding,
sharding and the trainable/frozen partition."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vlm_jax import losses, objective, partition, sharding, testing
from d2vlm_jax.models import stacking
from d2vlm_jax.models.d2vlm import D2VLM, ForwardOutputs, forward, init_variables

LOSS = losses.LossConfig(normalization="token")   # the by-hand sums below are token means


@functools.lru_cache(maxsize=None)
def setup(family="phi3", scan=False):
    """(config, batch, params); ``scan``: the same parameters stacked, layers scanned."""
    if scan:
        config, batch, params = setup(family)
        config = config.with_scan_layers(True)
        return config, batch, stacking.to_layout(params, config.layer_stacks)
    config = testing.tiny_d2vlm_config(family=family)
    batch = testing.random_batch(config, seed=0, rejected=2)
    params = testing.perturbed_params(config, batch)
    return config, batch, params


def loss_fn(config, stage, loss_cfg=LOSS):
    model = D2VLM(config)

    def f(trainable, frozen, batch, reference_params=None):
        params = partition.merge(trainable, frozen)
        return objective.loss_and_metrics(model, params, batch, loss_cfg, stage=stage,
                                          reference_params=reference_params)
    return f


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


@SCAN
@pytest.mark.parametrize("stage", ["sft", "fpo"])
def test_single_pass_equals_two_pass_loss_and_gradients(stage, scan):
    config, batch, params = setup(scan=scan)
    trainable, frozen = partition.split(params, partition.D2VLM_TRAINABLE)
    results = {}
    for mode in ("single_pass", "two_pass"):
        cfg = dataclasses.replace(config, injection=mode)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn(cfg, stage), has_aux=True))
        (loss, metrics), grads = grad_fn(trainable, frozen, batch)
        results[mode] = (loss, metrics, grads)
    (l1, m1, g1), (l2, m2, g2) = results["single_pass"], results["two_pass"]
    print(f"{stage}: loss single {float(l1):.6f} two-pass {float(l2):.6f} rel {rel(l1, l2):.2e}")
    assert rel(l1, l2) <= 1e-5
    for k in m1:
        assert rel(m1[k], m2[k]) <= 1e-5 or abs(float(m1[k]) - float(m2[k])) <= 1e-6, k
    # every gradient leaf equal within 1e-5 of the gradient's overall scale, and within 1e-5
    # relative for every leaf of non-negligible size (>= 1e-3 of that scale)
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))]
    global_scale = max(float(np.max(np.abs(b))) for _, b in pairs)
    global_err = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    leaf_rel = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in pairs
                   if np.max(np.abs(b)) >= 1e-3 * global_scale)
    print(f"{stage}: gradient max abs err {global_err:.2e} (rel to max |g| {global_err / global_scale:.2e}), "
          f"worst per-leaf rel err {leaf_rel:.2e}")
    assert global_err <= 1e-5 * global_scale
    assert leaf_rel <= 1e-5
    # the gradient reaches the evidence path: frame states feed the injected <evi> embeddings
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g1["video"]["compressor"]["v_proj"])) > 0
    if scan:
        assert "layers" in g1["llm"] and "layers_0" not in g1["llm"]


def test_soft_targets_and_bce_by_hand():
    y = losses.soft_targets(jnp.array([2, 3]), 6, 2.0)
    np.testing.assert_allclose(y, [0.25, 0.5, 1, 1, 0.5, 0.25])
    np.testing.assert_allclose(losses.soft_targets(jnp.array([1, 1]), 4, 3.0), [1 / 3, 1, 1 / 3, 1 / 9], rtol=1e-6)
    bce = losses.bce_with_logits(jnp.array([0.0, 2.0, -30.0]), jnp.array([1.0, 0.5, 0.0]))
    np.testing.assert_allclose(bce, [np.log(2), 2 - 1 + np.log1p(np.exp(-2)), np.log1p(np.exp(-30))], rtol=1e-6)


def _outputs(token_logp, scores, evidence_embeddings):
    z = jnp.zeros((1,))
    return ForwardOutputs(jnp.asarray(token_logp, jnp.float32), None, jnp.asarray(scores, jnp.float32),
                          jnp.asarray(evidence_embeddings, jnp.float32), z, z)


def test_sft_losses_by_hand():
    # sample 0: one event [1, 1] referenced by a grounding and an answer <evi>; 3 frames, 2 valid
    # sample 1: no evidence (must not enter the L_gnd / L_cons average)
    b = {
        "frame_valid": np.array([[1, 1, 0], [1, 1, 1]], bool),
        "response_ids": np.zeros((2, 3), np.int32), "response_valid": np.ones((2, 3), bool),
        "response_loss_mask": np.array([[1, 1, 0], [1, 0, 0]], bool),
        "evi_positions": np.array([[0, 1], [0, 0]], np.int32), "evi_event": np.zeros((2, 2), np.int32),
        "evi_stage": np.array([[0, 1], [0, 0]], np.int32), "evi_valid": np.array([[1, 1], [0, 0]], bool),
        "event_intervals": np.array([[[1, 1]], [[0, 0]]], np.int32), "event_valid": np.array([[1], [0]], bool),
    }
    token_logp = np.log([[[0.5, 0.25, 0.9]], [[0.125, 0.9, 0.9]]])
    scores = np.array([[[[0.0, 1.0, 5.0], [2.0, -1.0, 5.0]]], [[[9, 9, 9], [9, 9, 9]]]])
    emb = np.array([[[[1.0, 2.0], [0.0, 4.0]]], [[[7, 7], [1, 1]]]])
    loss, m = losses.sft_losses(_outputs(token_logp, scores, emb), b, LOSS)
    lm = -(np.log(0.5) + np.log(0.25) + np.log(0.125)) / 3
    y = np.array([0.5, 1.0])  # frames 0, 1 (frame 2 is padding)

    def bce(s, t):
        return max(s, 0) - s * t + np.log1p(np.exp(-abs(s)))
    gnd = 10 * np.mean([bce(0, y[0]), bce(1, y[1]), bce(2, y[0]), bce(-1, y[1])])
    cons = 10 * (abs(1 - 0) + abs(2 - 4)) / 2
    np.testing.assert_allclose(m["loss/lm"], lm, rtol=1e-6)
    np.testing.assert_allclose(m["loss/gnd"], gnd, rtol=1e-6)
    np.testing.assert_allclose(m["loss/cons"], cons, rtol=1e-6)
    np.testing.assert_allclose(loss, lm + gnd + cons, rtol=1e-6)
    # argmax frames: query 0 -> frame 1 (in [1,1]); query 1 -> frame 0 (miss)
    np.testing.assert_allclose(m["grounding/accuracy"], 0.5)


def test_factorized_logps_and_fpo_loss_by_hand():
    # one pair: chosen + one rejected; 2 frames; response of 3 tokens; one evidence each
    b = {
        "frame_valid": np.array([[1, 1]], bool),
        "response_ids": np.zeros((1, 3), np.int32), "response_valid": np.array([[1, 1, 1]], bool),
        "evi_positions": np.array([[1]], np.int32), "evi_event": np.zeros((1, 1), np.int32),
        "evi_stage": np.zeros((1, 1), np.int32), "evi_valid": np.ones((1, 1), bool),
        "event_intervals": np.array([[[0, 0]]], np.int32), "event_valid": np.ones((1, 1), bool),
        "rejected_ids": np.zeros((1, 1, 3), np.int32), "rejected_valid": np.array([[[1, 1, 0]]], bool),
        "rejected_evi_positions": np.array([[[1]]], np.int32), "rejected_evi_event": np.zeros((1, 1, 1), np.int32),
        "rejected_evi_stage": np.zeros((1, 1, 1), np.int32), "rejected_evi_valid": np.ones((1, 1, 1), bool),
        "rejected_event_intervals": np.array([[[[1, 1]]]], np.int32), "rejected_event_valid": np.ones((1, 1, 1), bool),
        "rejected_valid_pair": np.ones((1, 1), bool),
        "conflict_token_mask": np.array([[[0, 1, 1]]], bool), "conflict_evi_mask": np.ones((1, 1, 1), bool),
        "rejected_conflict_token_mask": np.array([[[0, 1, 0]]], bool),
        "rejected_conflict_evi_mask": np.ones((1, 1, 1), bool),
    }
    token_logp = np.log([[[0.9, 0.5, 0.25], [0.9, 0.125, 0.7]]])
    scores = np.array([[[[0.0, 0.0]], [[2.0, -1.0]]]])   # [B, C1, M, N]
    out = _outputs(token_logp, scores, np.zeros((1, 2, 1, 2)))
    lp = losses.factorized_logps(out, b, alpha=2.0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    # chosen: y = [1, 0.5] for interval [0,0]; p = [0.5, 0.5]
    chosen_g = np.log(0.5 + 1e-10) + np.log(0.5 * 0.5 + 0.5 * 0.5 + 1e-10)
    # rejected: y = [0.5, 1] for interval [1,1]; p = sig([2, -1])
    p = sig(np.array([2.0, -1.0]))
    rejected_g = np.log(0.5 * p[0] + 0.5 * (1 - p[0]) + 1e-10) + np.log(p[1] + 1e-10)
    np.testing.assert_allclose(lp["chosen_text"], [[np.log(0.5) + np.log(0.25)]], rtol=1e-6)
    np.testing.assert_allclose(lp["rejected_text"], [[np.log(0.125)]], rtol=1e-6)
    np.testing.assert_allclose(lp["chosen_grounding"], [[chosen_g]], rtol=1e-6)
    np.testing.assert_allclose(lp["rejected_grounding"], [[rejected_g]], rtol=1e-6)

    pi_w = np.log(0.5) + np.log(0.25) + chosen_g
    pi_l = np.log(0.125) + rejected_g
    for beta in (0.1, 1.0):
        loss, m = losses.fpo_loss(lp, None, b["rejected_valid_pair"], beta)
        expected = np.log1p(np.exp(-beta * (pi_w - pi_l)))  # -log sigmoid(beta * margin), beta once
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        np.testing.assert_allclose(m["rewards/margin"], beta * (pi_w - pi_l), rtol=1e-6)
        np.testing.assert_allclose(m["rewards/accuracy"], float(pi_w > pi_l))
    ref = {"chosen_text": jnp.array([[-1.0]]), "chosen_grounding": jnp.array([[-0.5]]),
           "rejected_text": jnp.array([[-2.0]]), "rejected_grounding": jnp.array([[0.0]])}
    loss, m = losses.fpo_loss(lp, ref, b["rejected_valid_pair"], 0.1)
    expected_margin = 0.1 * ((pi_w + 1.5) - (pi_l + 2.0))
    # float32 arithmetic with cancellation in the margin: 1e-5 relative
    np.testing.assert_allclose(m["rewards/margin"], expected_margin, rtol=1e-5)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-expected_margin)), rtol=1e-5)


def test_fpo_with_reference_equal_to_policy_gives_log2():
    config, batch, params = setup()
    cfg = dataclasses.replace(LOSS, fpo_reference="frozen_params")
    model = D2VLM(config)
    _, m = jax.jit(lambda p, b: objective.loss_and_metrics(model, p, b, cfg, stage="fpo", reference_params=p))(
        params, batch)
    np.testing.assert_allclose(m["loss/fpo"], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/margin"], 0.0, atol=1e-6)
    cfg = dataclasses.replace(LOSS, fpo_reference="lora_disabled")
    _, m_lora = jax.jit(lambda p, b: objective.loss_and_metrics(model, p, b, cfg, stage="fpo"))(params, batch)
    assert abs(float(m_lora["rewards/margin"])) > 1e-4  # LoRA is active in the policy, not the reference


def test_packed_pair_equals_separate_forwards():
    config, batch, params = setup()
    model = D2VLM(config)
    fwd = jax.jit(lambda p, b, rej: forward(model, {"params": p}, b, with_rejected=rej), static_argnums=2)
    packed = fwd(params, batch, True)
    chosen_alone = fwd(params, batch, False)
    np.testing.assert_allclose(packed.token_logp[:, 0], chosen_alone.token_logp[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed.scores[:, 0], chosen_alone.scores[:, 0], rtol=1e-5, atol=1e-6)
    sft = jax.jit(lambda p, b, s: objective.loss_and_metrics(model, p, b, LOSS, stage=s), static_argnums=2)
    (_, m_sft), (_, m_fpo) = sft(params, batch, "sft"), sft(params, batch, "fpo")
    np.testing.assert_allclose(m_fpo["loss/sft"], m_sft["loss/sft"], rtol=1e-6)
    for c in range(2):
        alone = dict(batch)
        for f in ("evi_positions", "evi_event", "evi_stage", "evi_valid", "event_intervals", "event_valid"):
            alone[f] = batch[f"rejected_{f}"][:, c]
        alone["response_ids"], alone["response_valid"] = batch["rejected_ids"][:, c], batch["rejected_valid"][:, c]
        out = fwd(params, alone, False)
        valid = batch["rejected_valid"][:, c]
        np.testing.assert_allclose(np.asarray(packed.token_logp[:, 1 + c])[valid],
                                   np.asarray(out.token_logp[:, 0])[valid], rtol=1e-5, atol=1e-6)
        ev = batch["rejected_evi_valid"][:, c]
        np.testing.assert_allclose(np.asarray(packed.scores[:, 1 + c])[ev], np.asarray(out.scores[:, 0])[ev],
                                   rtol=1e-5, atol=1e-5)


def pad_batch(batch, extra):
    """Pads every padded axis with `extra` more invalid entries (frames, prefix, response, ...)."""
    axes = {"frames": (1,), "frame_valid": (1,), "frame_positions": (1,), "qformer_ids": (1,), "qformer_valid": (1,),
            "prefix_ids": (1,), "prefix_valid": (1,), "question_evi_positions": (1,), "question_evi_intervals": (1,),
            "question_evi_valid": (1,), "response_ids": (1,), "response_valid": (1,), "response_loss_mask": (1,),
            "evi_positions": (1,), "evi_event": (1,), "evi_stage": (1,), "evi_valid": (1,),
            "event_intervals": (1,), "event_valid": (1,)}
    out = {}
    for k, v in batch.items():
        if k not in axes:
            continue
        widths = [(0, 0)] * v.ndim
        for a in axes[k]:
            widths[a] = (0, extra)
        pad_value = 255 if k == "frames" else 0   # padded pixels are garbage: they must not matter
        out[k] = np.pad(v, widths, constant_values=pad_value)
    return out


def test_padding_never_changes_the_loss():
    config, batch, params = setup()
    model = D2VLM(config)
    f = jax.jit(lambda p, b: objective.loss_and_metrics(model, p, b, LOSS, stage="sft"))
    sft_batch = {k: v for k, v in batch.items() if not k.startswith(("rejected", "conflict"))}
    loss, m = f(params, sft_batch)
    loss_padded, m_padded = f(params, pad_batch(sft_batch, 3))
    print(f"padding: loss {float(loss):.6f} padded {float(loss_padded):.6f}")
    np.testing.assert_allclose(loss_padded, loss, rtol=1e-5)
    for k in m:
        np.testing.assert_allclose(m_padded[k], m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # and a padding *row* (all invalid) changes nothing either
    row = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in sft_batch.items()}
    loss_row, _ = f(params, row)
    np.testing.assert_allclose(loss_row, loss, rtol=1e-5)


@SCAN
def test_sharded_loss_and_grad_equal_unsharded(scan):
    """The unrolled model on one device against the model (unrolled or scanned, the same
    parameters stacked) sharded over data x fsdp x tensor."""
    config, _, params = setup()
    batch = testing.random_batch(config, seed=3, batch=4, rejected=2)  # 4 rows over data x fsdp = 4
    trainable, frozen = partition.split(params, partition.D2VLM_TRAINABLE)
    f = jax.value_and_grad(loss_fn(config, "fpo"), has_aux=True)
    (loss, _), grads = jax.jit(f)(trainable, frozen, batch)
    config, _, params = setup(scan=scan)
    trainable, frozen = partition.split(params, partition.D2VLM_TRAINABLE)
    f = jax.value_and_grad(loss_fn(config, "fpo"), has_aux=True)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(lambda: init_variables(config, jax.random.key(0), batch))
    shard = sharding.shardings_for(abstract, mesh, config.llm.sharding_rules)["params"]
    t_shard, f_shard = partition.split(shard, partition.D2VLM_TRAINABLE)
    with jax.set_mesh(mesh):
        g = jax.jit(f, in_shardings=(t_shard, f_shard, None))
        global_batch = sharding.host_batch_to_global(batch, mesh)
        (loss_s, _), grads_s = g(jax.device_put(trainable, t_shard), jax.device_put(frozen, f_shard), global_batch)
    print(f"sharded loss rel err {rel(loss_s, loss):.2e}")
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(grads_s))  # really sharded
    assert not global_batch["frames"].sharding.is_fully_replicated
    assert rel(loss_s, loss) <= 1e-5
    grads_s = stacking.to_layout(grads_s, config.with_scan_layers(False).layer_stacks)
    assert jax.tree.structure(grads_s) == jax.tree.structure(grads)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_trainable_partition_matches_spec():
    _, _, params = setup()
    trainable, frozen = partition.split(params, partition.D2VLM_TRAINABLE)
    t = set(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0])
    f = set(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(frozen)[0])
    assert not t & f
    has = lambda names, s: any(s in n for n in names)  # noqa: E731
    for needle in ("'lora_a'", "'lora_b'", "'embed_tokens'", "'lm_head'", "'frm_head'", "'evi_head'",
                   "'query_tokens'", "'ln_vision'", "'compressor'"):
        assert has(t, needle), needle
    for needle in ("'vision'", "'gate_up_proj'", "'down_proj'", "['base']", "'input_layernorm'"):
        assert has(f, needle) and not has(t, needle), needle
    assert not any("'llm'" in n and "'base'" in n for n in t)
    counts = partition.summary(params, partition.D2VLM_TRAINABLE)
    assert counts["trainable"] > 0 and counts["frozen"] > counts["trainable"] // 10
