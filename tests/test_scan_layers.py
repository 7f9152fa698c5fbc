"""Scanned layers (``scan_layers``): the stacked parameter layout, its conversion from and to
the unrolled one, and scanned == unrolled for losses, gradients, LoRA, checkpoints and the
named remat policies. (The parity and equivalence tests elsewhere run with scan on and off.)"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2vlm_jax import config as cfg_lib
from d2vlm_jax import losses, objective, partition, sharding, testing
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models import lora as lora_lib
from d2vlm_jax.models import stacking
from d2vlm_jax.models.d2vlm import D2VLM, abstract_variables
from d2vlm_jax.models.decoder import Decoder, DecoderConfig, init_decoder
from d2vlm_jax.models.qformer import QFormerConfig
from d2vlm_jax.train import checkpoint as ckpt_lib
from d2vlm_jax.train.step import init_state


def tiny(scan: bool, **llm):
    """3 decoder layers (k_evi = 1 and L - 1 = 2 are read inside the scan), 2 vision blocks,
    a 4-layer Q-Former (2 scanned blocks of a cross-attention layer and a plain one)."""
    c = testing.tiny_d2vlm_config(layers=3, k_evi=1)
    c = dataclasses.replace(c, llm=dataclasses.replace(c.llm, **llm),
                            video=dataclasses.replace(c.video, qformer=dataclasses.replace(c.video.qformer,
                                                                                             num_layers=4)))
    return c.with_scan_layers(scan)


@functools.lru_cache(maxsize=None)
def unrolled_setup():
    config = tiny(False)
    batch = testing.random_batch(config, seed=0, rejected=2)
    params = testing.perturbed_params(config, batch)
    return config, batch, params


def max_abs(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def test_stacked_layout_is_what_the_scanned_model_initializes_and_converts_back_exactly():
    config, batch, params = unrolled_setup()
    scan_cfg = config.with_scan_layers(True)
    stacked = stacking.to_layout(params, scan_cfg.layer_stacks)
    want = sharding.unbox(abstract_variables(scan_cfg, batch))["params"]
    assert jax.tree.structure(stacked) == jax.tree.structure(want)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, stacked, want))
    llm, qf = stacked["llm"]["layers"], stacked["video"]["qformer"]["layers"]
    assert "layers_0" not in stacked["llm"] and "blocks_0" not in stacked["video"]["vision"]
    np.testing.assert_array_equal(llm["mlp"]["down_proj"]["kernel"][2], params["llm"]["layers_2"]["mlp"]["down_proj"]["kernel"])
    # Q-Former: unrolled layer i = sub_{i % 2} at index i // 2; only sub_0 has cross-attention
    np.testing.assert_array_equal(qf["sub_1"]["self_attn"]["query"]["kernel"][1],
                                  params["video"]["qformer"]["layers_3"]["self_attn"]["query"]["kernel"])
    np.testing.assert_array_equal(qf["sub_0"]["cross_attn"]["key"]["kernel"][1],
                                  params["video"]["qformer"]["layers_2"]["cross_attn"]["key"]["kernel"])
    assert "cross_attn" not in qf["sub_1"]
    again = stacking.to_layout(stacked, scan_cfg.layer_stacks)  # idempotent
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked)))
    back = stacking.to_layout(stacked, config.layer_stacks)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    assert [s.scanned for s in stacking.layout_of(stacked, config.layer_stacks)] == [True] * 3
    assert [s.scanned for s in stacking.layout_of(params, scan_cfg.layer_stacks)] == [False] * 3
    # partial trees (the trainable part) stack too, and a missing layer is named
    trainable, _ = partition.split(params, partition.D2VLM_TRAINABLE)
    t_stacked = stacking.to_layout(trainable, scan_cfg.layer_stacks)
    assert set(t_stacked["llm"]["layers"]["attn"]["qkv_proj"]) == {"lora_a", "lora_b"}
    broken = {"llm": {k: v for k, v in params["llm"].items() if k != "layers_1"}}
    with pytest.raises(ValueError, match=r"layers \['layers_1'\] are missing"):
        stacking.to_layout(broken, scan_cfg.layer_stacks)


def test_stacked_parameters_carry_the_layers_axis_unsharded():
    config, batch, _ = unrolled_setup()
    boxed = abstract_variables(config.with_scan_layers(True), batch)
    specs = sharding.logical_axes_tree(boxed)["params"]
    assert tuple(specs["llm"]["layers"]["attn"]["qkv_proj"]["base"]["kernel"]) == ("layers", "embed", "qkv")
    assert tuple(specs["video"]["vision"]["blocks"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(specs["video"]["qformer"]["layers"]["sub_0"]["cross_attn"]["key"]["kernel"])[0] == "layers"
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sh = sharding.shardings_for(boxed, mesh, config.llm.sharding_rules)["params"]
    assert sh["llm"]["layers"]["attn"]["qkv_proj"]["base"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")


def loss_fn(config, stage):
    model = D2VLM(config)

    def f(trainable, frozen, batch):
        return objective.loss_and_metrics(model, partition.merge(trainable, frozen), batch, losses.LossConfig(),
                                          stage=stage)
    return f


@pytest.mark.parametrize("stage", ["sft", "fpo"])
def test_scanned_and_unrolled_models_give_the_same_loss_and_gradients(stage):
    config, batch, params = unrolled_setup()
    results = {}
    for scan in (False, True):
        # the scanned model also rematerializes every layer body (remat inside the scan)
        cfg = tiny(scan, remat_policy="full" if scan else "none")
        p = stacking.to_layout(params, cfg.layer_stacks)
        trainable, frozen = partition.split(p, partition.D2VLM_TRAINABLE)
        (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn(cfg, stage), has_aux=True))(trainable, frozen,
                                                                                                 batch)
        results[scan] = (loss, metrics, stacking.to_layout(grads, config.layer_stacks))
    (l0, m0, g0), (l1, m1, g1) = results[False], results[True]
    print(f"{stage}: loss unrolled {float(l0):.6f} scanned {float(l1):.6f}")
    assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
    for k in m0:
        assert abs(float(m1[k]) - float(m0[k])) <= 1e-5 * max(abs(float(m0[k])), 1e-1), k
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    scale = max_abs(g0)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    print(f"{stage}: gradient max abs err {err:.2e} (max |g| {scale:.2e})")
    assert err <= 1e-5 * scale
    # the gradient reaches the Q-Former's scanned cross-attention and the decoder's LoRA
    assert max_abs(g1["video"]["qformer"]["layers_2"]["cross_attn"]) > 0
    assert max_abs(g1["llm"]["layers_0"]["attn"]["qkv_proj"]["lora_b"]) > 0


def test_lora_merge_disable_strip_on_stacked_parameters():
    config, _, params = unrolled_setup()
    scan_cfg = config.with_scan_layers(True)
    stacked = stacking.to_layout(params, scan_cfg.layer_stacks)
    a, r = config.llm.lora_alpha, config.llm.lora_rank
    for op in (lambda t: lora_lib.merge_lora(t, a, r), lora_lib.disable_lora, lora_lib.strip_lora):
        want = stacking.to_layout(op(params["llm"]), (config.llm.layer_stack.with_scanned(True),))
        got = op(stacked["llm"])
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert lora_lib.count_lora_params(stacked) == lora_lib.count_lora_params(params) > 0


def test_params_checkpoints_of_either_layout_load_into_the_other(tmp_path):
    config, batch, params = unrolled_setup()
    scan_cfg = config.with_scan_layers(True)
    stacked = stacking.to_layout(params, scan_cfg.layer_stacks)
    ckpt_lib.save_params(str(tmp_path / "unrolled"), params)
    ckpt_lib.save_params(str(tmp_path / "scanned"), stacked)
    for src, cfg, want in (("unrolled", scan_cfg, stacked), ("scanned", config, params)):
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
        for loaded in (ckpt_lib.load_params(str(tmp_path / src), abstract, stacks=cfg.layer_stacks),
                       ckpt_lib.load_params(str(tmp_path / src), stacks=cfg.layer_stacks)):
            assert jax.tree.structure(loaded) == jax.tree.structure(want), src
            assert all(np.array_equal(np.asarray(x), np.asarray(y))
                       for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)))
    # without stacks the checkpoint comes back as written
    assert "layers_0" in ckpt_lib.load_params(str(tmp_path / "unrolled"))["llm"]


def test_train_state_of_the_unrolled_layout_resumes_into_the_scanned_model(tmp_path):
    config, _, params = unrolled_setup()
    scan_cfg = config.with_scan_layers(True)
    tx = optax.adam(1e-3)
    trainable, _ = partition.split(params, partition.D2VLM_TRAINABLE)
    state = init_state(trainable, tx, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)  # nonzero moments
    state = state.replace(opt_state=opt_state, params=optax.apply_updates(state.params, updates))
    mngr = ckpt_lib.manager(str(tmp_path), max_to_keep=1, save_every=1, async_save=False)
    ckpt_lib.save(mngr, 3, state, None, force=True)
    mngr.wait_until_finished()
    want = stacking.to_layout(state, scan_cfg.layer_stacks)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
    restored, step = ckpt_lib.restore(mngr, abstract, None, stacks=scan_cfg.layer_stacks)
    assert step == 3
    assert jax.tree.structure(restored) == jax.tree.structure(want)
    assert all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves((restored.params, restored.opt_state, restored.step)),
                               jax.tree.leaves((want.params, want.opt_state, want.step))))
    assert restored.opt_state[0].mu["llm"]["layers"]["attn"]["o_proj"]["lora_a"].shape[0] == config.llm.num_layers
    mngr.close()


def test_named_remat_policy_saves_the_tagged_values_and_keeps_the_gradients():
    base = DecoderConfig(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                         num_heads=2, num_kv_heads=2, scan_layers=True)
    params = sharding.unbox(init_decoder(base, jax.random.key(0)))["params"]
    ids = jnp.arange(10)[None] % 40
    layout = attn_lib.SequenceLayout.causal(jnp.ones((1, 10), bool))

    def loss(p, cfg):
        out = Decoder(cfg).apply({"params": p}, input_ids=ids, positions=jnp.arange(10)[None], layout=layout)
        return jnp.sum(out.logits ** 2)

    from jax._src.ad_checkpoint import saved_residuals
    grads, shapes = {}, {}
    for policy in ("none", "full", "save:mlp_hidden"):
        cfg = dataclasses.replace(base, remat_policy=policy)
        grads[policy] = jax.grad(loss)(params, cfg)
        shapes[policy] = [str(aval) for aval, _ in saved_residuals(lambda p: loss(p, cfg), params)]
    mlp_stack = "float32[2,1,10,24]"  # [L, B, T, intermediate]: the tagged SwiGLU product, saved per layer
    assert mlp_stack in shapes["save:mlp_hidden"] and mlp_stack not in shapes["full"]
    assert len(shapes["full"]) < len(shapes["save:mlp_hidden"]) < len(shapes["none"])
    for policy in ("full", "save:mlp_hidden"):
        for a, b in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown remat policy"):
        Decoder(dataclasses.replace(base, remat_policy="save_only_these_names")).init(
            jax.random.key(0), input_ids=ids, positions=jnp.arange(10)[None], layout=layout)


def test_one_config_switch_scans_every_stack():
    from configs import synthetic
    c = synthetic.get_config()
    c.model.llm.vocab_size = c.model.video.qformer.vocab_size = 64
    assert not cfg_lib.model_config(c).llm.scan_layers
    c.model.scan_layers = True
    m = cfg_lib.model_config(c)
    assert m.llm.scan_layers and m.video.vision.scan_layers and m.video.qformer.scan_layers
    c.model.llm.scan_layers = False
    with pytest.raises(cfg_lib.ConfigError, match="config.model.llm.scan_layers=False contradicts"):
        cfg_lib.model_config(c)
    with pytest.raises(ValueError, match="num_layers=3 is not a multiple"):
        QFormerConfig(num_layers=3, cross_attention_frequency=2, scan_layers=True)


def test_full_size_configs_scan_their_layers():
    from configs import d2vlm_phi3_fpo, d2vlm_phi3_sft, d2vlm_phi3_v5e, d2vlm_phi3_v5p
    for c in (d2vlm_phi3_sft.get_config(), d2vlm_phi3_fpo.get_config(), d2vlm_phi3_v5p.get_config(),
              d2vlm_phi3_v5e.get_config("fpo")):
        m = cfg_lib.model_config(c)
        assert m.llm.scan_layers and m.video.vision.scan_layers and m.video.qformer.scan_layers


def test_trainable_table_covers_the_scanned_paths():
    """The default partition gives every scanned leaf the decision of its unrolled layers."""
    config, batch, params = unrolled_setup()
    scan_cfg = config.with_scan_layers(True)
    stacked = stacking.to_layout(params, scan_cfg.layer_stacks)
    t_unrolled, _ = partition.split(params, partition.D2VLM_TRAINABLE)
    t_scanned, f_scanned = partition.split(stacked, partition.D2VLM_TRAINABLE)
    want = stacking.to_layout(t_unrolled, scan_cfg.layer_stacks)
    assert jax.tree.structure(t_scanned) == jax.tree.structure(want)
    assert "cross_attn" in t_scanned["video"]["qformer"]["layers"]["sub_0"]
    assert "ffn_query" in f_scanned["video"]["qformer"]["layers"]["sub_1"]
    assert "blocks" in f_scanned["video"]["vision"] and "vision" not in t_scanned["video"]


def test_unrolled_stack_needs_no_whole_blocks():
    """A 1-layer Q-Former with cross-attention every 2 layers is a valid unrolled model (the
    smoke config); only the scanned layout needs whole blocks."""
    from d2vlm_jax.models import stacking
    assert stacking.LayerStack((), "layers_", "layers", 1, 2, False).unrolled_keys() == ["layers_0"]
    with pytest.raises(ValueError, match="1 layers cannot be scanned in blocks of 2"):
        stacking.LayerStack((), "layers_", "layers", 1, 2, True)
