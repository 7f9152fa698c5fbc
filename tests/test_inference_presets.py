"""Decoding presets and the authors' answer text (d2vlm_jax.inference.presets)."""

import pytest

from d2vlm_jax import testing
from d2vlm_jax.data.tokenizer import TextTokenizer, train_tiny_tokenizers
from d2vlm_jax.inference import presets


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path, _ = train_tiny_tokenizers(["The red circle moves left.", "A blue square appears at the top, then stops."],
                                    tmp_path_factory.mktemp("presets_tokenizer"))
    return TextTokenizer(path, prefix_space="never")


def test_authors_text_golden_strings(tok):
    text = "<evi>, <evi></evi> The red circle at <evi> moves.<|end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text                                  # the decode the authors' rule starts from
    # each <evi> becomes "first - last " (frame indices, trailing space kept), <|end|> cut off
    got = presets.authors_text(ids, [(3, 5), (7, 7), (3, 5)], tok.decode)
    assert got == "3 - 5 , 7 - 7 </evi> The red circle at 3 - 5  moves."
    # a last <evi> right before <|end|>: its trailing space goes with the final strip
    ids = tok.encode("<evi></evi> at <evi><|end|>")
    assert presets.authors_text(ids, [(0, 2), (4, 9)], tok.decode) == "0 - 2 </evi> at 4 - 9"
    # no stop token (max_new_tokens reached): nothing cut; another stop id stays in the text
    ids = tok.encode("<evi></evi> The red")
    assert presets.authors_text(ids, [(12, 14)], tok.decode) == "12 - 14 </evi> The red"
    ids = tok.encode("</evi> The red<|endoftext|>")
    assert presets.authors_text(ids, [], tok.decode) == "</evi> The red<|endoftext|>"
    # leading / trailing spaces of the decoded text are stripped first, as their .strip() does
    ids = tok.encode(" The red circle <|end|>")
    assert presets.authors_text(ids, [], tok.decode) == "The red circle"
    with pytest.raises(ValueError, match="1 <evi> in the decoded text but 2 interval"):
        presets.authors_text(tok.encode("<evi></evi>"), [(0, 1), (2, 3)], tok.decode)


def test_authors_record_keeps_the_input_record():
    raw = {"idx": 3, "task": "tvg", "source": "charades_sta", "video": "v.mp4", "q": "<image>\nWhen?", "tgt": [1, 2]}
    record = presets.authors_record(raw, "1 - 2 </evi> at 1 - 2", 41, {"finished": True})
    assert record == {**raw, "a": "1 - 2 </evi> at 1 - 2", "token length": 41, "d2vlm_jax": {"finished": True}}
    assert "a" not in raw


def test_authors_preset_decode_config(tok):
    preset = presets.get_preset("authors")
    assert preset.penalties(["rar", "tvg", "eca", "rvq", "dvc"]) == [1.2, 1.0, 1.2, 1.2, 1.0]
    cfg = presets.decode_config(preset, tok, max_new_tokens=2048, dtype="float16")
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens) == (0.2, 50, 1.0, 2048)
    assert cfg.penalize_prompt and cfg.penalty_exempt_ids == (tok.evi_id,)
    assert set(cfg.all_stop_ids) == {tok.token_id("<|endoftext|>"), tok.token_id("<|assistant|>"), tok.end_id}
    assert (cfg.interval_tie_rule, cfg.interval_arithmetic) == ("span", "float16")
    assert presets.decode_config(preset, tok, max_new_tokens=8, dtype="float32").interval_arithmetic == "exact"
    assert presets.decode_config(preset, tok, max_new_tokens=8, dtype="bfloat16").interval_arithmetic == "bfloat16"
    greedy = presets.decode_config(presets.get_preset("greedy"), tok, max_new_tokens=8, dtype="float16")
    assert greedy.greedy and greedy.all_stop_ids == (tok.end_id,) and not greedy.penalize_prompt
    assert (greedy.interval_tie_rule, greedy.interval_arithmetic) == ("first", "exact")
    with pytest.raises(ValueError, match="unknown decoding preset"):
        presets.get_preset("beam")


def test_with_compute_dtype_sets_every_tower():
    config = presets.with_compute_dtype(testing.tiny_d2vlm_config(), "float16")
    assert config.llm.dtype == "float16" and config.llm.param_dtype == "float32"
    assert {config.video.vision.dtype, config.video.qformer.dtype, config.video.compressor.dtype} == {"float16"}
    with pytest.raises(ValueError, match="compute dtype"):
        presets.with_compute_dtype(config, "float64")
