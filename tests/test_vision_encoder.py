"""Vision tower and Q-Former parity with HF transformers' InstructBLIP; checkpoint loading."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from d2vlm_jax import sharding
from d2vlm_jax.models.qformer import QFormer, QFormerConfig
from d2vlm_jax.models.vision import CLIP_MEAN, CLIP_STD, VisionConfig, VisionTower
from d2vlm_jax.weights.common import CheckpointError, SafetensorsReader, load_with_rules
from d2vlm_jax.weights.instructblip import export_params, qformer_rules, vision_rules
from tests.torch_utils import max_rel_err

TOL = 1e-4
WIDTH, HEADS, MLP, IMAGE, PATCH, DEPTH = 32, 4, 64, 28, 14, 3
QH, QHEADS, QFFN, QLAYERS, NQ, VOCAB, MAXPOS, ENC = 32, 4, 64, 4, 4, 50, 16, 48  # 4 layers: 2 scanned blocks


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial biases and norms (HF initializes them at 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if name.endswith("bias") or "norm" in name.lower() or p.ndim == 1:
                p.add_(noise)
            else:
                p.add_(noise * 0.5)


def _save(tensors: dict[str, torch.Tensor], path: str) -> str:
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path)
    return path


# ----------------------------------------------------------------------------- vision tower


@pytest.fixture(scope="module")
def hf_vision():
    torch.manual_seed(0)
    cfg = transformers.InstructBlipVisionConfig(
        hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
    cfg._attn_implementation = "eager"
    model = transformers.InstructBlipVisionModel(cfg).eval()
    _randomize(model, 1)
    return model


def _vision_state(model) -> dict[str, torch.Tensor]:
    return {f"vision_model.{k}": v for k, v in model.state_dict().items()}


def _authors_vision_state(model) -> dict[str, torch.Tensor]:
    """The same tensors under the authors' (LAVIS EVA-ViT) names, renamed by hand."""
    sd, out, p = model.state_dict(), {}, "model.vision_tower.vision_tower"
    out[f"{p}.patch_embed.proj.weight"] = sd["embeddings.patch_embedding.weight"]
    out[f"{p}.patch_embed.proj.bias"] = sd["embeddings.patch_embedding.bias"]
    out[f"{p}.cls_token"] = sd["embeddings.class_embedding"]
    out[f"{p}.pos_embed"] = sd["embeddings.position_embedding"]
    for i in range(DEPTH):
        s, d = f"encoder.layers.{i}", f"{p}.blocks.{i}"
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[f"{d}.{b}.weight"] = sd[f"{s}.{a}.weight"]
            out[f"{d}.{b}.bias"] = sd[f"{s}.{a}.bias"]
        out[f"{d}.attn.qkv.weight"] = sd[f"{s}.self_attn.qkv.weight"]
        bias = sd[f"{s}.self_attn.qkv.bias"]
        out[f"{d}.attn.q_bias"] = bias[:WIDTH]
        out[f"{d}.attn.v_bias"] = bias[2 * WIDTH:]
    out[f"{p}.norm.weight"] = torch.ones(WIDTH)  # an unused extra key
    return out


SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


def _vision_config(output_layer: int, scan: bool = False) -> VisionConfig:
    return VisionConfig(image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                        mlp_dim=MLP, output_layer=output_layer, scan_layers=scan)


def _vision_target(cfg: VisionConfig):
    frames = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.uint8)
    abstract = jax.eval_shape(lambda x: VisionTower(cfg).init(jax.random.key(0), x), frames)
    return sharding.unbox(abstract["params"])


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)


