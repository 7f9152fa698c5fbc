"""Reading safetensors checkpoints and mapping their tensors onto Flax parameter trees.

Only safetensors is read: nothing is ever unpickled. A checkpoint is a directory (one or
more ``*.safetensors`` files, optionally with a ``*.safetensors.index.json``) or a single
file. Tensors are read lazily, one at a time.

A *mapping* is a list of :class:`Rule` (flax path, source key, transform). The same table
serves import (source -> flax) and export (flax -> source), so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the key(s) and shapes."""


def _to_numpy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor)


class SafetensorsReader(Mapping[str, np.ndarray]):
    """Lazy ``key -> np.ndarray`` view over one file or a directory of safetensors files."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open  # local import: optional at module import time

        path = os.fspath(path)
        if path.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(
                f"{path}: pickled checkpoints are never loaded (they can run code). Convert it "
                "once with PyTorch: `from safetensors.torch import save_file; "
                "save_file(torch.load(p, map_location='cpu', weights_only=True), 'model.safetensors')`")
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            pickled = sorted(f for s in PICKLE_SUFFIXES for f in glob.glob(os.path.join(path, "*" + s)))
            if not files:
                hint = f" (found pickled files {pickled}; convert them to safetensors)" if pickled else ""
                raise CheckpointError(f"{path}: no *.safetensors files{hint}")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise CheckpointError(f"{path}: no such checkpoint file or directory")
        self.path = path
        self._handles = {f: safe_open(f, framework="numpy") for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for key in h.keys():
                if key in self._where:
                    raise CheckpointError(f"{path}: key {key!r} appears in both {self._where[key]} and {f}")
                self._where[key] = f

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(key)
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``params[flax_path] = to_flax(source[source_key])`` and back with ``to_source``."""
    flax_path: tuple[str, ...]
    source_key: str
    to_flax: Callable[[np.ndarray], np.ndarray] = identity
    to_source: Callable[[np.ndarray], np.ndarray] = identity


def linear_rules(flax_prefix: tuple[str, ...], source_prefix: str, bias: bool) -> list[Rule]:
    """A torch ``nn.Linear`` (``weight [out, in]``) onto a flax Dense (``kernel [in, out]``)."""
    rules = [Rule(flax_prefix + ("kernel",), f"{source_prefix}.weight", transpose, transpose)]
    if bias:
        rules.append(Rule(flax_prefix + ("bias",), f"{source_prefix}.bias"))
    return rules


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    node = tree
    for p in path:
        node = node[p]
    return node


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def load_with_rules(source: Mapping[str, np.ndarray], rules: Iterable[Rule], target_shapes: Mapping,
                    *, dtype: Any = np.float32, place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
                    ignore_unused: Callable[[str], bool] = lambda key: False) -> tuple[dict, list[str]]:
    """Builds a param tree from ``source`` following ``rules``, one tensor at a time.

    Args:
      source: key -> array (e.g. a :class:`SafetensorsReader`).
      rules: the mapping table.
      target_shapes: the model's (abstract) param tree; every leaf must be covered by a rule.
      place: optional ``(flax_path, array) -> array`` (e.g. ``jax.device_put`` with the
        leaf's sharding) applied to each converted tensor as it is produced.
      ignore_unused: keys the caller knows are not part of the model (listed, not errors).
    Returns:
      (params, ignored_keys). Raises :class:`CheckpointError` naming every missing key,
      unexpected key and shape mismatch (key, checkpoint shape, model shape).
    """
    rules = list(rules)
    targets = flatten(target_shapes)
    problems, params, used = [], {}, set()
    covered = {r.flax_path for r in rules}
    for path in targets:
        if path not in covered:
            problems.append(f"model parameter {'/'.join(path)} has no rule in the mapping")
    for rule in rules:
        if rule.flax_path not in targets:
            problems.append(f"mapping rule targets unknown model parameter {'/'.join(rule.flax_path)}")
            continue
        want = tuple(targets[rule.flax_path].shape)
        if rule.source_key not in source:
            problems.append(f"missing key {rule.source_key!r} (model {'/'.join(rule.flax_path)}, shape {want})")
            continue
        used.add(rule.source_key)
        value = rule.to_flax(_to_numpy(source[rule.source_key]))
        if tuple(value.shape) != want:
            problems.append(f"shape mismatch for {rule.source_key!r}: checkpoint {tuple(value.shape)} "
                            f"(after conversion) vs model {'/'.join(rule.flax_path)} {want}")
            continue
        value = value.astype(dtype)
        _set(params, rule.flax_path, place(rule.flax_path, value) if place else value)
    unused = sorted(k for k in source if k not in used)
    unexpected = [k for k in unused if not ignore_unused(k)]
    problems += [f"unexpected key {k!r} shape {tuple(np.shape(source[k]))} (not used by the model)"
                 for k in unexpected]
    if problems:
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return params, [k for k in unused if ignore_unused(k)]


def export_with_rules(params: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
    """The reverse of :func:`load_with_rules`: source-key -> array."""
    return {r.source_key: np.ascontiguousarray(r.to_source(np.asarray(_get(params, r.flax_path))))
            for r in rules}


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
