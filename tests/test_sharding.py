"""Sharding core on 8 fake CPU devices: mesh, golden parameter specs, sharded == unsharded."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from d2vlm_jax import sharding
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models import stacking
from d2vlm_jax.models.decoder import Decoder, DecoderConfig, init_decoder

CONFIG = DecoderConfig(family="phi3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, lora_rank=4, lora_alpha=8.0)


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_make_mesh_fill_and_errors():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh([-1, 1, 1]).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices but 8"):
        sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="do not divide"):
        sharding.make_mesh({"data": 3, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"model": 8})


GOLDEN = {
    "embed_tokens/embedding": P("tensor", "fsdp"),
    "layers_0/attn/qkv_proj/base/kernel": P("fsdp", "tensor"),
    "layers_0/attn/qkv_proj/lora_a": P("fsdp"),
    "layers_0/attn/qkv_proj/lora_b": P(None, "tensor"),
    "layers_0/attn/o_proj/base/kernel": P("tensor", "fsdp"),
    "layers_0/attn/o_proj/lora_a": P("tensor"),
    "layers_0/attn/o_proj/lora_b": P(None, "fsdp"),
    "layers_0/mlp/gate_up_proj/kernel": P("fsdp", "tensor"),
    "layers_0/mlp/down_proj/kernel": P("tensor", "fsdp"),
    "layers_0/input_layernorm/scale": P(),
    "layers_0/post_attention_layernorm/scale": P(),
    "norm/scale": P(),
    "lm_head/kernel": P("fsdp", "tensor"),
}


def flat_specs(shardings):
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {"/".join(str(k.key) for k in path): s.spec for path, s in flat}


def test_golden_parameter_partition_specs():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(lambda: init_decoder(CONFIG, jax.random.key(0)))
    specs = flat_specs(sharding.shardings_for(abstract, mesh, CONFIG.sharding_rules)["params"])
    for path, expected in GOLDEN.items():
        assert specs[path] == expected, (path, specs[path], expected)
    assert len(specs) == 2 * 10 + 3  # 2 layers x 10 leaves + embed, norm, lm_head


def test_indivisible_dimension_is_replicated_not_an_error():
    spec = sharding.logical_to_spec(("vocab", "embed"), sharding.DEFAULT_RULES, shape=(101, 32),
                                    mesh_shape={"data": 2, "fsdp": 2, "tensor": 2})
    assert spec == P(None, "fsdp")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_sharded_forward_equals_unsharded(scan):
    """The unrolled decoder on one device against the decoder (unrolled or scanned, with the
    same parameters stacked) sharded over data x fsdp x tensor."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    variables = init_decoder(CONFIG, jax.random.key(1))
    params = sharding.unbox(variables)
    params = jax.tree.map(lambda x: x + 0.05, params)  # nonzero LoRA B
    config = dataclasses.replace(CONFIG, scan_layers=scan)
    abstract = jax.eval_shape(lambda: init_decoder(config, jax.random.key(1)))
    param_shardings = sharding.shardings_for(abstract, mesh, CONFIG.sharding_rules)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 10)).astype(np.int32)
    valid = np.ones((4, 10), bool)
    valid[3, 7:] = False

    def forward(p, batch, config=CONFIG):
        layout = attn_lib.SequenceLayout.causal(batch["valid"])
        positions = attn_lib.positions_from_valid(batch["valid"])
        return Decoder(config).apply(p, input_ids=batch["ids"], positions=positions, layout=layout).logits

    expected = jax.jit(forward)(params, {"ids": ids, "valid": valid})
    sharded_params = jax.device_put(stacking.to_layout(params, [config.layer_stack]), param_shardings)
    batch = sharding.host_batch_to_global({"ids": ids, "valid": valid}, mesh)
    assert batch["ids"].sharding.spec == P(("data", "fsdp"))
    with jax.set_mesh(mesh):
        fn = jax.jit(functools.partial(forward, config=config))
        actual = fn(sharded_params, batch)
        hlo = fn.lower(sharded_params, batch).as_text()
    # the activation constraints of the decoder are really in the program (scanned: in the
    # loop body, residual stream and MLP, once for every layer)
    assert hlo.count("sdy.sharding_constraint") >= (2 if scan else CONFIG.num_layers)
    if scan:
        assert sharded_params["params"]["layers"]["mlp"]["gate_up_proj"]["kernel"].sharding.spec == P(
            None, "fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert sharded_params["params"]["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_constrain_applies_under_mesh_and_is_identity_without():
    x = jnp.ones((8, 4, 16))
    assert sharding.constrain(x, ("batch", "length", "act_embed"), sharding.DEFAULT_RULES) is x
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None, "act_mlp"), sharding.DEFAULT_RULES))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")


def test_rules_with_overrides_one_name_and_keeps_the_rest():
    rules = sharding.rules_with({"frames": ["data", "fsdp", "tensor"], "new_axis": "tensor"})
    table = dict(rules)
    assert table["frames"] == ("data", "fsdp", "tensor")
    assert table["new_axis"] == "tensor"
    assert {k: v for k, v in rules if k not in ("frames", "new_axis")} == \
        {k: v for k, v in sharding.DEFAULT_RULES if k != "frames"}
    assert [k for k, _ in rules][:len(sharding.DEFAULT_RULES)] == [k for k, _ in sharding.DEFAULT_RULES]
    mesh_shape = {"data": 1, "fsdp": 2, "tensor": 4}
    assert sharding.logical_to_spec(("frames", None), rules, (16, 3), mesh_shape) == P(("fsdp", "tensor"))
    # 12 frames do not split 8 ways: the tensor axis is dropped for them, fsdp kept
    assert sharding.logical_to_spec(("frames", None), rules, (12, 3), mesh_shape) == P("fsdp")
