"""Full-size D²VLM FPO stage (SPEC §4, §7): starts from the SFT export, β = 0.1,
1 pair per device with 8 accumulation steps, reference-free (authors) by default.

    python launch/train.py --config configs/d2vlm_phi3_fpo.py --workdir DIR \
        --config.init_checkpoint=SFT_WORKDIR/sft/export/params \
        --config.fpo.data.train_annotations=prefs.json  (launch/make_preferences.py) ...
"""

import ml_collections

from configs import common
from configs.d2vlm_phi3_sft import get_config as sft_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = sft_config(arg)
    c.stages = ("fpo",)
    c.loss.fpo_beta = 0.1
    c.loss.fpo_reference = "none"   # "lora_disabled" | "frozen_params" for the DPO form with a reference
    c.fpo = ml_collections.ConfigDict(dict(steps=0, epochs=1, batch_size=64, micro_batches=8,
                                           optim=common.optim(lr=2e-5, lora_lr=5e-5, warmup_ratio=0.03),
                                           data=dict(train_annotations="")))
    return c
