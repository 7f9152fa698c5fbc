"""The batch format: the one contract between the data pipeline and the model.

The data layer (``d2vlm_jax.data``) turns one annotation into an *example* (a dict of
numpy arrays of natural length), pads examples to bucketed static sizes and stacks them
into a *batch* (same keys, a leading batch axis, every array padded). The model
(``d2vlm_jax.models.d2vlm``), the losses and inference read batches only.

Layout of one sequence (SPEC §2, §3.2, §4.2)::

    slots  [0, P)             prefix  = prompt text with N frame slots inside it
    slots  [P, P + R)         chosen response (SFT: the response)
    slots  [P + R, P + 2R)..  rejected response(s) (FPO only), one block of R each

``P`` and ``R`` are the padded sizes (buckets). Frame tokens are *spliced* into the prefix
at ``frame_positions``: the prefix holds a placeholder id there (``image_token_id``), the
model overwrites those embeddings with the frame tokens. Position ids are computed by the
model from validity (``cumsum(valid) - 1``), restarting at the number of valid prefix
tokens for every response branch.

Next-token convention: ``response_ids[t]`` is predicted by the hidden state of the
previous slot (the last valid prefix token for ``t = 0``). An evidence token ``<evi>`` at
response index ``t`` has its *evidence query* at the previous slot too (SPEC §1.5).

Fields (B = batch, N = padded frames, L = padded Q-Former text, P = padded prefix,
R = padded response, M = padded evidence tokens per response, K = padded events,
Q = padded question-side evidence tokens, C = rejected branches per pair):

Video / encoder
  frames               uint8[B, N, H, W, 3]  RGB, resized + center-cropped, NOT normalized
                                              (the model applies CLIP normalization on device)
  frame_valid          bool[B, N]
  qformer_ids          int32[B, L]           Q-Former WordPiece ids of the question
  qformer_valid        bool[B, L]

Prefix
  prefix_ids           int32[B, P]           placeholder id at frame slots
  prefix_valid         bool[B, P]
  frame_positions      int32[B, N]           prefix slot of frame n (padded frames: 0, and
                                              frame_valid is False)
  question_evi_positions  int32[B, Q]        prefix slots of question-side <evi> tokens
  question_evi_intervals  int32[B, Q, 2]     [first, last] frame index, inclusive
  question_evi_valid      bool[B, Q]

Response (chosen)
  response_ids         int32[B, R]           grounding stage, answer, final <|end|>
  response_valid       bool[B, R]
  response_loss_mask   bool[B, R]            tokens supervised by L_lm (all valid response
                                              tokens in SFT)
  evi_positions        int32[B, M]           response indices of <evi> tokens, in order
  evi_event            int32[B, M]           event index (into event_intervals) of each
  evi_stage            int32[B, M]           0 = grounding stage, 1 = answer stage
  evi_valid            bool[B, M]
  event_intervals      int32[B, K, 2]        [first, last] frame index, inclusive, of event k
  event_valid          bool[B, K]

FPO only (rejected branches, C per pair; same meaning as the chosen fields)
  rejected_ids            int32[B, C, R]
  rejected_valid          bool[B, C, R]
  rejected_evi_positions  int32[B, C, M]
  rejected_evi_event      int32[B, C, M]
  rejected_evi_stage      int32[B, C, M]
  rejected_evi_valid      bool[B, C, M]
  rejected_event_intervals int32[B, C, K, 2]
  rejected_event_valid    bool[B, C, K]
  rejected_valid_pair     bool[B, C]          False for padding branches
  event_frame_positions   float32[B, K, 2]    the chosen events' [start, end] as fractional
                                              frame positions (seconds mapped through
                                              frame_times, not rounded): the targets of the
                                              FPO grounding log-likelihood with
                                              loss.fpo_grounding_targets="seconds"
  rejected_event_frame_positions float32[B, C, K, 2]  the same for the rejected events
  conflict_token_mask     bool[B, C, R]       chosen response tokens inside the conflict
                                              with rejected branch c
  conflict_evi_mask       bool[B, C, M]       chosen evidence queries inside that conflict
  rejected_conflict_token_mask bool[B, C, R]
  rejected_conflict_evi_mask   bool[B, C, M]

Bookkeeping (host side only, never fed to the jitted step)
  example_id           int64[B]              index of the source annotation (-1 = padding row)
  frame_times          float32[B, N]         timestamp in seconds of each sampled frame
"""

from __future__ import annotations

SFT_KEYS = (
    "frames", "frame_valid", "qformer_ids", "qformer_valid",
    "prefix_ids", "prefix_valid", "frame_positions",
    "question_evi_positions", "question_evi_intervals", "question_evi_valid",
    "response_ids", "response_valid", "response_loss_mask",
    "evi_positions", "evi_event", "evi_stage", "evi_valid",
    "event_intervals", "event_valid",
)

FPO_KEYS = SFT_KEYS + (
    "rejected_ids", "rejected_valid",
    "rejected_evi_positions", "rejected_evi_event", "rejected_evi_stage", "rejected_evi_valid",
    "rejected_event_intervals", "rejected_event_valid", "rejected_valid_pair",
    "conflict_token_mask", "conflict_evi_mask",
    "rejected_conflict_token_mask", "rejected_conflict_evi_mask",
    "event_frame_positions", "rejected_event_frame_positions",
)

HOST_KEYS = ("example_id", "frame_times")
