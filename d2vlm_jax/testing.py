"""Tiny configs and random well-formed batches, for tests, benchmarks and compile checks.

``random_batch`` follows the batch contract of ``d2vlm_jax.batch`` exactly (frames spliced
into the prefix, grounding-stage then answer-stage ``<evi>`` tokens, question-side evidence,
padding at the end of every axis), so the model sees the same structure as real data.
"""

from __future__ import annotations

import numpy as np

from d2vlm_jax.models.compressor import CompressorConfig
from d2vlm_jax.models.d2vlm import D2VLMConfig
from d2vlm_jax.models.decoder import DecoderConfig
from d2vlm_jax.models.qformer import QFormerConfig
from d2vlm_jax.models.video_encoder import VideoEncoderConfig
from d2vlm_jax.models.vision import VisionConfig

EVI_ID = 5        # token id used for <evi> in random batches
IMAGE_ID = 0      # placeholder id at frame slots


def tiny_d2vlm_config(*, family: str = "phi3", hidden: int = 32, layers: int = 3, vocab: int = 64,
                      image_size: int = 28, lora_rank: int = 4, injection: str = "single_pass",
                      dtype: str = "float32", k_evi: int = 1, scan_layers: bool = False) -> D2VLMConfig:
    vision = VisionConfig(image_size=image_size, patch_size=14, width=32, depth=3, num_heads=2, mlp_dim=48,
                          output_layer=2, dtype=dtype)
    qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, vocab_size=50,
                            max_position_embeddings=64, num_queries=4, encoder_width=32, dtype=dtype)
    compressor = CompressorConfig(query_dim=32, vision_dim=32, out_dim=hidden, dtype=dtype)
    llm = DecoderConfig(family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                        num_layers=layers, num_heads=4, num_kv_heads=2, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank,
                        dtype=dtype)
    return D2VLMConfig(llm=llm, video=VideoEncoderConfig(vision, qformer, compressor), k_evi=k_evi,
                       injection=injection).with_scan_layers(scan_layers)


