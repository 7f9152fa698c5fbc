"""Grounding-then-answering generation (d2vlm_jax.inference.decode, SPEC §5).

The cached, jitted decoder is checked against a naive reference written here: at every step
it re-runs the whole sequence (valid prefix + generated tokens, no cache, no padding in the
middle) through the model, reads ``F`` from a first pass and rebuilds every injected
``<evi>`` embedding from the intervals chosen so far (the authors' two-pass algorithm),
picks the token with numpy and the interval with the *numpy* ``select_interval``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vlm_jax import sharding, testing
from d2vlm_jax.evaluation.intervals import select_interval
from d2vlm_jax.inference import decode
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models import stacking
from d2vlm_jax.models.d2vlm import (D2VLM, build_prefix_embeds, gather_slots, init_variables, inject_evidence,
                                    prefix_layout)

EVI = testing.EVI_ID
END = 24            # a token the test model emits in row 0 only (checked below): rows stop apart
LIKED = 44          # the LM-head column of <evi> copies this token's: <evi> gets emitted
STEPS = 12


@functools.lru_cache(maxsize=None)
def make_batch(config, seed):
    """Rows 0-2: three different prefix lengths (12, 10, 16) and frame counts; row 3: padding."""
    batch = testing.random_batch(config, seed=seed, batch=3, frames=6, prefix=16)
    batch["prefix_valid"][1, 10:] = False
    batch["prefix_ids"][1, 10:] = 0
    return {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def setup(scan=False):
    """Tiny model with random parameters: decisive logits, grounding curves with contrast,
    and an LM-head column for <evi> close to that of a token the model likes (so <evi> gets
    emitted and injection changes what follows). ``scan``: the same parameters, stacked, in
    the model with scanned layers."""
    if scan:
        config, batch, variables = setup()
        config = config.with_scan_layers(True)
        return config, batch, stacking.to_layout(variables, config.layer_stacks)
    config = testing.tiny_d2vlm_config()
    batch = make_batch(config, 0)
    # random parameters straight from the shapes (an eager or jitted init costs 10-20 s here):
    # norm scales 1 + noise, everything else noise, so no weight is degenerate (LoRA B != 0)
    shapes = sharding.unbox(jax.eval_shape(lambda: init_variables(config, jax.random.key(0), batch)))["params"]
    rng = np.random.default_rng(1)

    def make(path, leaf):
        noise = (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return noise + 1 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    params = jax.tree_util.tree_map_with_path(make, shapes)
    head = 10 * params["llm"]["lm_head"]["kernel"]
    head[:, EVI] = 1.05 * head[:, LIKED]   # not an exact copy: no logit ties
    params["llm"]["lm_head"]["kernel"] = head
    for name in ("evi_head", "frm_head"):
        params[name]["fc1"]["kernel"] *= 5
        params[name]["fc2"]["kernel"] *= 10
    params = jax.tree.map(jnp.asarray, params)
    return config, batch, {"params": params}


def row(batch, r):
    return {k: v[r:r + 1] for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def generate_fn(scan=False, **kwargs):
    config, _, _ = setup(scan)
    cfg = decode.DecodeConfig(max_new_tokens=STEPS, evi_token_id=EVI, end_token_id=END, return_probabilities=True,
                              **kwargs)
    return decode.make_generate_fn(D2VLM(config), cfg)


@functools.lru_cache(maxsize=None)
def greedy_output(scan=False):
    _, batch, variables = setup(scan)
    return jax.device_get(generate_fn(scan)(variables, batch))


# ----------------------------------------------------------------------------- naive reference


@functools.lru_cache(maxsize=None)
def naive_step_fn():
    """jitted (variables, row batch with the sequence as its 'prefix', response evi fields,
    index of the last token) -> (logits [V], log-softmax [V], grounding probabilities [N])."""
    config, _, _ = setup()
    model = D2VLM(config)
    num_layers = config.llm.num_layers

    def step(variables, b, evi_positions, evi_intervals, evi_valid, last):
        apply = functools.partial(model.apply, variables)
        frame_tokens = apply(b["frames"], b["frame_valid"], b["qformer_ids"], b["qformer_valid"],
                             method=D2VLM.encode_video)
        emb = build_prefix_embeds(model, variables, b, frame_tokens)
        layout = prefix_layout(b)
        positions = attn_lib.positions_from_valid(layout.valid)
        run = functools.partial(apply, positions=positions, layout=layout, compute_logits=False, method=D2VLM.run_llm)
        first = run(inputs_embeds=emb, output_hidden_layers=(config.k_evi,))
        frame_states = gather_slots(first.hidden_states[config.k_evi], b["frame_positions"])
        emb = inject_evidence(emb, evi_positions, evi_intervals, evi_valid, frame_states, b["frame_valid"])
        out = run(inputs_embeds=emb, output_hidden_layers=(num_layers - 1,))
        hidden = out.hidden_states[num_layers - 1]
        logits = apply(out.final_hidden[:, last][:, None], method=D2VLM.lm_logits)[0, 0]
        frame_hidden = gather_slots(hidden, b["frame_positions"])
        scores = apply(hidden[:, last][:, None], frame_hidden, method=D2VLM.grounding_scores)[0, 0]
        return logits, jax.nn.log_softmax(logits), jax.nn.sigmoid(scores)

    return jax.jit(step)


def naive_sequence(batch_row, tokens, intervals, inject=True):
    """The row's valid prefix, then ``tokens``, then padding to a fixed size (one compile)."""
    num_prefix = int(batch_row["prefix_valid"].sum())
    total = batch_row["prefix_ids"].shape[1] + STEPS
    ids = np.zeros((1, total), np.int32)
    valid = np.zeros((1, total), bool)
    ids[0, :num_prefix] = batch_row["prefix_ids"][0, :num_prefix]
    ids[0, num_prefix:num_prefix + len(tokens)] = tokens
    valid[0, :num_prefix + len(tokens)] = True
    b = dict(batch_row, prefix_ids=ids, prefix_valid=valid)
    evi_positions = np.zeros((1, STEPS), np.int32)
    evi_intervals = np.zeros((1, STEPS, 2), np.int32)
    evi_valid = np.zeros((1, STEPS), bool)
    slots = [num_prefix + j for j, t in enumerate(tokens) if t == EVI]
    assert len(slots) == len(intervals)
    evi_positions[0, :len(slots)] = slots
    evi_intervals[0, :len(slots)] = np.asarray(intervals, np.int32).reshape(-1, 2)
    evi_valid[0, :len(slots)] = inject
    return b, evi_positions, evi_intervals, evi_valid, num_prefix + len(tokens) - 1


