"""The attention kernels against the XLA path (float32, CPU): splash attention in Pallas
interpret mode and the exact call the cuDNN path makes, run through XLA. Random D²VLM layouts:
padding, a bidirectional frame block at a random offset, 1-3 response branches against the
prefix cache; forward and gradients to 1e-5."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from d2vlm_jax import sharding
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models.decoder import DecoderConfig
from d2vlm_jax.models.kernels import cudnn, splash

TOL = 1e-5


def random_layout(rng, batch: int, prefix: int, response: int, branches: int) -> attn_lib.SequenceLayout:
    """Prefix (valid run, then padding; frames one block at a random offset) followed by
    ``branches`` response branches of ``response`` slots (valid run, then padding; a
    rejected branch may be entirely padding)."""
    s = prefix + branches * response
    valid = np.zeros((batch, s), bool)
    branch = np.zeros((batch, s), np.int32)
    block = np.zeros((batch, s), np.int32)
    for b in range(batch):
        n = rng.integers(prefix // 2, prefix + 1)
        valid[b, :n] = True
        frames = rng.integers(1, n // 2)
        start = rng.integers(0, n - frames + 1)
        block[b, start:start + frames] = 1
        for c in range(branches):
            lo = prefix + c * response
            branch[b, lo:lo + response] = c + 1
            m = rng.integers(1 if c == 0 else 0, response + 1)
            valid[b, lo:lo + m] = True
    return attn_lib.SequenceLayout(jnp.asarray(valid), jnp.asarray(branch), jnp.asarray(block))


def random_qkv(rng, batch, t, s, heads=4, kv_heads=2, dim=32):
    q = rng.normal(size=(batch, t, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, s, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, s, kv_heads, dim)).astype(np.float32)
    w = rng.normal(size=(batch, t, heads, dim)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(w)


def value_and_grads(fn, q, k, v, w):
    """fwd output and d<w, out>/d(q, k, v) (one jitted program)."""
    def both(q, k, v, w):
        return fn(q, k, v), jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    return jax.jit(both)(q, k, v, w)


def max_errors(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    return float(jnp.max(jnp.abs(out_a - out_b))), max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(grads_a, grads_b))


def test_build_mask_gives_padding_rows_their_own_slot_only():
    layout = random_layout(np.random.default_rng(0), batch=2, prefix=12, response=6, branches=2)
    mask = np.asarray(attn_lib.build_mask(layout, 12, 12))        # the response rows
    valid = np.asarray(layout.valid)
    assert mask.any(-1).all()                                     # no empty row, ever
    for b in range(2):
        for i in range(12):
            if not valid[b, 12 + i]:
                assert mask[b, i].sum() == 1 and mask[b, i, 12 + i]
            else:
                assert not mask[b, i][~valid[b]].any()            # real tokens never see padding
    empty = attn_lib.SequenceLayout.causal(jnp.zeros((1, 8), bool))  # a batch-padding row
    assert np.array_equal(np.asarray(attn_lib.build_mask(empty, 0, 8))[0], np.eye(8, dtype=bool))


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_splash_matches_xla_on_response_branches_against_the_prefix_cache(branches):
    rng = np.random.default_rng(branches)
    prefix, response = 96, 40                           # S = 136..216: padded to the kernel's 128 multiple
    layout = random_layout(rng, batch=2, prefix=prefix, response=response, branches=branches)
    mask = attn_lib.AttentionMask(layout, prefix)
    q, k, v, w = random_qkv(rng, 2, branches * response, prefix + branches * response)
    ref = value_and_grads(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, "xla"), q, k, v, w)
    got = value_and_grads(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, "splash"), q, k, v, w)
    fwd, grad = max_errors(got, ref)
    print(f"splash vs xla, {branches} branch(es): fwd {fwd:.2e} grads {grad:.2e}")
    assert fwd <= TOL and grad <= TOL


def test_splash_matches_xla_on_the_prefix_with_frame_blocks_and_two_blocks_of_128():
    rng = np.random.default_rng(7)
    layout = random_layout(rng, batch=3, prefix=256, response=1, branches=1)
    layout = attn_lib.SequenceLayout(*(x[:, :256] for x in layout))           # the prefix alone
    mask = attn_lib.AttentionMask(layout, 0)
    q, k, v, w = random_qkv(rng, 3, 256, 256, heads=2, kv_heads=2, dim=16)
    ref = value_and_grads(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, "xla"), q, k, v, w)
    got = value_and_grads(lambda q, k, v: splash.splash_attention(q, k, v, mask), q, k, v, w)
    fwd, grad = max_errors(got, ref)
    print(f"splash vs xla, prefix 256: fwd {fwd:.2e} grads {grad:.2e}")
    assert fwd <= TOL and grad <= TOL
    assert splash.block_size(256) == 256 and splash.block_size(384) == 128 and splash.block_size(1536) == 512


def test_splash_under_a_mesh_shards_batch_and_heads_and_matches_unsharded():
    rng = np.random.default_rng(3)
    layout = random_layout(rng, batch=4, prefix=64, response=32, branches=2)
    mask = attn_lib.AttentionMask(layout, 64)
    q, k, v, w = random_qkv(rng, 4, 64, 128, heads=4, kv_heads=2, dim=16)
    ref = value_and_grads(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, "xla"), q, k, v, w)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    fn = jax.jit(lambda q, k, v, w: value_and_grads(
        lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, "splash"), q, k, v, w))
    with jax.set_mesh(mesh):
        hlo = fn.lower(q, k, v, w).as_text()
        got = fn(q, k, v, w)
    assert "shard_map" in hlo or "manual" in hlo.lower()
    fwd, grad = max_errors(got, ref)
    assert fwd <= TOL and grad <= TOL


def test_splash_on_a_dense_mask_and_without_mask():
    rng = np.random.default_rng(4)
    q, k, v, w = random_qkv(rng, 2, 130, 130, heads=2, kv_heads=1, dim=8)
    dense = jnp.asarray(rng.random((2, 130, 130)) < 0.3) | jnp.eye(130, dtype=bool)[None]
    for mask in (dense, None):
        ref = value_and_grads(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, "xla"), q, k, v, w)
        got = value_and_grads(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, "splash"), q, k, v, w)
        fwd, grad = max_errors(got, ref)
        assert fwd <= TOL and grad <= TOL


def test_no_nan_for_a_fully_padded_example():
    rng = np.random.default_rng(5)
    layout = random_layout(rng, batch=2, prefix=64, response=32, branches=1)
    layout = attn_lib.SequenceLayout(layout.valid.at[1].set(False), layout.branch, layout.block)
    mask = attn_lib.AttentionMask(layout, 64)
    q, k, v, w = random_qkv(rng, 2, 32, 96)
    for impl in ("xla", "splash"):
        out, grads = value_and_grads(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask, impl), q, k, v, w)
        assert np.isfinite(np.asarray(out)).all() and all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("branches", [1, 3])
def test_cudnn_call_through_xla_matches_the_xla_path(branches):
    """The bias, padding and GQA layout handed to cuDNN, run by jax.nn's XLA implementation."""
    rng = np.random.default_rng(10 + branches)
    prefix, response = 30, 11                                          # odd S: padded to even
    layout = random_layout(rng, batch=2, prefix=prefix, response=response, branches=branches)
    mask = attn_lib.AttentionMask(layout, prefix)
    q, k, v, w = random_qkv(rng, 2, branches * response, prefix + branches * response)
    dense = mask.dense(branches * response)
    ref = value_and_grads(lambda q, k, v: attn_lib.xla_attention(q, k, v, dense), q, k, v, w)
    got = value_and_grads(lambda q, k, v: cudnn.cudnn_attention(q, k, v, dense, implementation="xla"), q, k, v, w)
    fwd, grad = max_errors(got, ref)
    print(f"cudnn call via xla vs xla, {branches} branch(es): fwd {fwd:.2e} grads {grad:.2e}")
    assert fwd <= TOL and grad <= TOL
    bias = cudnn.mask_to_bias(dense, jnp.bfloat16)
    assert bias.shape == (2, 1) + dense.shape[1:] and bias.dtype == jnp.bfloat16
    assert float(bias.max()) == 0.0 and float(bias.min()) < -1e38