def random_batch(config: D2VLMConfig, seed: int = 0, *, batch: int = 2, frames: int = 6, qformer_len: int = 5,
                 prefix: int = 16, response: int = 14, evidence: int = 6, events: int = 3, question_evidence: int = 2,
                 rejected: int = 0, lengths_fraction: float = 0.75) -> dict[str, np.ndarray]:
    """A random padded batch. Sample ``b`` uses about ``lengths_fraction`` of each padded size
    (the last sample uses all of it), with ``1..events`` events referenced twice (grounding
    stage + answer stage) and one question-side ``<evi>``."""
    rng = np.random.default_rng(seed)
    vocab = config.llm.vocab_size
    size = config.video.vision.image_size
    n_ev_max = min(events, evidence // 2)
    out = {
        "frames": rng.integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8),
        "frame_valid": np.zeros((batch, frames), bool),
        "qformer_ids": np.zeros((batch, qformer_len), np.int32),
        "qformer_valid": np.zeros((batch, qformer_len), bool),
        "prefix_ids": np.zeros((batch, prefix), np.int32),
        "prefix_valid": np.zeros((batch, prefix), bool),
        "frame_positions": np.zeros((batch, frames), np.int32),
        "question_evi_positions": np.zeros((batch, question_evidence), np.int32),
        "question_evi_intervals": np.zeros((batch, question_evidence, 2), np.int32),
        "question_evi_valid": np.zeros((batch, question_evidence), bool),
    }

    def response_fields(lead):
        return {
            "ids": np.zeros(lead + (response,), np.int32), "valid": np.zeros(lead + (response,), bool),
            "evi_positions": np.zeros(lead + (evidence,), np.int32), "evi_event": np.zeros(lead + (evidence,), np.int32),
            "evi_stage": np.zeros(lead + (evidence,), np.int32), "evi_valid": np.zeros(lead + (evidence,), bool),
            "event_intervals": np.zeros(lead + (events, 2), np.int32), "event_valid": np.zeros(lead + (events,), bool),
        }

    chosen = response_fields((batch,))
    rej = response_fields((batch, rejected))

    def fill_response(dst, idx, n_frames, n_events):
        r_len = max(2 * n_events + 3, int(round(response * (lengths_fraction if idx[0] < batch - 1 else 1.0))))
        r_len = min(r_len, response)
        ids = rng.integers(6, vocab, r_len)
        ids[-1] = 2  # <|end|>
        grounding = np.arange(n_events)                            # "<evi><evi>..."
        answer = np.sort(rng.choice(np.arange(n_events + 1, r_len - 1), n_events, replace=False))
        ids[grounding] = EVI_ID
        ids[answer] = EVI_ID
        dst["ids"][idx][:r_len] = ids
        dst["valid"][idx][:r_len] = True
        m = 2 * n_events
        dst["evi_positions"][idx][:m] = np.concatenate([grounding, answer])
        dst["evi_event"][idx][:m] = np.concatenate([np.arange(n_events)] * 2)
        dst["evi_stage"][idx][:m] = np.repeat([0, 1], n_events)
        dst["evi_valid"][idx][:m] = True
        starts = rng.integers(0, n_frames, n_events)
        ends = np.minimum(starts + rng.integers(0, 3, n_events), n_frames - 1)
        dst["event_intervals"][idx][:n_events] = np.stack([starts, ends], -1)
        dst["event_valid"][idx][:n_events] = True

    for b in range(batch):
        frac = lengths_fraction if b < batch - 1 else 1.0
        n = max(2, int(round(frames * frac)))
        out["frame_valid"][b, :n] = True
        lq = max(2, int(round(qformer_len * frac)))
        out["qformer_ids"][b, :lq] = rng.integers(1, 50, lq)
        out["qformer_valid"][b, :lq] = True
        p_len = min(prefix, max(n + 6, int(round(prefix * frac))))
        ids = rng.integers(6, vocab, p_len)
        ids[3:3 + n] = IMAGE_ID
        q_pos = 3 + n + 1                                            # question-side <evi>
        ids[q_pos] = EVI_ID
        out["prefix_ids"][b, :p_len] = ids
        out["prefix_valid"][b, :p_len] = True
        out["frame_positions"][b, :n] = np.arange(3, 3 + n)
        out["question_evi_positions"][b, 0] = q_pos
        s = rng.integers(0, n)
        out["question_evi_intervals"][b, 0] = (s, min(s + 1, n - 1))
        out["question_evi_valid"][b, 0] = True
        k = 1 + (b % n_ev_max) if b < batch - 1 else n_ev_max
        fill_response(chosen, (b,), n, k)
        for c in range(rejected):
            fill_response(rej, (b, c), n, max(1, k - (c % 2)))

    out.update({"response_ids": chosen["ids"], "response_valid": chosen["valid"],
                "response_loss_mask": chosen["valid"].copy()})
    for f in ("evi_positions", "evi_event", "evi_stage", "evi_valid", "event_intervals", "event_valid"):
        out[f] = chosen[f]
    if rejected:
        for f, v in rej.items():
            out[f"rejected_{f}"] = v
        out["rejected_valid_pair"] = np.ones((batch, rejected), bool)
        # conflict: from a random divergence point to the end of each response
        start = rng.integers(0, 4, (batch, rejected))
        r_idx = np.arange(response)
        out["conflict_token_mask"] = (r_idx >= start[..., None]) & chosen["valid"][:, None]
        out["rejected_conflict_token_mask"] = (r_idx >= start[..., None]) & rej["valid"]
        out["conflict_evi_mask"] = (chosen["evi_positions"][:, None] >= start[..., None]) & chosen["evi_valid"][:, None]
        out["rejected_conflict_evi_mask"] = (rej["evi_positions"] >= start[..., None]) & rej["evi_valid"]
        # unrounded event positions: the frame intervals moved by fixed sub-frame offsets
        # (no draw from ``rng``: the other fields stay what they were)
        offset = np.array([-0.375, 0.25], np.float32)
        out["event_frame_positions"] = chosen["event_intervals"].astype(np.float32) + offset
        out["rejected_event_frame_positions"] = rej["event_intervals"].astype(np.float32) - offset
    return out


def perturbed_params(config: D2VLMConfig, batch: dict[str, np.ndarray], *, scale: float = 0.05) -> dict:
    """Parameters initialised with key 0, then every leaf moved by ``scale`` times a normal draw
    (key 1), so LoRA B, biases and the like are nonzero and gradients are generic."""
    import jax

    from d2vlm_jax import sharding
    from d2vlm_jax.models.d2vlm import init_variables
    params = sharding.unbox(init_variables(config, jax.random.key(0), batch))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