def naive_generate(variables, batch_row, repetition_penalty=1.0, *, penalize_prompt=False, exempt=(),
                   stop=(END,), **interval_options):
    """Greedy grounding-then-answering decoding without a cache (numpy control flow)."""
    step = naive_step_fn()
    frame_valid = batch_row["frame_valid"][0]
    prompt = set()
    if penalize_prompt:   # the prompt's text tokens: valid prefix slots that are not frame slots
        frame_slots = set(batch_row["frame_positions"][0][frame_valid].tolist())
        prompt = {int(t) for k, (t, v) in enumerate(zip(batch_row["prefix_ids"][0], batch_row["prefix_valid"][0]))
                  if v and k not in frame_slots}
    tokens, intervals, logprobs, curves = [], [], [], []
    for _ in range(STEPS):
        logits, logp, probs = jax.device_get(step(variables, *naive_sequence(batch_row, tokens, intervals)))
        scores = logits.copy()
        if repetition_penalty != 1.0:
            for t in (set(tokens) | prompt) - set(exempt):
                scores[t] = scores[t] / repetition_penalty if scores[t] > 0 else scores[t] * repetition_penalty
        token = int(np.argmax(scores))
        tokens.append(token)
        logprobs.append(float(logp[token]))
        if token == EVI:
            intervals.append(select_interval(probs, frame_valid, **interval_options))
            curves.append(np.where(frame_valid, probs, 0))
        if token in stop:
            break
    return tokens, intervals, np.array(logprobs), curves


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_greedy_decoding_equals_naive_reference(scan):
    """The cached decoder (layers unrolled or scanned, stacked KV cache) against the unrolled
    model run from scratch at every step."""
    _, batch, variables = setup()
    out = greedy_output(scan)
    rows = decode.unbatch(out, EVI)[:3]
    total_evi = 0
    for r, result in enumerate(rows):
        tokens, intervals, logprobs, curves = naive_generate(variables, row(batch, r))
        print(f"row {r}: {result.token_ids} intervals {result.evidence_intervals} finished {result.finished}")
        assert result.token_ids == tokens
        assert result.evidence_intervals == intervals
        np.testing.assert_allclose(out.token_logprobs[r, :len(tokens)], logprobs, rtol=1e-5, atol=1e-5)
        assert np.all(out.token_logprobs[r, len(tokens):] == 0)
        assert len(result.evidence_probs) == len(curves)
        for got, want in zip(result.evidence_probs, curves):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert result.finished == (tokens[-1] == END)
        not_evi = np.asarray(out.tokens[r]) != EVI
        assert np.all(out.evi_intervals[r][not_evi] == -1) and np.all(out.evi_probs[r][not_evi] == 0)
        total_evi += len(intervals)
    # the test exercises what it claims: <evi> emitted several times with different
    # intervals, one row stopped early and one ran to max_new_tokens
    assert total_evi >= 3 and len({iv for r in rows for iv in r.evidence_intervals}) >= 2
    assert any(r.finished and len(r.token_ids) < STEPS for r in rows)
    assert any(not r.finished and len(r.token_ids) == STEPS for r in rows)
    np.testing.assert_array_equal(out.num_tokens[:3], [len(r.token_ids) for r in rows])
    for r, result in enumerate(rows):  # finished rows emit pad
        assert np.all(out.tokens[r, len(result.token_ids):] == 0)
    # the padding row (no valid prefix token) generates nothing
    assert out.num_tokens[3] == 0 and not out.finished[3] and np.all(out.tokens[3] == 0)
    assert np.all(out.evi_intervals[3] == -1)