def _hf_pixels(frames: np.ndarray) -> torch.Tensor:
    x = (frames.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@SCAN
@pytest.mark.parametrize("output_layer,hf_index", [(2, 2), (-2, 2), (-1, 3)])
def test_vision_parity_with_hf(hf_vision, tmp_path, output_layer, hf_index, scan):
    cfg = _vision_config(output_layer, scan)
    assert cfg.num_blocks_run == hf_index
    path = _save(_vision_state(hf_vision), str(tmp_path / "vision.safetensors"))
    params, ignored = load_with_rules(SafetensorsReader(path), vision_rules(cfg, "hf", flax_prefix=()),
                                      _vision_target(cfg), ignore_unused=lambda k: True, stacks=(cfg.layer_stack,))
    # Blocks past output_layer are neither created nor loaded.
    if scan:
        assert not any(k.startswith("blocks_") for k in params)
        assert all(x.shape[0] == hf_index for x in jax.tree.leaves(params["blocks"]))
    else:
        assert set(k for k in params if k.startswith("blocks_")) == {f"blocks_{i}" for i in range(hf_index)}
    assert "vision_model.post_layernorm.weight" in ignored
    frames = _frames(3, 0)
    out = np.asarray(VisionTower(cfg).apply({"params": params}, jnp.asarray(frames)))
    with torch.no_grad():
        ref = hf_vision(_hf_pixels(frames), output_hidden_states=True).hidden_states[hf_index][:, 1:].numpy()
    assert out.shape == ref.shape == (3, (IMAGE // PATCH) ** 2, WIDTH)
    err = max_rel_err(out, ref)
    print(f"vision output_layer={output_layer} (HF hidden_states[{hf_index}]) max rel err {err:.3e}")
    assert err <= TOL


def test_vision_float_input_matches_uint8(hf_vision, tmp_path):
    cfg = _vision_config(2)
    path = _save(_vision_state(hf_vision), str(tmp_path / "vision.safetensors"))
    params, _ = load_with_rules(SafetensorsReader(path), vision_rules(cfg, "hf", flax_prefix=()),
                                _vision_target(cfg), ignore_unused=lambda k: True)
    frames = _frames(2, 1)
    model = VisionTower(cfg)
    a = model.apply({"params": params}, jnp.asarray(frames))
    b = model.apply({"params": params}, jnp.asarray(frames, jnp.float32) / 255.0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_vision_authors_layout_loads_identical_params(hf_vision, tmp_path):
    cfg = _vision_config(-2)
    hf_path = _save(_vision_state(hf_vision), str(tmp_path / "hf.safetensors"))
    au_path = _save(_authors_vision_state(hf_vision), str(tmp_path / "authors.safetensors"))
    target = _vision_target(cfg)
    hf_params, _ = load_with_rules(SafetensorsReader(hf_path), vision_rules(cfg, "hf", flax_prefix=()), target,
                                   ignore_unused=lambda k: True)
    au_params, ignored = load_with_rules(SafetensorsReader(au_path), vision_rules(cfg, "authors", flax_prefix=()),
                                         target, ignore_unused=lambda k: True)
    assert jax.tree.structure(hf_params) == jax.tree.structure(au_params)
    for a, b in zip(jax.tree.leaves(hf_params), jax.tree.leaves(au_params)):
        np.testing.assert_array_equal(a, b)
    # Block 2 (past output_layer) and the extra norm are reported, not loaded.
    assert "model.vision_tower.vision_tower.blocks.2.attn.qkv.weight" in ignored
    assert "model.vision_tower.vision_tower.norm.weight" in ignored


@SCAN
def test_vision_export_roundtrip(hf_vision, tmp_path, scan):
    """Exporting the loaded params reproduces the checkpoint tensors (key bias -> zeros)."""
    cfg = _vision_config(-1, scan)
    state = _vision_state(hf_vision)
    with torch.no_grad():  # a zero key bias makes HF's fused bias exactly representable
        for i in range(DEPTH):
            state[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"][WIDTH:2 * WIDTH] = 0
    path = _save(state, str(tmp_path / "hf.safetensors"))
    rules = vision_rules(cfg, "hf", flax_prefix=())
    stacks = (cfg.layer_stack,)
    params, _ = load_with_rules(SafetensorsReader(path), rules, _vision_target(cfg), ignore_unused=lambda k: True,
                                stacks=stacks)
    exported = export_params(params, rules, stacks)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    assert set(state) - set(exported) == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}


def test_load_errors_name_key_and_shapes(hf_vision, tmp_path):
    cfg = _vision_config(-1)
    rules = vision_rules(cfg, "hf", flax_prefix=())
    state = _vision_state(hf_vision)
    missing = dict(state)
    del missing["vision_model.encoder.layers.1.mlp.fc2.bias"]
    path = _save(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_with_rules(SafetensorsReader(path), rules, _vision_target(cfg), ignore_unused=lambda k: True)
    msg = str(e.value)
    print(msg)
    assert "vision_model.encoder.layers.1.mlp.fc2.bias" in msg and f"({WIDTH},)" in msg

    wrong = dict(state)
    wrong["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(MLP + 6, WIDTH)
    path = _save(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_with_rules(SafetensorsReader(path), rules, _vision_target(cfg), ignore_unused=lambda k: True)
    msg = str(e.value)
    print(msg)
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in msg
    assert f"({WIDTH}, {MLP + 6})" in msg and f"({WIDTH}, {MLP})" in msg  # checkpoint and model shapes


# ----------------------------------------------------------------------------- Q-Former


@pytest.fixture(scope="module")
def hf_qformer():
    torch.manual_seed(0)
    cfg = transformers.InstructBlipQFormerConfig(
        vocab_size=VOCAB, hidden_size=QH, num_hidden_layers=QLAYERS, num_attention_heads=QHEADS,
        intermediate_size=QFFN, max_position_embeddings=MAXPOS, cross_attention_frequency=2,
        encoder_hidden_size=ENC, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.InstructBlipQFormerModel(cfg).eval()
    _randomize(model, 2)
    g = torch.Generator().manual_seed(3)
    query_tokens = torch.randn(1, NQ, QH, generator=g)
    ln_vision = torch.nn.LayerNorm(ENC, eps=1e-5)
    _randomize(ln_vision, 4)
    return model, query_tokens, ln_vision


def _qformer_config(scan: bool = False) -> QFormerConfig:
    return QFormerConfig(hidden_size=QH, num_layers=QLAYERS, num_heads=QHEADS, intermediate_size=QFFN,
                         vocab_size=VOCAB, max_position_embeddings=MAXPOS, num_queries=NQ,
                         cross_attention_frequency=2, encoder_width=ENC, ln_vision_eps=1e-5, scan_layers=scan)


def _qformer_target(cfg: QFormerConfig):
    feats = jax.ShapeDtypeStruct((1, 9, ENC), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 5), jnp.int32)
    valid = jax.ShapeDtypeStruct((1, 5), jnp.bool_)
    abstract = jax.eval_shape(lambda *a: QFormer(cfg).init(jax.random.key(0), *a), feats, ids, valid)
    return sharding.unbox(abstract["params"])


def _hf_qformer_state(model, query_tokens, ln_vision) -> dict[str, torch.Tensor]:
    state = {f"qformer.{k}": v for k, v in model.state_dict().items()}
    state["query_tokens"] = query_tokens
    state["vision_model.post_layernorm.weight"] = ln_vision.weight
    state["vision_model.post_layernorm.bias"] = ln_vision.bias
    return state


def _authors_qformer_state(model, query_tokens, ln_vision) -> dict[str, torch.Tensor]:
    """HF Q-Former tensors under the authors' (LAVIS BERT) names, renamed by hand."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace(".attention.attention.", ".attention.self.")
        k = k.replace(".crossattention.attention.", ".crossattention.self.")
        k = k.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        out[f"model.qformer_bert.bert.{k}"] = v
    out["model.qformer_bert.bert.embeddings.position_ids"] = torch.arange(MAXPOS)[None]
    out["model.qformer_bert.cls.predictions.bias"] = torch.zeros(VOCAB)
    out["model.qformer_query"] = query_tokens
    out["model.qformer_ln.weight"] = ln_vision.weight
    out["model.qformer_ln.bias"] = ln_vision.bias
    return out


def _qformer_inputs(seed: int):
    rng = np.random.default_rng(seed)
    f, length, patches = 3, 5, 9
    feats = rng.normal(size=(f, patches, ENC)).astype(np.float32)
    ids = rng.integers(1, VOCAB, (f, length)).astype(np.int32)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)  # right padding
    ids = np.where(valid, ids, 0).astype(np.int32)
    return feats, ids, valid


def _load_qformer(state, layout, tmp_path, name, scan=False):
    cfg = _qformer_config(scan)
    path = _save(state, str(tmp_path / f"{name}.safetensors"))
    return load_with_rules(SafetensorsReader(path), qformer_rules(cfg, layout, flax_prefix=()),
                           _qformer_target(cfg), ignore_unused=lambda k: True, stacks=(cfg.layer_stack,))


@SCAN
def test_qformer_parity_with_hf(hf_qformer, tmp_path, scan):
    model, query_tokens, ln_vision = hf_qformer
    params, _ = _load_qformer(_hf_qformer_state(*hf_qformer), "hf", tmp_path, "hf", scan)
    if scan:  # QLAYERS layers as QLAYERS / 2 blocks (cross-attention layer, plain layer)
        assert params["layers"]["sub_0"]["cross_attn"]["key"]["kernel"].shape[0] == QLAYERS // 2
        assert "cross_attn" not in params["layers"]["sub_1"]
    feats, ids, valid = _qformer_inputs(0)
    out = np.asarray(QFormer(_qformer_config(scan)).apply({"params": params}, jnp.asarray(feats), jnp.asarray(ids),
                                                           jnp.asarray(valid)))
    with torch.no_grad():
        f = feats.shape[0]
        ref = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.cat([torch.ones(f, NQ, dtype=torch.long),
                                              torch.from_numpy(valid).long()], dim=1),
                    query_embeds=query_tokens.expand(f, -1, -1),
                    encoder_hidden_states=ln_vision(torch.from_numpy(feats))).last_hidden_state[:, :NQ].numpy()
    assert out.shape == ref.shape == (3, NQ, QH)
    err = max_rel_err(out, ref)
    print(f"qformer max rel err {err:.3e}")
    assert err <= TOL


def test_qformer_authors_layout_loads_identical_params(hf_qformer, tmp_path):
    hf_params, _ = _load_qformer(_hf_qformer_state(*hf_qformer), "hf", tmp_path, "hf")
    au_params, ignored = _load_qformer(_authors_qformer_state(*hf_qformer), "authors", tmp_path, "authors")
    assert jax.tree.structure(hf_params) == jax.tree.structure(au_params)
    for a, b in zip(jax.tree.leaves(hf_params), jax.tree.leaves(au_params)):
        np.testing.assert_array_equal(a, b)
    assert sorted(ignored) == ["model.qformer_bert.bert.embeddings.position_ids",
                               "model.qformer_bert.cls.predictions.bias"]


def test_qformer_text_padding_does_not_matter(hf_qformer, tmp_path):
    """Right padding, left padding and no padding give the same query states."""
    params, _ = _load_qformer(_hf_qformer_state(*hf_qformer), "hf", tmp_path, "hf")
    qf = QFormer(_qformer_config())
    feats, ids, valid = _qformer_inputs(1)
    row = 1  # 3 valid tokens
    short_ids, short_valid = ids[row:row + 1, :3], valid[row:row + 1, :3]
    left_ids = np.concatenate([np.zeros((1, 2), np.int32), short_ids], axis=1)
    left_valid = np.concatenate([np.zeros((1, 2), bool), short_valid], axis=1)
    run = lambda i, v: np.asarray(qf.apply({"params": params}, jnp.asarray(feats[row:row + 1]), jnp.asarray(i),
                                           jnp.asarray(v)))
    ref = run(short_ids, short_valid)
    for i, v in ((ids[row:row + 1], valid[row:row + 1]), (left_ids, left_valid)):
        err = max_rel_err(run(i, v), ref)
        assert err <= 1e-5, err
    # ...and the text does matter (the check above is not vacuous).
    other = run(np.where(short_valid, (short_ids + 1) % VOCAB, 0).astype(np.int32), short_valid)
    assert max_rel_err(other, ref) > 1e-3