def test_cudnn_refuses_float32_with_a_clear_error():
    q = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        cudnn.cudnn_attention(q, q, q, jnp.ones((1, 4, 4), bool))


def test_implementation_resolution():
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    assert attn_lib.resolve_implementation("auto", q, q) == "xla"          # CPU
    assert attn_lib.resolve_implementation("splash", q[:, :1], q) == "xla"  # a decoding step
    assert attn_lib.resolve_implementation("cudnn", q, q) == "cudnn"
    with pytest.raises(ValueError, match="implementation"):
        attn_lib.resolve_implementation("flash", q, q)


@pytest.mark.slow
def test_decoder_prefix_then_branches_with_splash_equal_xla():
    """The decoder as D²VLM runs it (prefix with a frame block into a cache, then three packed
    branches against it; layers under remat) with splash (interpret mode) vs XLA attention:
    logits and parameter gradients."""
    import dataclasses

    from d2vlm_jax.models.decoder import Decoder, KVCache, init_decoder

    config = DecoderConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, remat_policy="full")
    rng = np.random.default_rng(9)
    prefix, response, branches = 24, 10, 3
    layout = random_layout(rng, batch=2, prefix=prefix, response=response, branches=branches)
    p_layout = attn_lib.SequenceLayout(*(x[:, :prefix] for x in layout))
    ids = jnp.asarray(rng.integers(0, 32, (2, prefix + branches * response)), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(prefix + branches * response), (2, 1)), jnp.int32)
    params = sharding.unbox(init_decoder(config, jax.random.key(0)))["params"]
    w = jnp.asarray(rng.normal(size=(2, branches * response, 32)), jnp.float32)

    def run(params, impl):
        model = Decoder(dataclasses.replace(config, attention_impl=impl))
        pre = model.apply({"params": params}, input_ids=ids[:, :prefix], positions=positions[:, :prefix],
                          layout=p_layout, cache=KVCache.zeros(config, 2, prefix), compute_logits=False)
        out = model.apply({"params": params}, input_ids=ids[:, prefix:], positions=positions[:, prefix:],
                          layout=layout, cache=pre.cache.pad_to(layout.valid.shape[1]), query_start=prefix)
        return jnp.sum(out.logits * w), out.logits

    results = {impl: jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)(params, impl)
               for impl in ("xla", "splash")}
    ((_, logits_x), g_x), ((_, logits_s), g_s) = results["xla"], results["splash"]
    fwd = float(jnp.max(jnp.abs(logits_s - logits_x)))
    grad = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_x)))
    print(f"decoder splash vs xla: logits {fwd:.2e} param grads {grad:.2e}")
    assert fwd <= TOL and grad <= TOL
