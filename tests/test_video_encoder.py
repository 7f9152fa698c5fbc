"""VideoEncoder: compressor vs numpy, per-frame independence, sharding, loading, trainable table."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from d2vlm_jax import sharding
from d2vlm_jax.models import stacking
from d2vlm_jax.models.compressor import CompressorConfig, FrameCompressor
from d2vlm_jax.models.layers import path_str
from d2vlm_jax.models.qformer import QFormerConfig
from d2vlm_jax.models.video_encoder import (VIDEO_ENCODER_TRAINABLE_PATTERNS, VideoEncoder, VideoEncoderConfig,
                                            is_trainable, trainable_mask)
from d2vlm_jax.models.vision import VisionConfig, VisionTower
from d2vlm_jax.weights.common import CheckpointError
from d2vlm_jax.weights.instructblip import export_params, load_video_encoder, video_encoder_rules
from tests.torch_utils import max_rel_err

IMAGE, D_LLM, L = 28, 40, 6

CONFIG = VideoEncoderConfig(
    vision=VisionConfig(image_size=IMAGE, patch_size=14, width=48, depth=3, num_heads=4, mlp_dim=64,
                        output_layer=-2),
    qformer=QFormerConfig(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, vocab_size=50,
                          max_position_embeddings=16, num_queries=4, encoder_width=48),
    compressor=CompressorConfig(query_dim=32, vision_dim=48, out_dim=D_LLM))
SCANNED = dataclasses.replace(CONFIG, vision=dataclasses.replace(CONFIG.vision, scan_layers=True),
                              qformer=dataclasses.replace(CONFIG.qformer, scan_layers=True))
SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


def as_config(config, params):
    """The encoder of ``config`` (layers unrolled or scanned) and ``params`` in its layout."""
    return VideoEncoder(config), stacking.to_layout(params, config.layer_stacks)


def _random_params(abstract, seed: int, scale: float = 0.1):
    """Random values for an (abstract) param tree: ~N(0, scale); LayerNorm scales ~1 + N(0, scale)."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        value = scale * rng.normal(size=x.shape)
        if path_str(path).endswith("scale"):
            value += 1.0
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(one, sharding.unbox(abstract))


def _inputs(b: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (b, n, IMAGE, IMAGE, 3), dtype=np.uint8)
    ids = rng.integers(1, 50, (b, L)).astype(np.int32)
    text_len = rng.integers(1, L + 1, (b,))
    valid = np.arange(L)[None, :] < text_len[:, None]
    return frames, np.where(valid, ids, 0).astype(np.int32), valid


@pytest.fixture(scope="module")
def encoder():
    model = VideoEncoder(CONFIG)
    frames, ids, valid = _inputs(1, 2)
    abstract = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a)["params"],
                              frames, np.ones((1, 2), bool), ids, valid)
    params = _random_params(abstract, 1)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return model, abstract, params, apply


# ----------------------------------------------------------------------------- compressor


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_compressor_matches_numpy_spec():
    cfg = CompressorConfig(query_dim=32, vision_dim=48, out_dim=D_LLM)
    rng = np.random.default_rng(0)
    q_states = rng.normal(size=(3, 4, 32)).astype(np.float32)
    patches = (3.0 * rng.normal(size=(3, 9, 48))).astype(np.float32)
    model = FrameCompressor(cfg)
    params = _random_params(jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a)["params"],
                                           q_states, patches), 2, 0.3)
    out = np.asarray(model.apply({"params": params}, q_states, patches))

    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    lin = lambda x, m: x @ m["kernel"] + m["bias"]
    norm_lin = lambda x, m: lin(_layer_norm(x, m["norm"]["scale"], m["norm"]["bias"], 1e-5), m["linear"])
    ref = []
    for f in range(3):                                   # SPEC §1.3, one frame at a time
        x = patches[f].astype(np.float64)                # [256, 1408] -> here [9, 48]
        qo = lin(q_states[f].astype(np.float64), p["proj"])
        q, k = norm_lin(qo, p["q_proj"]), norm_lin(x, p["k_proj"])
        s = q @ k.T / np.sqrt(48)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        z = (a @ x + qo).mean(0)
        ref.append(norm_lin(z, p["v_proj"]))
    ref = np.stack(ref)
    assert out.shape == (3, D_LLM)
    err = max_rel_err(out, ref)
    print(f"compressor vs numpy max rel err {err:.3e}")
    assert err <= 1e-5