def test_injection_changes_what_follows_an_evidence_token():
    """The reference comparison above is sensitive to the injected features: without them
    the log-probabilities after the first <evi> differ."""
    _, batch, variables = setup()
    out = greedy_output()
    step = naive_step_fn()
    differences = []
    for r, result in enumerate(decode.unbatch(out, EVI)):
        if EVI not in result.token_ids:
            continue
        k = result.token_ids.index(EVI) + 1   # the step after the first <evi>
        prefix_tokens = result.token_ids[:k]
        seq = naive_sequence(row(batch, r), prefix_tokens, result.evidence_intervals[:1], inject=False)
        _, logp, _ = step(variables, *seq)
        differences.append(abs(float(logp[result.token_ids[k]]) - float(out.token_logprobs[r, k])))
    assert differences and max(differences) > 1e-3, differences


def test_repetition_penalty_equals_naive_reference():
    _, batch, variables = setup()
    fn = generate_fn()
    out = fn(variables, batch, repetition_penalty=1.8)   # a runtime knob: same compiled program
    rows = decode.unbatch(out, EVI)
    assert [r.token_ids for r in rows] != [r.token_ids for r in decode.unbatch(greedy_output(), EVI)]
    for r in (0, 1):
        tokens, intervals, logprobs, _ = naive_generate(variables, row(batch, r), repetition_penalty=1.8)
        assert rows[r].token_ids == tokens
        assert rows[r].evidence_intervals == intervals
        np.testing.assert_allclose(np.asarray(out.token_logprobs)[r, :len(tokens)], logprobs, rtol=1e-5, atol=1e-5)
    assert fn.jitted._cache_size() == 1


