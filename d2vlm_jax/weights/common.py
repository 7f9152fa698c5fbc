"""Reading/writing safetensors checkpoints and mapping their tensors onto Flax parameter trees.

Only safetensors is read: nothing is ever unpickled. A checkpoint is a directory (one or
more ``*.safetensors`` files, optionally with a ``*.safetensors.index.json``) or a single
file. Tensors are read lazily, one at a time, straight from the file into one numpy buffer
(no memory map, no second copy), so reading a checkpoint needs about one tensor of memory.
Every safetensors dtype is supported, BF16 and FP8 included (as ``ml_dtypes`` numpy dtypes).

A *mapping* is a list of :class:`Rule` (flax path, source key, transform). The same table
serves import (source -> flax) and export (flax -> source), so the two cannot drift.

Rule tables name layers unrolled (``layers_{i}``, as checkpoints do). A model with scanned
layers passes its layer stacks (``stacks``, see ``d2vlm_jax.models.stacking``): layer ``i``'s
tensor is then read into / written from index ``i`` of the stacked parameter, filled in
place, so loading still holds about one stacked tensor besides the output.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from d2vlm_jax.models.stacking import LayerStack, scanned_location

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype tag <-> numpy dtype (little-endian on disk).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_TAG_OF_DTYPE = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_MAX_HEADER_BYTES = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the key(s) and shapes."""


