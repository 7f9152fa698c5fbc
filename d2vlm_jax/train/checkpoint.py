"""Orbax checkpointing of the train state together with the Grain data iterator.

Layout of a stage directory::

    <stage_dir>/checkpoints/<step>/state      step, trainable params, optimizer state, RNG
    <stage_dir>/checkpoints/<step>/data_iter  the Grain iterator position (per process)
    <stage_dir>/frozen/                        frozen params, written once (they never change)
    <stage_dir>/export/params                  merged params for inference (end of stage)

Saves are atomic (Orbax writes to a temporary directory and renames) and asynchronous; a
run killed at any moment resumes from the newest complete checkpoint, with the data stream
continuing exactly where it stopped.

Layer layouts: a checkpoint holds its layers unrolled (``layers_{i}``) or scanned (one
stacked ``layers`` subtree), whichever the model that wrote it used. Every restore here
takes the model's layer stacks (``config.layer_stacks``), reads which layout the checkpoint
has from its metadata (which keys exist), restores in that layout and converts
(``d2vlm_jax.models.stacking``): older unrolled checkpoints load into a scanned model and
back, train states (optimizer moments included) as well as params.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import grain
import jax
import orbax.checkpoint as ocp

from d2vlm_jax.models import stacking
from d2vlm_jax.models.stacking import LayerStack


def manager(stage_dir: str, *, max_to_keep: int, save_every: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(stage_dir, "checkpoints")), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def stored_tree(metadata: Any) -> Any:
    """The tree of ``ArrayMetadata`` (shape, dtype) inside an Orbax metadata object."""
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def _in_stored_layout(abstract: Any, stored: Any, stacks: tuple[LayerStack, ...]) -> tuple[Any, bool]:
    """(``abstract`` converted to the layout of the ``stored`` metadata tree, whether it differs)."""
    stored_stacks = stacking.layout_of(stored, stacks)
    target_stacks = stacking.layout_of(abstract, stacks)
    if stored_stacks == target_stacks:
        return abstract, False
    return stacking.to_layout(abstract, stored_stacks), True


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None, step: int | None = None,
            stacks: Iterable[LayerStack] = ()):
    """Restores ``(state, step)`` (the iterator is restored in place). ``abstract_state``
    carries the target shardings (``jax.ShapeDtypeStruct`` with ``sharding``); ``stacks``
    (the model's layer stacks) convert a checkpoint written in the other layer layout."""
    step = mngr.latest_step() if step is None else step
    stacks = tuple(stacks)
    target, converted = abstract_state, False
    if stacks:
        target, converted = _in_stored_layout(abstract_state, stored_tree(mngr.item_metadata(step)["state"]), stacks)
    args = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    state = restored["state"]
    return (stacking.to_layout(state, stacks) if converted else state), step


def save_params(path: str, params: Any) -> None:
    """Writes a params pytree (synchronously) with Orbax's standard checkpointer."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)


def load_params(path: str, abstract: Any | None = None, stacks: Iterable[LayerStack] = ()) -> Any:
    """Reads a params pytree; ``abstract`` (ShapeDtypeStructs with shardings) places it.

    ``stacks`` (the model's layer stacks, ``config.layer_stacks``): the result has the layer
    layout they ask for, whichever layout the checkpoint was written in.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params checkpoint at {path}")
    stacks = tuple(stacks)
    with ocp.StandardCheckpointer() as ckptr:
        if abstract is None:
            params = ckptr.restore(path)
            return stacking.to_layout(params, stacks) if stacks else params
        target, converted = abstract, False
        if stacks:
            target, converted = _in_stored_layout(abstract, stored_tree(ckptr.metadata(path)), stacks)
        params = ckptr.restore(path, target)
    return stacking.to_layout(params, stacks) if converted else params


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
