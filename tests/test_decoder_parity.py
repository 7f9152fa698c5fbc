"""Decoder parity with HF transformers (Phi-3, Llama, Qwen2) built from tiny random configs,
with the layers unrolled and scanned (``scan``: HF weights loaded into the stacked layout)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from d2vlm_jax import sharding
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models import lora as lora_lib
from d2vlm_jax.models.decoder import Decoder, KVCache, init_decoder
from d2vlm_jax.weights.common import SafetensorsReader
from d2vlm_jax.weights.hf_decoder import config_from_hf, export_decoder, load_decoder, resize_vocab
from tests.torch_utils import additive_mask, max_rel_err, save_state_dict

TOL = 1e-4

HF = {
    "phi3": lambda: transformers.Phi3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, pad_token_id=0,
        bos_token_id=1, eos_token_id=2),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-6),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0, rms_norm_eps=1e-6),
}
MODEL_CLS = {"phi3": transformers.Phi3ForCausalLM, "llama": transformers.LlamaForCausalLM,
             "qwen2": transformers.Qwen2ForCausalLM}


SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


def build_pair(family, tmp_path, scan=False, **overrides):
    """A random torch model and the same weights loaded into the Flax decoder."""
    torch.manual_seed(0)
    hf_config = HF[family]()
    hf_config._attn_implementation = "eager"
    model = MODEL_CLS[family](hf_config).eval()
    with torch.no_grad():  # qwen2 biases and norms start at 0/1: make them random too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    config = config_from_hf(hf_config.to_dict(), scan_layers=scan, **overrides)
    reader = SafetensorsReader(save_state_dict(model, str(tmp_path / family)))
    target = lora_lib.strip_lora(sharding.unbox(jax.eval_shape(lambda: init_decoder(config, jax.random.key(0))))["params"])
    params = load_decoder(reader, config, target)
    return model, config, params


def run_jax(config, params, ids, positions, layout, **kw):
    return Decoder(config).apply({"params": params}, input_ids=jnp.asarray(ids), positions=jnp.asarray(positions),
                                 layout=layout, **kw)


def run_torch(model, ids, positions=None, mask4d=None):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(ids)).long(),
                    position_ids=None if positions is None else torch.from_numpy(np.asarray(positions)).long(),
                    attention_mask=mask4d, output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("family", ["phi3", "llama", "qwen2"])
@SCAN
def test_causal_logits_and_hidden_states_match_transformers(family, tmp_path, scan):
    model, config, params = build_pair(family, tmp_path, scan)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (2, 11))
    positions = np.broadcast_to(np.arange(11), (2, 11))
    layout = attn_lib.SequenceLayout.causal(jnp.ones((2, 11), bool))
    out = run_jax(config, params, ids, positions, layout, output_hidden_layers=(1, 2))
    ref_logits, ref_hidden = run_torch(model, ids)
    err = max_rel_err(out.logits, ref_logits)
    print(f"{family} causal logits max rel err {err:.2e}")
    assert err <= TOL
    assert max_rel_err(out.hidden_states[1], ref_hidden[1]) <= TOL  # output of layer 1


def packed_layout():
    """Two rows: [prefix 3 | frames 4 (bidirectional) | text 2 | branch1 3 | branch2 3 (restart)]."""
    t = 15
    block = np.zeros((2, t), np.int32)
    block[:, 3:7] = 1
    branch = np.zeros((2, t), np.int32)
    branch[:, 9:12] = 1
    branch[:, 12:15] = 2
    valid = np.ones((2, t), bool)
    valid[1, 14] = False  # padding at the end of row 1
    valid[1, 8] = False   # and a padding slot inside the prefix of row 1
    positions = np.zeros((2, t), np.int32)
    for b in range(2):
        prefix_valid = valid[b, :9]
        positions[b, :9] = np.cumsum(prefix_valid) - prefix_valid
        n_prefix = prefix_valid.sum()
        for lo, hi in ((9, 12), (12, 15)):
            positions[b, lo:hi] = n_prefix + np.arange(hi - lo)
    return attn_lib.SequenceLayout(jnp.asarray(valid), jnp.asarray(branch), jnp.asarray(block)), positions


@pytest.mark.parametrize("family", ["phi3", "llama", "qwen2"])
@SCAN
def test_frame_block_and_branches_match_transformers_4d_mask(family, tmp_path, scan):
    model, config, params = build_pair(family, tmp_path, scan)
    layout, positions = packed_layout()
    ids = np.random.default_rng(1).integers(0, config.vocab_size, positions.shape)
    out = run_jax(config, params, ids, positions, layout)
    mask = np.asarray(attn_lib.build_mask(layout, 0, positions.shape[1]))
    # sanity of the mask description itself
    assert mask[0, 3, 6] and not mask[0, 7, 8]          # frame sees later frame; text does not see later
    assert not mask[0, 12, 10] and mask[0, 12, 5]        # branch 2 never sees branch 1, sees prefix
    ref_logits, _ = run_torch(model, ids, positions, additive_mask(mask))
    valid = np.asarray(layout.valid)
    err = max_rel_err(np.asarray(out.logits)[valid], ref_logits[valid])
    print(f"{family} packed/bidirectional logits max rel err {err:.2e}")
    assert err <= TOL
    # a rejected branch alone (prefix + branch 2 only) gives the same logits as packed
    keep = np.r_[0:9, 12:15]
    alone = attn_lib.SequenceLayout(layout.valid[:, keep], jnp.zeros_like(layout.branch[:, keep]), layout.block[:, keep])
    out_alone = run_jax(config, params, ids[:, keep], positions[:, keep], alone)
    np.testing.assert_allclose(np.asarray(out_alone.logits)[:, 9:][valid[:, 12:]],
                               np.asarray(out.logits)[:, 12:][valid[:, 12:]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["phi3", "qwen2"])
@SCAN
def test_prefill_then_incremental_decoding_equals_full_pass(family, tmp_path, scan):
    _, config, params = build_pair(family, tmp_path, scan)
    t, prefill = 12, 7
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, t))
    positions = np.broadcast_to(np.arange(t), (2, t))
    valid = np.ones((2, t), bool)
    full = run_jax(config, params, ids, positions, attn_lib.SequenceLayout.causal(jnp.asarray(valid)))
    # the cache layout covers all slots; the not-yet-written slots are invalid while decoding
    cache = KVCache.zeros(config, 2, t)
    step_logits = []
    written = np.zeros((2, t), bool)
    written[:, :prefill] = True
    out = run_jax(config, params, ids[:, :prefill], positions[:, :prefill],
                  attn_lib.SequenceLayout.causal(jnp.asarray(written)), cache=cache, query_start=0)
    cache = out.cache
    step_logits.append(np.asarray(out.logits))
    for s in range(prefill, t):
        written[:, s] = True
        out = run_jax(config, params, ids[:, s:s + 1], positions[:, s:s + 1],
                      attn_lib.SequenceLayout.causal(jnp.asarray(written)), cache=cache, query_start=s)
        cache = out.cache
        step_logits.append(np.asarray(out.logits))
    err = max_rel_err(np.concatenate(step_logits, 1), full.logits)
    print(f"{family} prefill+decode vs full pass max rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("family", ["phi3", "llama", "qwen2"])
@SCAN
def test_lora_forward_matches_transformers_with_merged_weights(family, tmp_path, scan):
    model, base_config, base_params = build_pair(family, tmp_path, scan)
    config = base_config.__class__(**{**base_config.__dict__, "lora_rank": 4, "lora_alpha": 8.0})
    full = sharding.unbox(init_decoder(config, jax.random.key(3)))["params"]
    params = lora_lib.graft(base_params, full)
    # random (nonzero) adapters
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = iter(jax.random.split(jax.random.key(4), len(leaves)))
    params = jax.tree_util.tree_unflatten(treedef, [
        jax.random.normal(next(keys), x.shape) * 0.1 if "lora_b" in jax.tree_util.keystr(p) else x
        for p, x in leaves])
    assert lora_lib.count_lora_params(params) > 0
    ids = np.random.default_rng(5).integers(0, config.vocab_size, (2, 9))
    positions = np.broadcast_to(np.arange(9), (2, 9))
    layout = attn_lib.SequenceLayout.causal(jnp.ones((2, 9), bool))
    out = run_jax(config, params, ids, positions, layout)
    merged = lora_lib.merge_lora(params, config.lora_alpha, config.lora_rank)
    merged_out = run_jax(config, merged, ids, positions, layout)
    np.testing.assert_allclose(merged_out.logits, out.logits, rtol=1e-5, atol=1e-5)
    state = export_decoder(lora_lib.strip_lora(merged), base_config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    ref_logits, _ = run_torch(model, ids)
    err = max_rel_err(out.logits, ref_logits)
    print(f"{family} LoRA vs merged torch max rel err {err:.2e}")
    assert err <= TOL
    # LoRA changes the output (the test would be vacuous otherwise)
    assert max_rel_err(run_jax(base_config, base_params, ids, positions, layout).logits, ref_logits) > 1e-3


def test_lora_dropout_is_active_only_when_not_deterministic():
    from d2vlm_jax.models.decoder import DecoderConfig
    config = DecoderConfig(family="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1,
                           num_heads=4, num_kv_heads=4, lora_rank=4, lora_alpha=8.0, lora_dropout=0.5)
    params = sharding.unbox(init_decoder(config, jax.random.key(0)))["params"]
    params = jax.tree.map(lambda x: x + 0.1, params)  # lora_b nonzero
    ids = jnp.arange(6)[None]
    layout = attn_lib.SequenceLayout.causal(jnp.ones((1, 6), bool))
    pos = jnp.arange(6)[None]
    det = [run_jax(config, params, ids, pos, layout).logits for _ in range(2)]
    np.testing.assert_array_equal(det[0], det[1])
    drop = Decoder(config).apply({"params": params}, input_ids=ids, positions=pos, layout=layout,
                                 deterministic=False, rngs={"dropout": jax.random.key(1)}).logits
    assert np.max(np.abs(np.asarray(drop) - np.asarray(det[0]))) > 1e-4


def test_resize_vocab_adds_mean_rows(tmp_path):
    _, config, params = build_pair("phi3", tmp_path)
    grown = resize_vocab(params, config.vocab_size + 2)
    emb = grown["embed_tokens"]["embedding"]
    assert emb.shape == (config.vocab_size + 2, config.hidden_size)
    np.testing.assert_allclose(emb[-1], np.asarray(params["embed_tokens"]["embedding"]).mean(0), rtol=1e-6)
    np.testing.assert_allclose(grown["lm_head"]["kernel"][:, -2], np.asarray(params["lm_head"]["kernel"]).mean(1),
                               rtol=1e-6)
    np.testing.assert_array_equal(emb[:-2], params["embed_tokens"]["embedding"])