def _to_numpy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int   # absolute byte offset in the file
    end: int


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses a safetensors header: ``({key: TensorInfo}, metadata)``. Validates dtypes and
    byte ranges, naming the file and key of anything malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON: {e}") from e
    metadata = header.pop("__metadata__", None) or {}
    data_start, out = 8 + n, {}
    for key, entry in header.items():
        tag = entry.get("dtype")
        if tag not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {tag!r}")
        dtype, shape = SAFETENSORS_DTYPES[tag], tuple(int(s) for s in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or data_start + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ({tag} {shape}) has bad byte range [{begin}, {end})")
        out[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    return out, metadata


class SafetensorsReader(Mapping[str, np.ndarray]):
    """Lazy ``key -> np.ndarray`` view over one file or a directory of safetensors files.

    ``reader[key]`` reads that one tensor from disk into a fresh numpy array (BF16 as
    ``ml_dtypes.bfloat16``); :meth:`shape` and :meth:`dtype` answer from the header alone.
    A directory with a ``*.safetensors.index.json`` reads the files its ``weight_map`` names
    (and checks that every key sits where the index says).
    """

    def __init__(self, path: str | os.PathLike):
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
        self.files = files
        self.metadata: dict[str, dict[str, str]] = {}
        self._info: dict[str, TensorInfo] = {}
        for f in files:
            infos, self.metadata[f] = read_safetensors_header(f)
            for key, info in infos.items():
                if key in self._info:
                    raise CheckpointError(f"{path}: key {key!r} appears in both {self._info[key].file} and {f}")
                self._info[key] = info
        if os.path.isdir(path):
            self._check_index()

    def _check_index(self) -> None:
        for index in glob.glob(os.path.join(self.path, "*.safetensors.index.json")):
            weight_map = read_json(index).get("weight_map", {})
            missing = sorted(k for k in weight_map if k not in self._info)
            if missing:
                raise CheckpointError(f"{index}: {len(missing)} key(s) of the index are in no shard, "
                                      f"e.g. {missing[:3]}")
            moved = [k for k, f in weight_map.items() if os.path.basename(self._info[k].file) != f]
            if moved:
                raise CheckpointError(f"{index}: key {moved[0]!r} is in {self._info[moved[0]].file}, "
                                      f"the index says {weight_map[moved[0]]}")

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._info[key].dtype

    def __getitem__(self, key: str) -> np.ndarray:
        info = self._info[key]  # KeyError for unknown keys
        out = np.empty(info.shape, info.dtype)
        with open(info.file, "rb") as f:
            f.seek(info.begin)
            view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
            got = f.readinto(view) if out.size else 0
        if got != info.end - info.begin:
            raise CheckpointError(f"{info.file}: tensor {key!r} is truncated ({got} of {info.end - info.begin} bytes)")
        return out

    def __contains__(self, key: object) -> bool:
        return key in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)


def source_shape(source: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """Shape of ``source[key]``, from the header when the source can tell without reading."""
    shape = getattr(source, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(np.shape(source[key]))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes ``tensors`` (any dtype of :data:`SAFETENSORS_DTYPES`, BF16 included) as one
    safetensors file, tensor by tensor (no concatenated copy). Returns the bytes written."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, arrays = 0, []
    for key in sorted(tensors):
        a = np.asarray(tensors[key])
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        tag = _TAG_OF_DTYPE.get(np.dtype(dtype))
        if tag is None:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {a.dtype} that safetensors cannot store")
        a = np.ascontiguousarray(a, dtype)
        header[key] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            if a.size:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
    return 8 + len(blob) + offset


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


def get_param(params: Mapping, path: tuple[str, ...], stacks: Iterable[LayerStack] = ()) -> Any:
    """The parameter a rule's (unrolled) ``path`` names; with scanned ``stacks`` the layer's
    slice of the stacked parameter."""
    where, index = scanned_location(path, stacks)
    value = _get(params, where)
    return value if index is None else value[index]


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


def _is_numeric_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype in (np.dtype(ml_dtypes.bfloat16),
                                                         np.dtype(ml_dtypes.float8_e4m3fn),
                                                         np.dtype(ml_dtypes.float8_e5m2))


def load_with_rules(source: Mapping[str, np.ndarray], rules: Iterable[Rule], target_shapes: Mapping,
                    *, dtype: Any = np.float32, place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
                    ignore_unused: Callable[[str], bool] = lambda key: False,
                    stacks: Iterable[LayerStack] = ()) -> tuple[dict, list[str]]:
    """Builds a param tree from ``source`` following ``rules``, one tensor at a time.

    Each tensor is read, converted, cast and (optionally) placed before the next is read,
    so besides the output tree only about one tensor is held at a time (with scanned layers:
    one stacked tensor, filled layer by layer and placed when complete).

    Args:
      source: key -> array (e.g. a :class:`SafetensorsReader`).
      rules: the mapping table (unrolled layer paths).
      target_shapes: the model's (abstract) param tree; every leaf must be covered by a rule.
      dtype: dtype of the output leaves (float checkpoints only: an integer/bool tensor where
        the model wants floats is reported as a dtype mismatch).
      place: optional ``(flax_path, array) -> array`` (e.g. ``jax.device_put`` with the
        leaf's sharding, see :func:`sharded_placer`) applied to each finished leaf, with the
        leaf's path in ``target_shapes``.
      ignore_unused: keys the caller knows are not part of the model (listed, not errors).
        Evaluated after all rules ran.
      stacks: the layer stacks of ``target_shapes`` (``config.layer_stacks``); scanned ones
        take rule ``.../layers_{i}/...`` at index ``i`` of ``.../layers/...``.
    Returns:
      (params, ignored_keys). A leaf that needed no conversion or cast may share memory with
      the array the source returned (a :class:`SafetensorsReader` returns fresh arrays).
      Raises :class:`CheckpointError` naming every missing key,
      unexpected key, dtype mismatch and shape mismatch (key, checkpoint shape as stored,
      shape after conversion, model path and shape).
    """
    rules, stacks = list(rules), tuple(stacks)
    targets = flatten(target_shapes)
    problems, params, used = [], {}, set()
    located = [(rule, *scanned_location(rule.flax_path, stacks)) for rule in rules]
    covered: dict[tuple[str, ...], set] = {}
    for _, where, index in located:
        covered.setdefault(where, set()).add(index)
    for path, leaf in targets.items():
        if path not in covered:
            problems.append(f"model parameter {'/'.join(path)} has no rule in the mapping")
        elif None not in covered[path] and covered[path] != set(range(leaf.shape[0])):
            lacking = sorted(set(range(leaf.shape[0])) - covered[path])
            problems.append(f"model parameter {'/'.join(path)} (stacked layers) has no rule for layers {lacking[:8]}")
    pending: dict[tuple[str, ...], tuple[np.ndarray, set]] = {}  # stacked leaves being filled
    for rule, where, index in located:
        name = "/".join(rule.flax_path)
        if where not in targets:
            problems.append(f"mapping rule targets unknown model parameter {name}")
            continue
        want = tuple(targets[where].shape)
        if index is not None:
            want = want[1:]
        if rule.source_key not in source:
            problems.append(f"missing key {rule.source_key!r} (model {name}, shape {want})")
            continue
        used.add(rule.source_key)
        raw = _to_numpy(source[rule.source_key])
        raw_shape, raw_dtype = tuple(raw.shape), raw.dtype
        if not _is_numeric_float(raw_dtype):
            problems.append(f"dtype mismatch for {rule.source_key!r}: checkpoint {raw_dtype} {raw_shape} vs model "
                            f"{name} floating {want}")
            continue
        value = rule.to_flax(raw)
        del raw
        if tuple(value.shape) != want:
            problems.append(f"shape mismatch for {rule.source_key!r}: checkpoint {raw_shape} as stored, "
                            f"{tuple(value.shape)} after conversion vs model {name} {want}")
            continue
        value = value.astype(dtype, copy=False)
        if index is not None:
            if where not in pending:
                pending[where] = (np.empty(tuple(targets[where].shape), value.dtype), set())
            buffer, filled = pending[where]
            buffer[index] = value
            filled.add(index)
            del value
            if len(filled) < buffer.shape[0]:
                continue
            value = pending.pop(where)[0]
        _set(params, where, place(where, value) if place else value)
        del value
    unused = sorted(k for k in source if k not in used)
    unexpected = [k for k in unused if not ignore_unused(k)]
    problems += [f"unexpected key {k!r} shape {source_shape(source, k)} (not used by the model)"
                 for k in unexpected]
    if problems:
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return params, [k for k in unused if ignore_unused(k)]


def sharded_placer(shardings: Mapping) -> Callable[[tuple[str, ...], np.ndarray], Any]:
    """A ``place`` callback for :func:`load_with_rules`: puts each converted host array
    straight onto the devices with its leaf's sharding (a tree like the params, e.g. from
    ``d2vlm_jax.sharding.shardings_for``). Each process transfers only its own shards
    (``jax.make_array_from_callback``), so no device ever holds a full replica first."""
    import jax

    flat = flatten(shardings)

    def place(path: tuple[str, ...], value: np.ndarray):
        sharding = flat[path]
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return place


def export_with_rules(params: Mapping, rules: Iterable[Rule], stacks: Iterable[LayerStack] = ()
                      ) -> dict[str, np.ndarray]:
    """The reverse of :func:`load_with_rules`: source-key -> array (``stacks``: the params'
    layer stacks, as for loading)."""
    stacks = tuple(stacks)
    return {r.source_key: np.ascontiguousarray(r.to_source(np.asarray(get_param(params, r.flax_path, stacks))))
            for r in rules}


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