# ----------------------------------------------------------------------------- per-frame independence


def test_padded_frames_never_change_real_tokens(encoder):
    _, _, params, apply = encoder
    frames, ids, valid = _inputs(2, 3, seed=3)
    frame_valid = np.array([[True, True, False], [True, False, False]])
    out = np.asarray(apply(params, frames, frame_valid, ids, valid))
    assert out.shape == (2, 3, D_LLM)
    assert np.all(out[~frame_valid] == 0)
    assert np.all(np.abs(out[frame_valid]).max(-1) > 0)

    other = frames.copy()
    other[~frame_valid] = 255 - other[~frame_valid]        # change only padded pixels
    out2 = np.asarray(apply(params, other, frame_valid, ids, valid))
    np.testing.assert_array_equal(out2[frame_valid], out[frame_valid])

    # Splitting the batch differently: each sample alone, padded frames dropped.
    alone0 = np.asarray(apply(params, frames[:1, :2], frame_valid[:1, :2], ids[:1], valid[:1]))
    alone1 = np.asarray(apply(params, frames[1:, :1], frame_valid[1:, :1], ids[1:], valid[1:]))
    assert max_rel_err(alone0[0], out[0, :2]) <= 1e-5
    assert max_rel_err(alone1[0], out[1, :1]) <= 1e-5
    # Frames of a sample are independent of each other too (one frame at a time).
    single = np.asarray(apply(params, frames[:1, 1:2], frame_valid[:1, 1:2], ids[:1], valid[:1]))
    assert max_rel_err(single[0, 0], out[0, 1]) <= 1e-5


def test_question_conditions_every_frame(encoder):
    _, _, params, apply = encoder
    frames, ids, valid = _inputs(1, 2, seed=4)
    fv = np.ones((1, 2), bool)
    out = np.asarray(apply(params, frames, fv, ids, valid))
    other_ids = np.where(valid, (ids + 7) % 50, 0).astype(np.int32)
    out2 = np.asarray(apply(params, frames, fv, other_ids, valid))
    for n in range(2):
        assert max_rel_err(out2[0, n], out[0, n]) > 1e-4


def test_vision_tower_is_not_differentiated(encoder):
    model, _, params, _ = encoder
    frames, ids, valid = _inputs(1, 2, seed=5)
    fv = np.ones((1, 2), bool)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, frames, fv, ids, valid) ** 2)))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["vision"]))
    assert float(jnp.abs(grads["qformer"]["layers_0"]["cross_attn"]["key"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["compressor"]["k_proj"]["linear"]["kernel"]).max()) > 0


# ----------------------------------------------------------------------------- sharding


@SCAN
def test_sharded_equals_unsharded(encoder, scan):
    """The unrolled encoder on one device against the encoder (unrolled or scanned, the same
    parameters stacked) on a 2x2x2 mesh."""
    _, _, params, apply = encoder
    b, n = 4, 2                                              # 8 frames
    frames, ids, valid = _inputs(b, n, seed=6)
    frame_valid = np.array([[True, True], [True, False], [True, True], [False, False]])
    expected = np.asarray(apply(params, frames, frame_valid, ids, valid))
    model, params = as_config(SCANNED if scan else CONFIG, params)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    abstract = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), frames, frame_valid, ids, valid)
    param_shardings = sharding.shardings_for(abstract, mesh, rules)["params"]
    placed = jax.device_put(params, param_shardings)
    batch = sharding.host_batch_to_global(
        {"frames": frames, "frame_valid": frame_valid, "qformer_ids": ids, "qformer_valid": valid}, mesh, rules)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, bt: model.apply({"params": p}, bt["frames"], bt["frame_valid"],
                                                bt["qformer_ids"], bt["qformer_valid"]))(placed, batch)
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"))
    err = float(np.max(np.abs(np.asarray(out) - expected)))
    print(f"sharded vs unsharded max abs err {err:.3e}")
    assert err <= 1e-5
    # Some parameter really is split (tensor axis over heads / mlp).
    assert any(s.spec != PartitionSpec() for s in jax.tree.leaves(param_shardings))