def test_authors_options_equal_naive_reference():
    """Prompt + generated tokens penalized (<evi> exempt), a per-row penalty, extra stop ids,
    the span tie rule in float16 arithmetic: the same tokens and intervals as the naive loop."""
    _, batch, variables = setup()
    stop = (END, 31)
    fn = generate_fn(penalize_prompt=True, penalty_exempt_ids=(EVI,), stop_token_ids=(31,),
                     interval_tie_rule="span", interval_arithmetic="float16")
    penalties = [1.8, 1.0, 1.8, 1.0]
    rows = decode.unbatch(fn(variables, batch, repetition_penalty=penalties), EVI)
    for r in (0, 1, 2):
        tokens, intervals, logprobs, _ = naive_generate(variables, row(batch, r), penalties[r], penalize_prompt=True,
                                                        exempt=(EVI,), stop=stop, tie_rule="span",
                                                        arithmetic="float16")
        assert rows[r].token_ids == tokens, r
        assert rows[r].evidence_intervals == intervals, r
    # the options matter: prompt tokens penalized change row 0, the unpenalized row is greedy
    assert rows[0].token_ids != decode.unbatch(greedy_output(), EVI)[0].token_ids
    assert rows[1].token_ids[:len(rows[1].token_ids)] == naive_generate(variables, row(batch, 1), stop=stop)[0]
    with pytest.raises(ValueError, match="3 repetition penalties for 4 rows"):
        fn(variables, batch, repetition_penalty=[1.0, 1.2, 1.2])
    assert fn.jitted._cache_size() == 1


def test_prompt_token_mask():
    batch = {"prefix_ids": np.array([[5, 9, 9, 2, 7]]), "prefix_valid": np.array([[1, 1, 1, 1, 0]], bool),
             "frame_positions": np.array([[1, 2]]), "frame_valid": np.array([[True, True]])}
    mask = np.asarray(decode.prompt_token_mask(batch, 10))
    np.testing.assert_array_equal(np.flatnonzero(mask[0]), [2, 5])      # 9 only at frame slots, 7 padding


def test_top_k_keeps_the_k_largest_with_ties():
    cfg = decode.DecodeConfig(max_new_tokens=1, evi_token_id=0, end_token_id=None, temperature=1.0)
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.3, 0.1]], jnp.float32))
    none_generated = jnp.zeros((2, 4), bool)

    def kept(**knobs):
        knobs = decode.SamplingKnobs.from_config(cfg, **knobs)
        return np.isfinite(np.asarray(decode._process_logits(logits, none_generated, knobs, greedy=False)))

    np.testing.assert_array_equal(kept(top_k=2), [[1, 1, 0, 0], [1, 1, 1, 0]])      # ties with the 2nd stay
    np.testing.assert_array_equal(kept(top_k=0), np.ones((2, 4)))
    np.testing.assert_array_equal(kept(top_k=9), np.ones((2, 4)))
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.5), [[1, 1, 0, 0], [1, 1, 1, 0]])   # top-p after top-k
    with pytest.raises(ValueError, match="top_k"):
        decode.SamplingKnobs.from_config(cfg, top_k=-1)


