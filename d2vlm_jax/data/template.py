"""D²VLM sequences: chat template, grounding-then-answering response, preference conflicts.

One annotation becomes an *example*: a dict of numpy arrays of natural length with the
per-example fields of :mod:`d2vlm_jax.batch` (no batch axis; ``frames`` are added by the
pipeline). Layout (SPEC §2.1–2.2)::

    prefix   = [BOS] <|system|>\\nYou are a helpful AI assistant.<|end|>\\n<|user|>\\n
               <image>\\n{question}<|end|>\\n<|assistant|>\\n        (or {question}\\n<image>)
    response = <evi>, <evi>, ..., <evi></evi> {answer}<|end|>

``<image>`` becomes ``N`` slots holding ``image_token_id`` (their prefix slots are
``frame_positions``). The k-th grounding-stage ``<evi>`` and the k-th ``<evi>`` of the answer
both refer to event k (``evi_event``; ``evi_stage`` 0 / 1). Every valid response token is
supervised (``response_loss_mask``), the final ``<|end|>`` included, as in the authors' code.

Tokenization follows the authors (``d2vlm/utils/tokenization.py`` + ``train.py``): the prompt
text is split at ``<image>`` and each side tokenized separately; BOS (when the tokenizer has
``<s>``) starts the first side only; the response is tokenized *together with* the text after
``<image>`` (one string, as in their single prompt string) and split off after the
``<|assistant|>`` header, so the ids equal those of their one-string tokenization whatever the
tokenizer's prefix-space rule. Special tokens' own flags (Phi-3's ``rstrip`` eats the ``\\n``
after ``<|end|>``, ``<|user|>``, ...) are honoured exactly as the tokenizer file says.

Preference examples (SPEC §4.1) add rejected branches and the conflict masks of
:func:`conflict_masks`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Mapping, Sequence

import numpy as np

from d2vlm_jax.data.tokenizer import (ASSISTANT_TOKEN, CHAT_SPECIAL_TOKENS, DEFAULT_SYSTEM_PROMPT, END_TOKEN,
                                      EVIDENCE_END_TOKEN, EVIDENCE_TOKEN, IMAGE_TOKEN, SYSTEM_TOKEN, USER_TOKEN,
                                      QFormerTokenizer, TextTokenizer)
from d2vlm_jax.data.video import seconds_to_frame_interval


class ExampleError(ValueError):
    """An annotation that cannot become an example (too long, inconsistent ``<evi>`` counts,
    a rejected branch identical to the chosen one...). The message names the sample and field;
    the pipeline counts and skips these."""

    def __init__(self, sample_name: str, field: str, reason: str):
        self.sample_name = sample_name
        self.field = field
        self.reason = reason
        super().__init__(f"{sample_name} field '{field}': {reason}")


@dataclasses.dataclass(frozen=True)
class TemplateConfig:
    """How annotations become token sequences.

    Attributes:
      image_token_id: placeholder id held by the frame slots of ``prefix_ids`` (the model
        overwrites those embeddings with frame tokens).
      max_length: longest allowed ``prefix (frames included) + response`` of one branch (each
        rejected branch is checked on its own: its position ids restart after the prefix).
      train: training draws the ``<image>`` placement (before/after the question) with
        probability ``image_first_probability``; evaluation always puts it first.
      image_first_probability: probability of ``<image>\\n{question}`` in training.
      system_prompt: text of the Phi-3 system turn.
      add_bos: start the prefix with ``<s>`` when the tokenizer has one (Phi-3 does).
      grounding_separator: text between consecutive grounding-stage ``<evi>`` tokens.
      answer_separator: text between ``</evi>`` and the answer.
    """
    image_token_id: int = 0
    max_length: int = 2048
    train: bool = True
    image_first_probability: float = 0.5
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    add_bos: bool = True
    grounding_separator: str = ", "
    answer_separator: str = " "

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"template.max_length must be positive, got {self.max_length}")
        if not 0.0 <= self.image_first_probability <= 1.0:
            raise ValueError(f"template.image_first_probability must be in [0, 1], got {self.image_first_probability}")


# ---------------------------------------------------------------------------- text pieces


def response_text(answer: str, num_events: int, config: TemplateConfig = TemplateConfig()) -> str:
    """``<evi>, <evi>, …, <evi></evi> {answer}`` (without the final ``<|end|>``).

    With no event the grounding stage is the bare ``</evi>``: the model still decides first
    that nothing needs grounding.
    """
    grounding = config.grounding_separator.join([EVIDENCE_TOKEN] * num_events) + EVIDENCE_END_TOKEN
    return grounding + config.answer_separator + answer


def prompt_texts(question: str, image_first: bool, config: TemplateConfig = TemplateConfig()) -> tuple[str, str]:
    """The prompt as ``(text before <image>, text after <image>)`` (Phi-3 chat template)."""
    head = f"{SYSTEM_TOKEN}\n{config.system_prompt}{END_TOKEN}\n{USER_TOKEN}\n"
    tail = f"{END_TOKEN}\n{ASSISTANT_TOKEN}\n"
    if image_first:
        return head, "\n" + question + tail
    return head + question + "\n", tail


def image_first_for(example_index: int, rng_seed: int, config: TemplateConfig) -> bool:
    """Placement of ``<image>``: a deterministic coin of ``(rng_seed, example_index)`` in
    training (same answer on every host, worker and epoch restart), always first at eval."""
    if not config.train:
        return True
    coin = random.Random(f"d2vlm-image-placement/{int(rng_seed)}/{int(example_index)}").random()
    return coin < config.image_first_probability


# ---------------------------------------------------------------------------- helpers


def _field(obj: Any, name: str, default: Any = dataclasses.MISSING) -> Any:
    """Attribute of a :class:`~d2vlm_jax.data.schema.Sample`-like object or key of a dict."""
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        return getattr(obj, name)
    if default is dataclasses.MISSING:
        raise KeyError(name)
    return default


def _sample_name(sample: Any, example_index: int) -> str:
    video = _field(sample, "video", "?")
    task = _field(sample, "task", "?")
    return f"sample {example_index} (video {video!r}, task {task!r})"


@dataclasses.dataclass(frozen=True)
class _Branch:
    """One tokenized response with its evidence bookkeeping (natural lengths)."""
    ids: np.ndarray              # int32[R]
    evi_positions: np.ndarray    # int32[M]
    evi_event: np.ndarray        # int32[M]
    evi_stage: np.ndarray        # int32[M]
    event_intervals: np.ndarray  # int32[K, 2]
    event_positions: np.ndarray  # float32[K, 2]: the same events as fractional frame positions

    def evi_interval_at(self) -> dict[int, tuple[int, int]]:
        """response index of each <evi> -> its frame interval."""
        return {int(p): tuple(int(x) for x in self.event_intervals[e])
                for p, e in zip(self.evi_positions, self.evi_event, strict=True)}


def seconds_to_frame_positions(start: float, end: float, frame_times: np.ndarray) -> tuple[float, float]:
    """``[start, end]`` seconds as *fractional* frame positions, not rounded (the raw targets of
    the authors' FPO grounding log-likelihood, whose 1 fps frame ``i`` sits at second ``i``).

    Linear interpolation of the frame index over ``frame_times``, extrapolated beyond the
    first / last frame with the mean frame spacing (an interval reaching past the clip keeps
    its distance to the frames); a reversed interval is swapped (as for frame intervals).
    """
    times = np.asarray(frame_times, np.float64)
    if times.size == 1:
        return 0.0, 0.0
    spacing = (times[-1] - times[0]) / (times.size - 1)

    def position(t: float) -> float:
        if t < times[0]:
            return float((t - times[0]) / spacing)
        if t > times[-1]:
            return float(times.size - 1 + (t - times[-1]) / spacing)
        return float(np.interp(t, times, np.arange(times.size, dtype=np.float64)))

    first, last = position(start), position(end)
    return (first, last) if first <= last else (last, first)


def _intervals(events: Sequence[Sequence[float]], frame_times: np.ndarray, name: str,
               field: str) -> tuple[np.ndarray, np.ndarray]:
    """int32[K, 2] frame intervals and float32[K, 2] fractional frame positions of ``events``."""
    out = np.zeros((len(events), 2), np.int32)
    positions = np.zeros((len(events), 2), np.float32)
    for k, event in enumerate(events):
        try:
            start, end = (float(x) for x in event)
        except (TypeError, ValueError) as e:
            raise ExampleError(name, f"{field}[{k}]", f"expected a [start, end] pair of seconds, got {event!r}") from e
        if not (np.isfinite(start) and np.isfinite(end)):
            raise ExampleError(name, f"{field}[{k}]", f"non-finite interval {event!r}")
        out[k] = seconds_to_frame_interval(start, end, frame_times)  # round, clip, swap (SPEC §2.2)
        positions[k] = seconds_to_frame_positions(start, end, frame_times)
    return out, positions


def _check_text(text: str, name: str, field: str) -> None:
    if not isinstance(text, str):
        raise ExampleError(name, field, f"expected a string, got {type(text).__name__}")
    for bad in (IMAGE_TOKEN, EVIDENCE_END_TOKEN) + CHAT_SPECIAL_TOKENS:
        if bad in text:
            raise ExampleError(name, field, f"contains {bad!r}, which the template adds itself")


class _Builder:
    """Tokenizes one sample's prompt and responses (shared by SFT and preference examples)."""

    def __init__(self, sample: Any, *, frame_times: np.ndarray, tokenizer: TextTokenizer,
                 qformer_tokenizer: QFormerTokenizer, config: TemplateConfig, rng_seed: int, example_index: int):
        self.sample = sample
        self.frame_times = np.asarray(frame_times, np.float32)
        self.tok = tokenizer
        self.qtok = qformer_tokenizer
        self.config = config
        self.example_index = example_index
        self.name = _sample_name(sample, example_index)
        if self.frame_times.ndim != 1 or self.frame_times.size == 0:
            raise ExampleError(self.name, "frame_times", f"expected a non-empty float[N], got shape "
                                                         f"{self.frame_times.shape}")
        self.question = self.required(sample, "question")
        _check_text(self.question, self.name, "question")
        self.question = self.question.strip()
        self.image_first = image_first_for(example_index, rng_seed, config)
        before, self.after_text = prompt_texts(self.question, self.image_first, config)
        bos = [tokenizer.bos_id] if (config.add_bos and tokenizer.bos_id is not None) else []
        self.before_ids = bos + tokenizer.encode(before)
        self.after_ids = tokenizer.encode(self.after_text)
        if tokenizer.token_id(ASSISTANT_TOKEN) not in self.after_ids:
            raise ExampleError(self.name, "question", "the prompt does not end with the <|assistant|> header "
                                                      "after tokenization")

    def required(self, obj: Any, name: str, where: str = "") -> Any:
        """A required field of the sample (or of a rejected entry); ExampleError when absent."""
        try:
            return _field(obj, name)
        except KeyError:
            raise ExampleError(self.name, where + name, "missing") from None

    # ------------------------------------------------------------------ prefix

    def prefix_fields(self) -> dict[str, np.ndarray]:
        n = self.frame_times.size
        prefix = np.asarray(self.before_ids + [self.config.image_token_id] * n + self.after_ids, np.int32)
        frame_positions = np.arange(len(self.before_ids), len(self.before_ids) + n, dtype=np.int32)
        question_events = list(_field(self.sample, "question_events", ()) or ())
        q_intervals, _ = _intervals(question_events, self.frame_times, self.name, "question_events")
        is_evi = prefix == self.tok.evi_id
        is_evi[frame_positions] = False  # a placeholder id equal to <evi> is not an evidence token
        q_positions = np.flatnonzero(is_evi).astype(np.int32)
        if q_positions.size != len(question_events):
            raise ExampleError(self.name, "question_events",
                               f"{len(question_events)} interval(s) for {q_positions.size} <evi> token(s) in the "
                               f"tokenized question")
        qformer_ids = np.asarray(self.qtok.encode(self.question), np.int32)
        return {
            "frame_valid": np.ones(n, bool),
            "frame_times": self.frame_times.copy(),
            "qformer_ids": qformer_ids,
            "qformer_valid": np.ones(qformer_ids.size, bool),
            "prefix_ids": prefix,
            "prefix_valid": np.ones(prefix.size, bool),
            "frame_positions": frame_positions,
            "question_evi_positions": q_positions,
            "question_evi_intervals": q_intervals,
            "question_evi_valid": np.ones(q_positions.size, bool),
        }

    @property
    def prefix_length(self) -> int:
        return len(self.before_ids) + self.frame_times.size + len(self.after_ids)

    # ------------------------------------------------------------------ response

    def branch(self, answer: Any, events: Any, where: str = "") -> _Branch:
        """Tokenizes ``response_text(answer) + <|end|>`` and locates its ``<evi>`` tokens.

        ``where`` prefixes the field names of errors (``""`` chosen, ``"rejected[c]."``)."""
        field = where + "answer"
        _check_text(answer, self.name, field)
        events = list(events or ())
        if answer.count(EVIDENCE_TOKEN) != len(events):
            raise ExampleError(self.name, where + "events", f"answer has {answer.count(EVIDENCE_TOKEN)} <evi> but "
                                                            f"{len(events)} event(s) are given")
        intervals, positions = _intervals(events, self.frame_times, self.name, where + "events")
        text = self.after_text + response_text(answer, len(events), self.config) + END_TOKEN
        joint = self.tok.encode(text)
        cut = len(self.after_ids)
        if joint[:cut] != self.after_ids:
            raise ExampleError(self.name, field, "tokenizing the response changed the prompt's tokens "
                                                 "(the tokenizer merges across <|assistant|>)")
        ids = np.asarray(joint[cut:], np.int32)
        if ids.size == 0 or ids[-1] != self.tok.end_id:
            raise ExampleError(self.name, field, "the response does not end with <|end|> after tokenization")
        if np.count_nonzero(ids == self.tok.end_id) != 1:
            raise ExampleError(self.name, field, "the answer contains <|end|>")
        evi_positions = np.flatnonzero(ids == self.tok.evi_id).astype(np.int32)
        closes = np.flatnonzero(ids == self.tok.evi_end_id)
        k = len(events)
        if evi_positions.size != 2 * k or closes.size != 1:
            raise ExampleError(self.name, field, f"expected {2 * k} <evi> and one </evi> in the tokenized response, "
                                                 f"got {evi_positions.size} and {closes.size}")
        stage = (evi_positions > closes[0]).astype(np.int32)
        if np.any(stage[:k] != 0) or np.any(stage[k:] != 1):
            raise ExampleError(self.name, field, "grounding-stage <evi> tokens are not all before </evi>")
        return _Branch(ids=ids, evi_positions=evi_positions,
                       evi_event=np.concatenate([np.arange(k), np.arange(k)]).astype(np.int32),
                       evi_stage=stage, event_intervals=intervals, event_positions=positions)

    def check_length(self, branch: _Branch, field: str) -> None:
        total = self.prefix_length + branch.ids.size
        if total > self.config.max_length:
            raise ExampleError(self.name, field, f"sequence too long: prefix {self.prefix_length} "
                                                 f"({self.frame_times.size} frames) + response {branch.ids.size} = "
                                                 f"{total} > max_length {self.config.max_length}")


def _response_fields(branch: _Branch) -> dict[str, np.ndarray]:
    r, m, k = branch.ids.size, branch.evi_positions.size, branch.event_intervals.shape[0]
    return {
        "response_ids": branch.ids,
        "response_valid": np.ones(r, bool),
        "response_loss_mask": np.ones(r, bool),
        "evi_positions": branch.evi_positions,
        "evi_event": branch.evi_event,
        "evi_stage": branch.evi_stage,
        "evi_valid": np.ones(m, bool),
        "event_intervals": branch.event_intervals.reshape(k, 2),
        "event_valid": np.ones(k, bool),
    }


# ---------------------------------------------------------------------------- public builders


def build_sft_example(sample: Any, *, frame_times: np.ndarray, tokenizer: TextTokenizer,
                      qformer_tokenizer: QFormerTokenizer, config: TemplateConfig = TemplateConfig(),
                      rng_seed: int = 0, example_index: int = 0) -> dict[str, np.ndarray]:
    """One SFT example: the unpadded per-example fields of :mod:`d2vlm_jax.batch`.

    Args:
      sample: a :class:`d2vlm_jax.data.schema.Sample` (or a dict with its fields).
      frame_times: float32[N], timestamp of each sampled frame (N = number of frames).
      tokenizer / qformer_tokenizer: the LLM and Q-Former tokenizers.
      config: template options (image placeholder id, max length, train/eval placement).
      rng_seed, example_index: make the ``<image>`` placement deterministic.

    Returns arrays without batch axis: ``frame_valid bool[N]``, ``frame_times float32[N]``,
    ``qformer_ids int32[L]``, ``prefix_ids int32[P]``, ``frame_positions int32[N]``,
    ``question_evi_* [Q]``, ``response_ids int32[R]``, ``evi_* int32[M]``,
    ``event_intervals int32[K, 2]`` with their validity masks, and ``example_id int64[]``.

    Raises :class:`ExampleError` (naming the sample and field) for over-long sequences and
    inconsistent annotations.
    """
    builder = _Builder(sample, frame_times=frame_times, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                       config=config, rng_seed=rng_seed, example_index=example_index)
    chosen = builder.branch(builder.required(sample, "answer"), _field(sample, "events", ()))
    builder.check_length(chosen, "answer")
    example = builder.prefix_fields()
    example.update(_response_fields(chosen))
    example["example_id"] = np.asarray(example_index, np.int64)
    return example


def build_prompt_example(sample: Any, *, frame_times: np.ndarray, tokenizer: TextTokenizer,
                         qformer_tokenizer: QFormerTokenizer, config: TemplateConfig = TemplateConfig(),
                         rng_seed: int = 0, example_index: int = 0) -> dict[str, np.ndarray]:
    """The prefix (prompt + frame slots) of an example, for inference on a bare question:
    exactly the prefix fields :func:`build_sft_example` produces for the same sample (no
    ``answer`` needed), plus ``example_id``. ``sample`` needs ``question`` (and optional
    ``question_events``); use ``TemplateConfig(train=False)`` as evaluation does."""
    builder = _Builder(sample, frame_times=frame_times, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                       config=config, rng_seed=rng_seed, example_index=example_index)
    if builder.prefix_length > config.max_length:
        raise ExampleError(builder.name, "question", f"prompt too long: {builder.prefix_length} tokens "
                                                     f"({builder.frame_times.size} frames) > max_length "
                                                     f"{config.max_length}")
    example = builder.prefix_fields()
    example["example_id"] = np.asarray(example_index, np.int64)
    return example


def conflict_masks(chosen: _Branch, rejected: _Branch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Conflict of a chosen/rejected pair (SPEC §4.1).

    Walk both responses together; ``d`` is the first index where the token ids differ, or
    where the ids are equal but the ``<evi>`` there has a different frame interval.

    * token difference at ``d``: conflict tokens = indices ``>= d``, conflict evidences =
      ``<evi>`` at index ``>= d``;
    * interval difference at ``d`` (temporal perturbation): conflict tokens = indices ``> d``
      (the token at ``d`` is predicted from identical inputs, later ones see the changed
      injected features), conflict evidences = ``<evi>`` at index ``>= d``.

    Returns ``(chosen_token bool[Rc], chosen_evi bool[Mc], rejected_token bool[Rr],
    rejected_evi bool[Mr], kind)`` with ``kind`` in ``{"token", "interval"}``; raises
    ``ValueError`` when the two responses are identical (no conflict).
    """
    c_iv, r_iv = chosen.evi_interval_at(), rejected.evi_interval_at()
    n = min(chosen.ids.size, rejected.ids.size)
    d, kind = None, None
    for i in range(n):
        if chosen.ids[i] != rejected.ids[i]:
            d, kind = i, "token"
            break
        if i in c_iv and c_iv[i] != r_iv.get(i):
            d, kind = i, "interval"
            break
    if d is None:
        if chosen.ids.size == rejected.ids.size:
            raise ValueError("the rejected response is identical to the chosen one (same tokens and intervals)")
        d, kind = n, "token"
    first_token = d if kind == "token" else d + 1

    def masks(branch: _Branch) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(branch.ids.size) >= first_token, branch.evi_positions >= d

    (ct, ce), (rt, re_) = masks(chosen), masks(rejected)
    return ct, ce, rt, re_, kind


def build_preference_example(sample: Any, rejected_list: Sequence[Any] | None = None, *, frame_times: np.ndarray,
                             tokenizer: TextTokenizer, qformer_tokenizer: QFormerTokenizer,
                             config: TemplateConfig = TemplateConfig(), rng_seed: int = 0,
                             example_index: int = 0) -> dict[str, np.ndarray]:
    """A preference example: the SFT fields of the chosen response + ``C`` rejected branches.

    ``rejected_list`` defaults to ``sample.rejected``; each item has ``answer`` and ``events``
    (``family``/``event_index`` are bookkeeping). Rejected arrays are padded within the example
    to the longest branch (``R_rej``, ``M_rej``, ``K_rej``; validity masks mark real entries):
    ``rejected_ids int32[C, R_rej]``, ``rejected_evi_* int32[C, M_rej]``,
    ``rejected_event_intervals int32[C, K_rej, 2]`` (and ``event_frame_positions
    float32[K, 2]`` / ``rejected_event_frame_positions float32[C, K_rej, 2]``: the events'
    unrounded fractional frame positions), ``rejected_valid_pair bool[C]``,
    ``conflict_token_mask bool[C, R]``, ``conflict_evi_mask bool[C, M]`` (chosen side, per
    branch), ``rejected_conflict_token_mask bool[C, R_rej]``,
    ``rejected_conflict_evi_mask bool[C, M_rej]``. The collate step pads ``R``/``R_rej`` (and
    ``M``, ``K``) to one common bucket.

    Raises :class:`ExampleError` for an empty list, a branch without conflict, an over-long
    branch (each branch with the prefix must fit ``max_length``) or bad annotations.
    """
    builder = _Builder(sample, frame_times=frame_times, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                       config=config, rng_seed=rng_seed, example_index=example_index)
    if rejected_list is None:
        rejected_list = _field(sample, "rejected", None)
    if not rejected_list:
        raise ExampleError(builder.name, "rejected", "a preference example needs at least one rejected response")
    chosen = builder.branch(builder.required(sample, "answer"), _field(sample, "events", ()))
    builder.check_length(chosen, "answer")
    branches, conflicts = [], []
    for c, rejected in enumerate(rejected_list):
        field = f"rejected[{c}]"
        branch = builder.branch(builder.required(rejected, "answer", field + "."),
                                builder.required(rejected, "events", field + "."), field + ".")
        builder.check_length(branch, field + ".answer")
        try:
            conflicts.append(conflict_masks(chosen, branch))
        except ValueError as e:
            raise ExampleError(builder.name, field, str(e)) from e
        branches.append(branch)

    num_branches = len(branches)
    r_rej = max(b.ids.size for b in branches)
    m_rej = max(b.evi_positions.size for b in branches)
    k_rej = max(b.event_intervals.shape[0] for b in branches)
    out = {
        "rejected_ids": np.zeros((num_branches, r_rej), np.int32),
        "rejected_valid": np.zeros((num_branches, r_rej), bool),
        "rejected_evi_positions": np.zeros((num_branches, m_rej), np.int32),
        "rejected_evi_event": np.zeros((num_branches, m_rej), np.int32),
        "rejected_evi_stage": np.zeros((num_branches, m_rej), np.int32),
        "rejected_evi_valid": np.zeros((num_branches, m_rej), bool),
        "rejected_event_intervals": np.zeros((num_branches, k_rej, 2), np.int32),
        "rejected_event_frame_positions": np.zeros((num_branches, k_rej, 2), np.float32),
        "rejected_event_valid": np.zeros((num_branches, k_rej), bool),
        "rejected_valid_pair": np.ones(num_branches, bool),
        "conflict_token_mask": np.zeros((num_branches, chosen.ids.size), bool),
        "conflict_evi_mask": np.zeros((num_branches, chosen.evi_positions.size), bool),
        "rejected_conflict_token_mask": np.zeros((num_branches, r_rej), bool),
        "rejected_conflict_evi_mask": np.zeros((num_branches, m_rej), bool),
    }
    for c, (branch, (ct, ce, rt, re_, _)) in enumerate(zip(branches, conflicts, strict=True)):
        r, m, k = branch.ids.size, branch.evi_positions.size, branch.event_intervals.shape[0]
        out["rejected_ids"][c, :r] = branch.ids
        out["rejected_valid"][c, :r] = True
        out["rejected_evi_positions"][c, :m] = branch.evi_positions
        out["rejected_evi_event"][c, :m] = branch.evi_event
        out["rejected_evi_stage"][c, :m] = branch.evi_stage
        out["rejected_evi_valid"][c, :m] = True
        out["rejected_event_intervals"][c, :k] = branch.event_intervals
        out["rejected_event_frame_positions"][c, :k] = branch.event_positions
        out["rejected_event_valid"][c, :k] = True
        out["conflict_token_mask"][c] = ct
        out["conflict_evi_mask"][c] = ce
        out["rejected_conflict_token_mask"][c, :r] = rt
        out["rejected_conflict_evi_mask"][c, :m] = re_

    example = builder.prefix_fields()
    example.update(_response_fields(chosen))
    example["event_frame_positions"] = chosen.event_positions.reshape(-1, 2)
    example.update(out)
    example["example_id"] = np.asarray(example_index, np.int64)
    return example
