"""Authors' D²VLM checkpoints -> d2vlm-jax and back, against tiny random PyTorch modules.

The fake checkpoint carries the authors' exact key names and config.json fields: transformers'
Phi3ForCausalLM (LLM), InstructBlipVisionModel / InstructBlipQFormerModel renamed to the
authors' EVA-ViT / LAVIS-BERT names, torch Linear/LayerNorm for the compressor and heads.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from safetensors.torch import save_file

from d2vlm_jax import sharding
from d2vlm_jax.data.tokenizer import train_tiny_tokenizers
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models import lora as lora_lib
from d2vlm_jax.models.d2vlm import D2VLM
from d2vlm_jax.models.vision import CLIP_MEAN, CLIP_STD
from d2vlm_jax.weights import d2vlm_checkpoint as ck
from d2vlm_jax.weights.common import CheckpointError, SafetensorsReader, flatten, write_safetensors
from tests.torch_utils import additive_mask, max_rel_err

TOL = 1e-4
IMAGE, PATCH, VW, VHEADS, VMLP, VDEPTH = 28, 14, 176, 2, 64, 3     # EVA head dim 88
VRUN = 2                                                            # vision_output_layer = 1
QH, QHEADS, QFFN, QLAYERS, NQ, QVOCAB, QPOS = 128, 2, 64, 2, 4, 50, 16  # BERT head dim 64
D, LAYERS, HEADS, KV, FFN = 32, 3, 4, 2, 64
RANK, ALPHA = 4, 8.0
N_FRAMES = 3
# imports into the model with every layer stack scanned (stacked [L, ...] parameters)
SCANNED = {"llm.scan_layers": True, "video.vision.scan_layers": True, "video.qformer.scan_layers": True}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.05))


def _head(d: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d // 2), torch.nn.GELU(),
                               torch.nn.Linear(d // 2, d))


class TorchD2VLM:
    """The authors' modules (tiny, random) and the reference computation on them."""

    def __init__(self, vocab: int, seed: int = 0):
        torch.manual_seed(seed)
        vcfg = transformers.InstructBlipVisionConfig(
            hidden_size=VW, intermediate_size=VMLP, num_hidden_layers=VDEPTH, num_attention_heads=VHEADS,
            image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
        vcfg._attn_implementation = "eager"
        self.vision = transformers.InstructBlipVisionModel(vcfg).eval()
        qcfg = transformers.InstructBlipQFormerConfig(
            vocab_size=QVOCAB, hidden_size=QH, num_hidden_layers=QLAYERS, num_attention_heads=QHEADS,
            intermediate_size=QFFN, max_position_embeddings=QPOS, cross_attention_frequency=2,
            encoder_hidden_size=VW, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        qcfg._attn_implementation = "eager"
        self.qformer = transformers.InstructBlipQFormerModel(qcfg).eval()
        self.query = torch.nn.Parameter(torch.randn(1, NQ, QH) * 0.5)
        self.ln_vision = torch.nn.LayerNorm(VW)
        self.proj = torch.nn.Linear(QH, VW)
        self.q_proj = torch.nn.Sequential(torch.nn.LayerNorm(VW), torch.nn.Linear(VW, VW))
        self.k_proj = torch.nn.Sequential(torch.nn.LayerNorm(VW), torch.nn.Linear(VW, VW))
        self.v_proj = torch.nn.Sequential(torch.nn.LayerNorm(VW), torch.nn.Linear(VW, D))
        self.hf_config = transformers.Phi3Config(
            vocab_size=vocab, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
        self.hf_config._attn_implementation = "eager"
        self.llm = transformers.Phi3ForCausalLM(self.hf_config).eval()
        self.frm_head, self.evi_head = _head(D), _head(D)
        for i, m in enumerate(self.modules().values()):
            _randomize(m, 10 + i)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vision": self.vision, "qformer": self.qformer, "ln_vision": self.ln_vision, "proj": self.proj,
                "q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj, "llm": self.llm,
                "frm_head": self.frm_head, "evi_head": self.evi_head}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors under the authors' names, plus the unused extras they carry."""
        out, p = {}, ck.VISION_PREFIX
        sd = self.vision.state_dict()
        out[f"{p}.patch_embed.proj.weight"] = sd["embeddings.patch_embedding.weight"]
        out[f"{p}.patch_embed.proj.bias"] = sd["embeddings.patch_embedding.bias"]
        out[f"{p}.cls_token"] = sd["embeddings.class_embedding"]
        out[f"{p}.pos_embed"] = sd["embeddings.position_embedding"]
        for i in range(VDEPTH):  # block 2 is past vision_output_layer: carried, unused
            s, d = f"encoder.layers.{i}", f"{p}.blocks.{i}"
            for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{d}.{b}.weight"], out[f"{d}.{b}.bias"] = sd[f"{s}.{a}.weight"], sd[f"{s}.{a}.bias"]
            out[f"{d}.attn.qkv.weight"] = sd[f"{s}.self_attn.qkv.weight"]
            bias = sd[f"{s}.self_attn.qkv.bias"]
            out[f"{d}.attn.q_bias"], out[f"{d}.attn.v_bias"] = bias[:VW], bias[2 * VW:]
        out[f"{p}.norm.weight"], out[f"{p}.norm.bias"] = torch.ones(VW), torch.zeros(VW)
        for k, v in self.qformer.state_dict().items():
            k = k.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self.").replace("embeddings.layernorm.",
                                                                               "embeddings.LayerNorm.")
            out[f"model.qformer_bert.bert.{k}"] = v
        out["model.qformer_bert.bert.embeddings.position_ids"] = torch.arange(QPOS)[None]
        out["model.qformer_bert.cls.predictions.bias"] = torch.zeros(QVOCAB)
        out["model.qformer_bert.cls.predictions.transform.dense.weight"] = torch.zeros(QH, QH)
        out["model.qformer_query"] = self.query
        for name, m in (("qformer_ln", self.ln_vision), ("qformer_proj", self.proj), ("qformer_q_proj", self.q_proj),
                        ("qformer_k_proj", self.k_proj), ("qformer_v_proj", self.v_proj)):
            out.update({f"model.{name}.{k}": v for k, v in m.state_dict().items()})
        out.update(self.llm.state_dict())
        out["model.rotary_emb.inv_freq"] = torch.ones(D // HEADS // 2)  # a buffer older exports carry
        for name in ("frm_head", "evi_head"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        out.update({f"vid_head.{k}": v for k, v in _head(D).state_dict().items()})  # E.T. Chat's matching head
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def frame_tokens(self, frames: np.ndarray, ids: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """frames uint8[N, H, W, 3], ids/valid [L] -> float[N, D] (SPEC §1.1-1.3)."""
        x = (frames.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
        pix = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        patches = self.vision(pix, output_hidden_states=True).hidden_states[VRUN][:, 1:]      # [N, P, VW]
        n = patches.shape[0]
        text_ids = torch.from_numpy(ids).long()[None].expand(n, -1)
        mask = torch.cat([torch.ones(n, NQ, dtype=torch.long), torch.from_numpy(valid).long()[None].expand(n, -1)], 1)
        q = self.qformer(input_ids=text_ids, attention_mask=mask, query_embeds=self.query.expand(n, -1, -1),
                         encoder_hidden_states=self.ln_vision(patches)).last_hidden_state[:, :NQ]
        qo = self.proj(q)
        att = (self.q_proj(qo) @ self.k_proj(patches).transpose(-1, -2) / math.sqrt(VW)).softmax(-1)
        return self.v_proj((att @ patches + qo).mean(1))

    @torch.no_grad()
    def llm_and_heads(self, embeds: torch.Tensor, allowed: np.ndarray, query_pos, frame_pos):
        out = self.llm(inputs_embeds=embeds[None], attention_mask=additive_mask(allowed[None]),
                       output_hidden_states=True)
        h = out.hidden_states[-2][0]            # input of the last decoder layer
        sims = self.evi_head(h[query_pos]) @ self.frm_head(h[frame_pos]).T / math.sqrt(D)
        return out.logits[0], sims


def _config_json(model: TorchD2VLM, tok_ids: dict, **extra) -> dict:
    cfg = model.hf_config.to_dict()
    cfg.pop("_attn_implementation_autoset", None)
    cfg.update({"model_type": "etchat_phi3", "architectures": ["ETChatPhi3ForCausalLM"], "language_model": "phi3",
                "arch_module": "d2vlm_arch", "conv_type": "phi3", "vision_tower": "eva_vit",
                "vision_processor": "clip_center_224", "vision_output_layer": VRUN - 1, "vision_output_token": "patch",
                "mm_projector": "qformer", "use_matching": False, "use_evidence": True, "use_time_tag": False,
                "bi_attention": True, "alpha": 2.0, "consistency_loss": True, "load_base_models": False,
                "evidence_token_id": tok_ids["<evi>"], "evidence_end_token_id": tok_ids["</evi>"],
                "hidden_add_index": 1})
    cfg.update(extra)
    return cfg


def _write_dir(path, tensors: dict, config: dict, tokenizer_dir: str, shard: int | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    keys = sorted(tensors)
    if shard:
        weight_map = {}
        chunks = [keys[i:i + shard] for i in range(0, len(keys), shard)]
        for j, chunk in enumerate(chunks):
            name = f"model-{j + 1:05d}-of-{len(chunks):05d}.safetensors"
            save_file({k: tensors[k] for k in chunk}, os.path.join(path, name))
            weight_map.update({k: name for k in chunk})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    for name in ("tokenizer.json",):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tok_path, _ = train_tiny_tokenizers(["the cat sat on the mat", "a dog runs fast"], str(root / "tok"),
                                        llm_vocab_size=300)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)
    tok_ids = {t: tok.token_to_id(t) for t in ("<evi>", "</evi>")}
    vocab = tok.get_vocab_size(with_added_tokens=True) + 4   # padded rows, as Phi-3's 32064
    model = TorchD2VLM(vocab)
    full = _write_dir(root / "full", model.state_dict(), _config_json(model, tok_ids), str(root / "tok"), shard=60)
    return {"root": root, "model": model, "full": full, "tok_ids": tok_ids, "vocab": vocab,
            "tok_dir": str(root / "tok")}


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def imported(setup, request):
    """The full checkpoint imported into the model with layers unrolled, or scanned."""
    dst = str(setup["root"] / ("jax_scanned" if request.param else "jax_full"))
    return ck.import_checkpoint(setup["full"], dst, overrides=SCANNED if request.param else None), dst


# ----------------------------------------------------------------------------- parity


def _inputs(vocab: int, evi_id: int):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (N_FRAMES, IMAGE, IMAGE, 3), dtype=np.uint8)
    qids = np.array([3, 17, 9, 22, 0], np.int32)
    qvalid = np.array([1, 1, 1, 1, 0], bool)
    pre, post = rng.integers(12, vocab, 4), rng.integers(12, vocab, 4)
    post[1] = evi_id
    return frames, qids, qvalid, pre, post


def test_full_import_matches_torch(setup, imported):
    result, dst = imported
    model, config, params = setup["model"], result.config, result.params
    assert config.video.vision.num_blocks_run == VRUN and config.video.vision.num_heads == VHEADS
    assert config.video.qformer.num_heads == QHEADS and config.video.qformer.num_queries == NQ
    assert config.k_evi == 1 and config.alpha == 2.0 and config.llm.vocab_size == setup["vocab"]
    frames, qids, qvalid, pre, post = _inputs(setup["vocab"], setup["tok_ids"]["<evi>"])

    # frame tokens
    jm = D2VLM(config)
    variables = {"params": params}
    tokens = np.asarray(jm.apply(variables, frames[None], np.ones((1, N_FRAMES), bool), qids[None], qvalid[None],
                                 method=D2VLM.encode_video))[0]
    ref_tokens = model.frame_tokens(frames, qids, qvalid)
    err_tok = max_rel_err(tokens, ref_tokens.numpy())

    # logits and grounding similarities: [pre | frames (bidirectional) | post]
    t = len(pre) + N_FRAMES + len(post)
    frame_pos = np.arange(len(pre), len(pre) + N_FRAMES)
    query_pos = np.array([len(pre) + N_FRAMES, len(pre) + N_FRAMES + 1])   # the state before <evi>, and <evi>
    ids = np.concatenate([pre, np.zeros(N_FRAMES, np.int64), post])
    block = np.zeros(t, np.int32)
    block[frame_pos] = 1
    layout = attn_lib.SequenceLayout(jnp.ones((1, t), bool), jnp.zeros((1, t), jnp.int32), jnp.asarray(block[None]))
    allowed = np.array(attn_lib.build_mask(layout, 0, t))[0]
    assert allowed[frame_pos[0], frame_pos[-1]] and not allowed[0, 1]

    with torch.no_grad():
        emb = model.llm.get_input_embeddings()(torch.from_numpy(ids).long())
        emb[frame_pos] = ref_tokens
    ref_logits, ref_sims = model.llm_and_heads(emb, allowed, query_pos, frame_pos)

    emb_j = np.array(jm.apply(variables, jnp.asarray(ids[None], jnp.int32), method=D2VLM.embed))
    emb_j[0, frame_pos] = tokens
    out = jm.apply(variables, inputs_embeds=jnp.asarray(emb_j), positions=jnp.arange(t)[None], layout=layout,
                   output_hidden_layers=(LAYERS - 1,), method=D2VLM.run_llm)
    h = out.hidden_states[LAYERS - 1]
    sims = np.asarray(jm.apply(variables, h[:, query_pos], h[:, frame_pos], method=D2VLM.grounding_scores))[0]
    err_logits, err_sims = max_rel_err(out.logits[0], ref_logits.numpy()), max_rel_err(sims, ref_sims.numpy())
    print(f"frame tokens {err_tok:.2e} logits {err_logits:.2e} grounding sims {err_sims:.2e} (max rel err)")
    assert err_tok <= TOL and err_logits <= TOL and err_sims <= TOL
    assert np.abs(ref_sims.numpy()).max() > 1e-3   # not vacuous

    # every unused key is listed with a reason, nothing else was dropped
    assert set(result.ignored) == {
        *(k for k in model.state_dict() if k.startswith(f"{ck.VISION_PREFIX}.blocks.2.")),
        f"{ck.VISION_PREFIX}.norm.weight", f"{ck.VISION_PREFIX}.norm.bias",
        "model.qformer_bert.bert.embeddings.position_ids", "model.qformer_bert.cls.predictions.bias",
        "model.qformer_bert.cls.predictions.transform.dense.weight", "model.rotary_emb.inv_freq",
        *(f"vid_head.{k}" for k in _head(D).state_dict())}
    assert all(result.ignored.values())

    # the written directory
    assert ck.load_model_config(dst) == config
    assert os.path.isfile(os.path.join(dst, "tokenizer.json"))
    report = json.load(open(os.path.join(dst, ck.REPORT_FILE)))
    assert report["tokenizer"]["size"] == setup["vocab"] - 4
    assert report["tokenizer"]["evi_id"] == setup["tok_ids"]["<evi>"]
    restored = ck.load_params(dst)
    for path, leaf in flatten(params).items():
        np.testing.assert_array_equal(flatten(restored)[path], leaf)


# ----------------------------------------------------------------------------- round trips


def test_import_export_import_is_identity(setup, imported, tmp_path):
    result, dst = imported
    files = ck.export_checkpoint(dst, tmp_path / "hf", lora="merged", max_shard_bytes=200_000)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1          # really sharded, with an index
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    reader = SafetensorsReader(tmp_path / "hf")
    rule_keys = {r.source_key for r in ck.d2vlm_rules(result.config)}
    assert set(index["weight_map"]) == set(reader) == rule_keys
    # tensors the model uses come back bit-identical under the authors' names
    original = SafetensorsReader(setup["full"])
    for key in rule_keys:
        np.testing.assert_array_equal(reader[key], original[key], err_msg=key)
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["model_type"] == "etchat_phi3" and cfg["evidence_token_id"] == setup["tok_ids"]["<evi>"]
    again = ck.import_checkpoint(tmp_path / "hf", tmp_path / "jax2",
                                 overrides=SCANNED if result.config.llm.scan_layers else None)
    assert again.config == result.config and not again.ignored
    for path, leaf in flatten(result.params).items():
        np.testing.assert_array_equal(flatten(again.params)[path], leaf, err_msg="/".join(path))


def _lora_factors(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        for name, (fin, fout) in (("qkv_proj", (D, D + 2 * KV * (D // HEADS))), ("o_proj", (D, D))):
            out[f"model.layers.{i}.self_attn.{name}"] = (torch.randn(RANK, fin, generator=g) * 0.1,
                                                         torch.randn(fout, RANK, generator=g) * 0.1)
    return out


@pytest.fixture(scope="module")
def split(setup):
    """Split form (PEFT adapter + partial on a base dir) and the full form of the same model."""
    root, model = setup["root"], setup["model"]
    full_state = model.state_dict()
    factors = _lora_factors(5)
    # the base: un-merged weights, and a smaller (pre-<evi>) vocabulary the partial file replaces
    base_state = dict(full_state)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        base_state[key] = full_state[key][:-6].clone() * 0.5
    base_cfg = _config_json(model, setup["tok_ids"], use_evidence=True)
    base_dir = _write_dir(root / "base", base_state, base_cfg, setup["tok_dir"])
    split_dir = root / "split"
    os.makedirs(split_dir)
    adapters = {}
    for key, (a, b) in factors.items():
        adapters[f"base_model.model.{key}.lora_A.weight"] = a.contiguous()
        adapters[f"base_model.model.{key}.lora_B.weight"] = b.contiguous()
    save_file(adapters, str(split_dir / ck.ADAPTER_FILE))
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.05,
               "bias": "none", "target_modules": ["qkv_proj", "o_proj"]}, open(split_dir / ck.ADAPTER_CONFIG_FILE, "w"))
    partial = {f"base_model.model.{k}": v for k, v in full_state.items() if ck.is_authors_trainable(k)
               and not k.startswith("vid_head")}
    assert "base_model.model.model.qformer_bert.bert.encoder.layer.0.crossattention.self.key.weight" in partial
    assert not any("intermediate" in k for k in partial)
    save_file(partial, str(split_dir / ck.PARTIAL_FILE))
    json.dump(_config_json(model, setup["tok_ids"], model_name_or_path=base_dir), open(split_dir / "config.json", "w"))
    shutil.copy(os.path.join(setup["tok_dir"], "tokenizer.json"), split_dir / "tokenizer.json")
    # the full form of the same model: adapters merged in torch
    merged = dict(full_state)
    for key, (a, b) in factors.items():
        merged[f"{key}.weight"] = full_state[f"{key}.weight"] + (ALPHA / RANK) * (b @ a)
    merged_dir = _write_dir(root / "merged", merged, _config_json(model, setup["tok_ids"]), setup["tok_dir"])
    return str(split_dir), merged_dir, factors


def test_split_and_full_forms_import_to_the_same_params(split):
    split_dir, merged_dir, factors = split
    full = ck.import_checkpoint(merged_dir)
    merged = ck.import_checkpoint(split_dir, lora="merge")
    kept = ck.import_checkpoint(split_dir, lora="keep")
    assert merged.report["form"] == "split" and kept.config.llm.lora_rank == RANK
    assert kept.config.llm.lora_alpha == ALPHA
    # the base's smaller embeddings are shadowed by the partial file and reported
    assert any(s.endswith("model.embed_tokens.weight") for s in merged.report["shadowed"])
    assert merged.config == full.config
    folded = lora_lib.merge_lora(kept.params["llm"], ALPHA, RANK)
    worst = 0.0
    for path, leaf in flatten(full.params).items():
        np.testing.assert_allclose(flatten(merged.params)[path], leaf, rtol=0, atol=1e-6, err_msg="/".join(path))
        other = np.asarray(flatten({"llm": folded, **{k: v for k, v in kept.params.items() if k != "llm"}})[path])
        worst = max(worst, float(np.abs(other - leaf).max()))
    print(f"split(keep)+merge_lora vs full max abs diff {worst:.2e}")
    base_kernel = kept.params["llm"]["layers_0"]["attn"]["qkv_proj"]["base"]["kernel"]
    assert np.abs(base_kernel - full.params["llm"]["layers_0"]["attn"]["qkv_proj"]["base"]["kernel"]).max() > 1e-4
    assert worst <= 1e-6
    a, b = factors["model.layers.1.self_attn.o_proj"]
    np.testing.assert_array_equal(kept.params["llm"]["layers_1"]["attn"]["o_proj"]["lora_a"], a.numpy().T)
    np.testing.assert_array_equal(kept.params["llm"]["layers_1"]["attn"]["o_proj"]["lora_b"], b.numpy().T)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_lora_export_merges_exactly_and_adapter_roundtrips(split, tmp_path, scan):
    split_dir, _, _ = split
    overrides = SCANNED if scan else None
    kept = ck.import_checkpoint(split_dir, tmp_path / "jax", lora="keep", overrides=overrides)
    if scan:
        assert kept.params["llm"]["layers"]["attn"]["qkv_proj"]["lora_a"].shape[0] == LAYERS
    ck.export_checkpoint(tmp_path / "jax", tmp_path / "merged", lora="merged")
    ck.export_checkpoint(tmp_path / "jax", tmp_path / "adapter", lora="adapter")
    merged = SafetensorsReader(tmp_path / "merged")
    adapter = SafetensorsReader(tmp_path / "adapter" / ck.ADAPTER_FILE)
    base = SafetensorsReader(tmp_path / "adapter" / "base")
    acfg = json.load(open(tmp_path / "adapter" / ck.ADAPTER_CONFIG_FILE))
    assert acfg["r"] == RANK and acfg["lora_alpha"] == ALPHA
    assert sorted(acfg["target_modules"]) == ["o_proj", "qkv_proj"]
    n = 0
    for key in adapter:
        if key.endswith("lora_A.weight"):
            w = key[len(ck.PEFT_PREFIX):-len(".lora_A.weight")] + ".weight"
            a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]
            by_hand = base[w].astype(np.float64) + acfg["lora_alpha"] / acfg["r"] * (b.astype(np.float64) @ a)
            np.testing.assert_allclose(merged[w], by_hand, rtol=1e-6, atol=1e-7, err_msg=w)
            assert np.abs(merged[w] - base[w]).max() > 1e-4     # the adapter really changed it
            n += 1
    assert n == 2 * LAYERS
    again = ck.import_checkpoint(tmp_path / "adapter", lora="keep", overrides=overrides)
    assert again.config == kept.config
    for path, leaf in flatten(kept.params).items():
        np.testing.assert_array_equal(flatten(again.params)[path], leaf, err_msg="/".join(path))


# ----------------------------------------------------------------------------- formats and errors


def test_bf16_safetensors_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(5, 7, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g).half(),
         "c": torch.arange(4, dtype=torch.int64)}
    save_file(t, str(tmp_path / "x.safetensors"))
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert r.dtype("a") == np.dtype(ml_dtypes.bfloat16) and r.shape("a") == (5, 7)
    np.testing.assert_array_equal(r["a"].astype(np.float32), t["a"].float().numpy())
    np.testing.assert_array_equal(r["b"], t["b"].numpy())
    np.testing.assert_array_equal(r["c"], t["c"].numpy())
    # our writer's bf16 output reads back in torch
    from safetensors.torch import load_file
    write_safetensors(tmp_path / "y.safetensors", {"a": r["a"], "c": r["c"]})
    back = load_file(str(tmp_path / "y.safetensors"))
    assert back["a"].dtype == torch.bfloat16 and torch.equal(back["a"], t["a"]) and torch.equal(back["c"], t["c"])


def test_bf16_checkpoint_imports(setup, tmp_path):
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in setup["model"].state_dict().items()}
    cfg = json.load(open(os.path.join(setup["full"], "config.json")))
    d = _write_dir(tmp_path / "bf16", state, cfg, setup["tok_dir"])
    res = ck.import_checkpoint(d)
    kernel = res.params["llm"]["layers_0"]["attn"]["qkv_proj"]["base"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, state["model.layers.0.self_attn.qkv_proj.weight"].float().numpy().T)


def _expect_error(directory, *fragments, **kw):
    with pytest.raises(CheckpointError) as e:
        ck.import_checkpoint(directory, **kw)
    msg = str(e.value)
    print(msg)
    for f in fragments:
        assert f in msg, (f, msg)


def test_every_mismatch_names_key_and_shapes(setup, tmp_path):
    model, tok_ids = setup["model"], setup["tok_ids"]
    cfg = _config_json(model, tok_ids)
    good = model.state_dict()

    bad = dict(good)
    del bad["model.layers.1.mlp.down_proj.weight"]
    bad["model.extra.weight"] = torch.zeros(2, 3)
    bad["frm_head.1.weight"] = torch.zeros(D // 2 + 1, D)
    bad["evi_head.3.bias"] = torch.arange(D)            # integer where the model wants floats
    _expect_error(_write_dir(tmp_path / "bad", bad, cfg, setup["tok_dir"]),
                  "missing key 'model.layers.1.mlp.down_proj.weight'", f"({FFN}, {D})",
                  "unexpected key 'model.extra.weight' shape (2, 3)",
                  f"shape mismatch for 'frm_head.1.weight': checkpoint ({D // 2 + 1}, {D}) as stored, "
                  f"({D}, {D // 2 + 1}) after conversion vs model frm_head/fc1/kernel ({D}, {D // 2})",
                  "dtype mismatch for 'evi_head.3.bias': checkpoint int64")

    # vocab vs tokenizer: a tokenizer with more ids than the embedding has rows
    small = dict(good)
    rows = setup["vocab"] - 8
    small["model.embed_tokens.weight"] = good["model.embed_tokens.weight"][:rows].clone()
    small["lm_head.weight"] = good["lm_head.weight"][:rows].clone()
    _expect_error(_write_dir(tmp_path / "vocab", small, {**cfg, "vocab_size": rows}, setup["tok_dir"]),
                  f"tokenizer in {tmp_path / 'vocab'} has {setup['vocab'] - 4} ids", f"have {rows} rows")
    _expect_error(_write_dir(tmp_path / "vocab2", good, {**cfg, "vocab_size": rows}, setup["tok_dir"]),
                  f"vocab_size={rows}", f"has {setup['vocab']} rows")
    _expect_error(_write_dir(tmp_path / "evi", good, {**cfg, "evidence_token_id": 7}, setup["tok_dir"]),
                  "evidence_token_id=7", f"id {tok_ids['<evi>']}")
    _expect_error(_write_dir(tmp_path / "etchat", good, {**cfg, "use_evidence": False}, setup["tok_dir"]),
                  "use_evidence")


def test_pickled_checkpoints_are_refused(setup, tmp_path):
    d = tmp_path / "pickled"
    os.makedirs(d)
    shutil.copy(os.path.join(setup["full"], "config.json"), d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    _expect_error(d, "pickled checkpoints are never loaded", "save_file(torch.load(")
    with pytest.raises(CheckpointError, match="never loaded"):
        SafetensorsReader(d / "pytorch_model.bin")


# ----------------------------------------------------------------------------- streaming and placement


class CountingSource(dict):
    """Counts reads per key and the largest number of tensors alive at once."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.reads = inner, {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return self.inner[key]

    def __contains__(self, key):
        return key in self.inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)

    def shape(self, key):
        return self.inner.shape(key)


def test_each_tensor_is_read_once_and_placed_sharded(setup, imported, tmp_path):
    result, _ = imported
    ckpt = ck.open_authors_checkpoint(setup["full"])
    counting = CountingSource(ckpt.source)
    ckpt.source = counting
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, ignored = ck.load_authors_params(ckpt, result.config, mesh=mesh)
    used = {r.source_key for r in ck.d2vlm_rules(result.config)}
    assert set(counting.reads) == used and set(counting.reads.values()) == {1}   # ignored keys: header only
    assert set(ignored) == set(result.ignored)
    _, boxed = ck.abstract_params(result.config)
    want = flatten(sharding.shardings_for(boxed, mesh, result.config.llm.sharding_rules)["params"])
    split_some = False
    for path, leaf in flatten(params).items():
        assert isinstance(leaf, jax.Array) and leaf.sharding == want[path], path
        split_some |= leaf.sharding.spec != PartitionSpec()
        np.testing.assert_array_equal(np.asarray(leaf), flatten(result.params)[path])
    assert split_some
    # Orbax round trip of the sharded tree, restored straight onto the same shardings
    path = ck.save_params(tmp_path, params)
    assert os.path.isdir(path)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    back = ck.load_params(tmp_path, target)
    for path, leaf in flatten(back).items():
        assert leaf.sharding == want[path]
        np.testing.assert_array_equal(np.asarray(leaf), flatten(result.params)[path])


def test_launchers_import_then_export(setup, tmp_path):
    """The real entry points, end to end (subprocesses)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, env=env, timeout=300)
    out = run(os.path.join(root, "launch", "import_checkpoint.py"), f"--src={setup['full']}",
              f"--dst={tmp_path / 'jax'}", "--param_dtype=float32")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ignored model.qformer_bert.cls.predictions.bias" in out.stdout and "<evi>=" in out.stdout
    out = run(os.path.join(root, "launch", "export_checkpoint.py"), f"--src={tmp_path / 'jax'}",
              f"--dst={tmp_path / 'hf'}", "--lora=merged", "--dtype=bfloat16")
    assert out.returncode == 0, out.stderr[-3000:]
    reader = SafetensorsReader(tmp_path / "hf")
    key = "model.layers.0.self_attn.qkv_proj.weight"
    assert reader.dtype(key) == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(reader[key], SafetensorsReader(setup["full"])[key].astype(ml_dtypes.bfloat16))
    assert json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "bfloat16"