def test_batched_decoding_equals_one_at_a_time():
    _, batch, variables = setup()
    assert len(set(batch["prefix_valid"][:3].sum(1).tolist())) == 3  # three different prefix lengths
    batched = decode.unbatch(greedy_output(), EVI)
    fn = generate_fn()
    for r in range(3):
        alone = decode.unbatch(fn(variables, row(batch, r)), EVI)[0]
        assert alone.token_ids == batched[r].token_ids
        assert alone.evidence_intervals == batched[r].evidence_intervals
        for a, b in zip(alone.evidence_probs, batched[r].evidence_probs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_no_recompilation_with_same_shapes(scan):
    config, batch, variables = setup(scan)
    fn = generate_fn(scan)
    greedy_output(scan)  # compiled
    other = make_batch(config, 5)
    cache_entries = fn.jitted._cache_size()
    with decode.count_compilations() as compiles:
        for b in (other, batch, other):
            jax.block_until_ready(fn(variables, b))
    assert compiles == []
    assert fn.jitted._cache_size() == cache_entries


def test_count_compilations_sees_a_compilation():
    with decode.count_compilations() as compiles:
        jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
    assert len(compiles) == 1


def test_sampling_is_deterministic_and_degenerates_to_greedy():
    _, batch, variables = setup()
    greedy = [r.token_ids for r in decode.unbatch(greedy_output(), EVI)]
    sample = generate_fn(temperature=1.0)   # one compiled sampler; knobs vary at runtime
    a = decode.unbatch(sample(variables, batch, jax.random.key(3), temperature=1.5, top_p=0.95), EVI)
    b = decode.unbatch(sample(variables, batch, jax.random.key(3), temperature=1.5, top_p=0.95), EVI)
    c = decode.unbatch(sample(variables, batch, jax.random.key(4), temperature=1.5, top_p=0.95), EVI)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.evidence_intervals for r in a] == [r.evidence_intervals for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert [r.token_ids for r in a] != greedy
    # temperature -> 0 and a tiny nucleus are both greedy decoding
    cold = sample(variables, batch, jax.random.key(3), temperature=1e-4)
    assert [r.token_ids for r in decode.unbatch(cold, EVI)] == greedy
    nucleus = sample(variables, batch, jax.random.key(3), temperature=1.0, top_p=1e-6)
    assert [r.token_ids for r in decode.unbatch(nucleus, EVI)] == greedy
    assert sample.jitted._cache_size() == 1
    with pytest.raises(ValueError, match="rng"):
        sample(variables, batch)
    with pytest.raises(ValueError, match="greedy"):
        sample(variables, batch, jax.random.key(3), temperature=0.0)
    with pytest.raises(ValueError, match="greedy"):
        generate_fn()(variables, batch, temperature=0.5)


def test_top_p_keeps_the_nucleus():
    cfg = decode.DecodeConfig(max_new_tokens=1, evi_token_id=0, end_token_id=None, temperature=1.0)
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.6, 0.25, 0.05]], np.float32)
    none_generated = jnp.zeros((2, 4), bool)

    def kept(top_p, temperature=1.0):
        knobs = decode.SamplingKnobs.from_config(cfg, temperature=temperature, top_p=top_p)
        return np.isfinite(np.asarray(decode._process_logits(jnp.log(probs), none_generated, knobs, greedy=False)))

    np.testing.assert_array_equal(kept(0.7), [[1, 1, 0, 0], [0, 1, 1, 0]])   # 0.5+0.3 >= 0.7; 0.6+0.25 >= 0.7
    np.testing.assert_array_equal(kept(0.5), [[1, 0, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(kept(1.0), np.ones((2, 4)))
    # the nucleus is taken after the temperature: at T=0.25 the top token holds > 0.7
    np.testing.assert_array_equal(kept(0.7, 0.25), [[1, 0, 0, 0], [0, 1, 0, 0]])


def test_repetition_penalty_rule():
    cfg = decode.DecodeConfig(max_new_tokens=1, evi_token_id=0, end_token_id=None)
    knobs = decode.SamplingKnobs.from_config(cfg, repetition_penalty=2.0)
    logits = jnp.array([[2.0, -2.0, 2.0, -2.0]])
    generated = jnp.array([[True, True, False, False]])
    out = decode._process_logits(logits, generated, knobs, greedy=True)
    np.testing.assert_allclose(out, [[1.0, -4.0, 2.0, -2.0]])


def test_decode_config_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.DecodeConfig(max_new_tokens=0, evi_token_id=1, end_token_id=2)
    with pytest.raises(ValueError, match="top_p"):
        decode.DecodeConfig(max_new_tokens=1, evi_token_id=1, end_token_id=2, top_p=0.0)
    config, batch, variables = setup()
    bad = decode.DecodeConfig(max_new_tokens=1, evi_token_id=config.llm.vocab_size, end_token_id=2)
    with pytest.raises(ValueError, match="evi_token_id"):
        decode.generate(D2VLM(config), variables, batch, bad)
    with pytest.raises(KeyError, match="prefix_ids"):
        generate_fn()(variables, {k: v for k, v in batch.items() if k != "prefix_ids"})


# ----------------------------------------------------------------------------- rendering

# A SentencePiece-like toy vocabulary: "▁" marks a leading space; decoding strips the space
# at the very start of the text, as SentencePiece's decoder does.
VOCAB = {1: "▁The", 2: "▁man", 3: "▁opens", 4: "▁it", 5: "▁at", 6: ".", 7: "▁and", 8: ",",
         20: "<evi>", 21: "</evi>", 22: "<|end|>", 23: "▁<evi>"}


def toy_decode(ids):
    return "".join(VOCAB[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_render_answer():
    frame_times = np.arange(10, dtype=np.float32) * 2.0 + 0.5   # 0.5 fps: frame k at 2k + 0.5 s
    ids = [20, 8, 20, 21, 1, 2, 3, 4, 5, 20, 6, 7, 5, 20, 6, 22, 0, 0]
    intervals = [(1, 2), (4, 4), (1, 3), (5, 6)]
    answer, grounding = decode.render_answer(ids, intervals, toy_decode, frame_times, evi_token_id=20,
                                             evi_end_token_id=21, stop_token_ids=(22, 0))
    assert grounding == [(2.5, 4.5), (8.5, 8.5)]
    # "<evi>" carries no space of its own here: the text follows the tokenizer exactly
    assert answer == "The man opens it at2.5 - 6.5. and at10.5 - 12.5."
    # a tokenizer that writes the space before <evi> (id 23): the space is kept
    ids2 = [23, 21, 1, 2, 5, 23, 6, 22]
    answer2, grounding2 = decode.render_answer(ids2, [(0, 1), (2, 2)], toy_decode, frame_times, evi_token_id=23,
                                               evi_end_token_id=21, stop_token_ids=(22,))
    assert answer2 == "The man at 4.5 - 4.5."
    assert grounding2 == [(0.5, 2.5)]
    # no </evi>: everything is answer, no grounding stage
    answer3, grounding3 = decode.render_answer([1, 5, 23], [(3, 4)], toy_decode, frame_times, evi_token_id=23,
                                               evi_end_token_id=21)
    assert answer3 == "The at 6.5 - 8.5" and grounding3 == []
    with pytest.raises(ValueError, match="interval"):
        decode.render_answer([1, 23], [], toy_decode, frame_times, evi_token_id=23, evi_end_token_id=21)
    with pytest.raises(ValueError, match="outside"):
        decode.render_answer([1, 23], [(3, 10)], toy_decode, frame_times, evi_token_id=23, evi_end_token_id=21)


def test_render_answer_of_a_generated_row():
    _, batch, _ = setup()
    out = greedy_output()
    result = decode.unbatch(out, EVI)[1]
    assert EVI in result.token_ids
    frame_times = np.arange(6, dtype=np.float32)

    def decode_fn(ids):
        return " ".join("<evi>" if i == EVI else f"w{i}" for i in ids)

    answer, grounding = decode.render_answer(result.token_ids, result.evidence_intervals, decode_fn, frame_times,
                                             evi_token_id=EVI, evi_end_token_id=63, stop_token_ids=(END,))
    assert grounding == []   # the random model never closes the grounding stage (id 63)
    rendered = iter(f"{float(a):.1f} - {float(b):.1f}" for a, b in result.evidence_intervals)
    assert answer == " ".join(next(rendered) if i == EVI else f"w{i}" for i in result.token_ids)
