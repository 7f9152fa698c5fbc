"""The training objective: forward + SFT losses (+ FPO), one function for both stages."""

from __future__ import annotations

from typing import Mapping

import jax

from d2vlm_jax import losses
from d2vlm_jax.models import lora as lora_lib
from d2vlm_jax.models.d2vlm import D2VLM, forward

STAGES = ("sft", "fpo")


def loss_and_metrics(model: D2VLM, params: Mapping, batch: Mapping[str, jax.Array], loss_cfg: losses.LossConfig,
                     *, stage: str = "sft", reference_params: Mapping | None = None,
                     deterministic: bool = True, rngs: dict | None = None,
                     normalizers: Mapping[str, jax.Array] | None = None):
    """Scalar loss and metrics of one batch.

    SFT: ``L_lm + L_gnd + L_cons``. FPO: the same on the chosen branch plus
    ``fpo_weight * mean L_FPO`` over the packed rejected branches; the reference is none
    (authors), the same params with LoRA disabled, or ``reference_params`` (frozen SFT).
    ``normalizers``: denominators of the whole batch when ``batch`` is one micro-batch of it.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    fpo = stage == "fpo"
    out = forward(model, {"params": params}, batch, with_rejected=fpo, deterministic=deterministic, rngs=rngs)
    norm = losses.normalizers(batch) if normalizers is None else normalizers
    loss, metrics = losses.sft_losses(out, batch, loss_cfg, norm)
    if fpo:
        policy = losses.factorized_logps(out, batch, loss_cfg.alpha, loss_cfg.fpo_grounding_targets)
        reference = None
        if loss_cfg.fpo_reference != "none":
            if loss_cfg.fpo_reference == "lora_disabled":
                ref_params = lora_lib.disable_lora(params)
            else:
                if reference_params is None:
                    raise ValueError("loss.fpo_reference='frozen_params' needs reference_params")
                ref_params = reference_params
            ref_out = forward(model, {"params": jax.lax.stop_gradient(ref_params)}, batch, with_rejected=True)
            reference = losses.factorized_logps(ref_out, batch, loss_cfg.alpha, loss_cfg.fpo_grounding_targets)
        fpo_loss, fpo_metrics = losses.fpo_loss(
            policy, reference, batch["rejected_valid_pair"], loss_cfg.fpo_beta,
            pair_weights=losses.fpo_pair_weights(batch["rejected_valid_pair"], loss_cfg, norm))
        loss = loss + loss_cfg.fpo_weight * fpo_loss
        metrics.update(fpo_metrics)
    metrics["loss/total"] = loss
    return loss, metrics