def test_frames_constraint_shards_vision_output():
    """Replicated input, replicated params: the tower's output is still split over frames."""
    cfg = CONFIG.vision
    tower = VisionTower(cfg)
    frames = np.random.default_rng(7).integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8)
    params = _random_params(jax.eval_shape(lambda x: tower.init(jax.random.key(0), x)["params"], frames[:1]), 8)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, x: tower.apply({"params": p}, x))(
            jax.device_put(params, replicated), jax.device_put(frames, replicated))
    assert out.sharding.spec == PartitionSpec(("data", "fsdp")), out.sharding.spec


@pytest.mark.parametrize("chunks,scan", [(2, False), (3, False), (2, True)])
def test_frame_chunks_equal_all_frames_at_once(encoder, chunks, scan):
    """The tower run over frame chunks (a scan) has the same parameter tree and gives the same
    tokens as all frames at once, unsharded and on a 2x2x2 mesh; 3 chunks of 8 frames pads.
    ``scan``: the blocks scanned inside the chunk scan (the unrolled encoder as reference)."""
    _, abstract, params, apply = encoder
    base = SCANNED if scan else CONFIG
    abstract = stacking.to_layout(abstract, base.layer_stacks)
    frames, ids, valid = _inputs(4, 2, seed=9)
    frame_valid = np.ones((4, 2), bool)
    expected = np.asarray(apply(params, frames, frame_valid, ids, valid))
    _, params = as_config(base, params)
    chunked = VideoEncoder(dataclasses.replace(base, vision=dataclasses.replace(base.vision, frame_chunks=chunks)))
    chunked_abstract = jax.eval_shape(lambda *a: chunked.init(jax.random.key(0), *a)["params"],
                                      frames, frame_valid, ids, valid)
    assert jax.tree.map(lambda a: a.shape, sharding.unbox(chunked_abstract)) == \
        jax.tree.map(lambda a: a.shape, sharding.unbox(abstract))
    out = np.asarray(jax.jit(lambda p, *a: chunked.apply({"params": p}, *a))(params, frames, frame_valid, ids, valid))
    assert max_rel_err(out, expected) <= 1e-5

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = sharding.host_batch_to_global(
        {"frames": frames, "frame_valid": frame_valid, "qformer_ids": ids, "qformer_valid": valid}, mesh,
        sharding.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, bt: chunked.apply({"params": p}, bt["frames"], bt["frame_valid"], bt["qformer_ids"],
                                                 bt["qformer_valid"]))
        sharded = np.asarray(fn(params, batch))
        hlo = fn.lower(params, batch).as_text()
    assert max_rel_err(sharded, expected) <= 1e-5
    assert "while" in hlo  # really a loop over chunks, not unrolled

    grads = jax.jit(jax.grad(lambda p: jnp.sum(chunked.apply({"params": p}, frames, frame_valid, ids, valid) ** 2)))(
        params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["vision"]))


def test_frame_chunks_must_be_positive():
    with pytest.raises(ValueError, match="frame_chunks"):
        dataclasses.replace(CONFIG.vision, frame_chunks=0)


# ----------------------------------------------------------------------------- loading / trainable table


