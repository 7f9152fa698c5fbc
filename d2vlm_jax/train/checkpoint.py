"""Orbax checkpointing of the train state together with the Grain data iterator.

Layout of a stage directory::

    <stage_dir>/checkpoints/<step>/state      step, trainable params, optimizer state, RNG
    <stage_dir>/checkpoints/<step>/data_iter  the Grain iterator position (per process)
    <stage_dir>/frozen/                        frozen params, written once (they never change)
    <stage_dir>/export/params                  merged params for inference (end of stage)

Saves are atomic (Orbax writes to a temporary directory and renames) and asynchronous; a
run killed at any moment resumes from the newest complete checkpoint, with the data stream
continuing exactly where it stopped.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def manager(stage_dir: str, *, max_to_keep: int, save_every: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(stage_dir, "checkpoints")), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None, step: int | None = None):
    """Restores ``(state, step)`` (the iterator is restored in place). ``abstract_state``
    carries the target shardings (``jax.ShapeDtypeStruct`` with ``sharding``)."""
    step = mngr.latest_step() if step is None else step
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], step


def save_params(path: str, params: Any) -> None:
    """Writes a params pytree (synchronously) with Orbax's standard checkpointer."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)


def load_params(path: str, abstract: Any | None = None) -> Any:
    """Reads a params pytree; ``abstract`` (ShapeDtypeStructs with shardings) places it."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if abstract is None:
            return ckptr.restore(path)
        return ckptr.restore(path, abstract)


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