@SCAN
def test_authors_checkpoint_roundtrip_and_hf_keeps_compressor(encoder, tmp_path, scan):
    from safetensors.numpy import save_file

    from d2vlm_jax.weights.common import SafetensorsReader
    _, abstract, params, _ = encoder
    config = SCANNED if scan else CONFIG
    abstract = stacking.to_layout(sharding.unbox(abstract), config.layer_stacks)
    np_params = stacking.to_layout(jax.tree.map(np.asarray, params), config.layer_stacks)
    authors = export_params(np_params, video_encoder_rules(CONFIG, "authors"), config.layer_stacks)
    assert "model.qformer_q_proj.0.weight" in authors and "model.qformer_v_proj.1.bias" in authors
    assert "model.vision_tower.vision_tower.blocks.1.attn.q_bias" in authors
    assert "model.vision_tower.vision_tower.blocks.2.attn.q_bias" not in authors  # output_layer=-2
    authors["model.layers.0.self_attn.qkv_proj.weight"] = np.zeros((3, 3), np.float32)  # an LLM key
    save_file(authors, str(tmp_path / "authors.safetensors"))
    loaded, ignored = load_video_encoder(SafetensorsReader(str(tmp_path / "authors.safetensors")), config,
                                         "authors", abstract)
    assert ignored == ["model.layers.0.self_attn.qkv_proj.weight"]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(np_params)):
        np.testing.assert_array_equal(a, b)

    hf = export_params(np_params, video_encoder_rules(CONFIG, "hf"), config.layer_stacks)
    save_file(hf, str(tmp_path / "hf.safetensors"))
    with pytest.raises(CheckpointError, match="compressor"):
        load_video_encoder(SafetensorsReader(str(tmp_path / "hf.safetensors")), config, "hf", abstract)
    fresh = _random_params(abstract, 9)
    loaded, _ = load_video_encoder(SafetensorsReader(str(tmp_path / "hf.safetensors")), config, "hf", fresh)
    for a, b in zip(jax.tree.leaves(loaded["compressor"]), jax.tree.leaves(fresh["compressor"])):
        np.testing.assert_array_equal(a, b)
    for part in ("vision", "qformer"):
        for a, b in zip(jax.tree.leaves(loaded[part]), jax.tree.leaves(np_params[part])):
            np.testing.assert_array_equal(a, b)


def test_trainable_partition_follows_spec(encoder):
    _, _, params, _ = encoder
    mask = trainable_mask(params)
    paths = {path_str(p): t for p, t in jax.tree_util.tree_leaves_with_path(mask)}
    trainable = {p for p, t in paths.items() if t}
    assert not any(p.startswith("vision/") for p in trainable)
    assert {"qformer/query_tokens", "qformer/ln_vision/scale", "qformer/layers_0/self_attn/query/kernel",
            "qformer/layers_0/self_attn/norm/scale", "qformer/layers_2/cross_attn/value/bias",
            "compressor/proj/kernel", "compressor/q_proj/norm/scale", "compressor/k_proj/linear/kernel",
            "compressor/v_proj/linear/bias"} <= trainable
    frozen = set(paths) - trainable
    assert {"qformer/embeddings/word_embeddings", "qformer/embeddings/layernorm/scale",
            "qformer/layers_1/ffn_query/intermediate/kernel", "qformer/layers_0/ffn_text/norm/bias",
            "vision/blocks_0/attn/q_bias", "vision/patch_embed/kernel"} <= frozen
    # Every parameter is decided by an explicit pattern (no silent fall-through).
    import re
    for p in paths:
        assert any(re.fullmatch(pat, p) for pat, _ in VIDEO_ENCODER_TRAINABLE_PATTERNS), p
    assert is_trainable("video/qformer/query_tokens") is False  # paths are relative to the encoder
    assert trainable_mask({"video": params}, prefix="video/")["video"]["qformer"]["query_tokens"]
