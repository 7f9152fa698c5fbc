"""FLOPs of a compiled XLA program with every loop counted as often as it runs.

XLA's ``cost_analysis()`` counts a ``while`` body once. A step with scanned layers (one loop
body per layer stack), a micro-batch scan and a frame-chunk scan would be undercounted by
those trip counts. :func:`program_flops` reads the optimized HLO text of the compiled
program instead (``compiled.as_text()``): it counts the FLOPs of every instruction the way
XLA's cost analysis does (``2 x`` multiply-adds of ``dot``/``convolution``, one per element
of an elementwise arithmetic op or a reduction input, nothing for transcendentals and data
movement), descends into fusions and calls, and multiplies a ``while`` body by its trip
count, read from the loop condition (``counter < N`` with the counter starting at 0, the way
JAX lowers ``scan`` and ``fori_loop``). Custom calls contribute the FLOPs their backend
config declares (Pallas kernels' cost estimates), else nothing.

On a program without loops it agrees with XLA's own count (tested); the difference is
then only in ops XLA counts differently (e.g. ``convert``), far below 1 %.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator

# Elementwise ops XLA counts as one FLOP per output element (transcendentals are counted
# separately by XLA and not as FLOPs; data movement is free).
ELEMENTWISE = frozenset("""
add subtract multiply divide remainder maximum minimum negate abs sign compare select clamp and or xor not
floor ceil round-nearest-afz round-nearest-even atan2 power
""".split())
REDUCTIONS = frozenset(("reduce", "reduce-window", "select-and-scatter", "scatter"))

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\((?P<params>.*)\)\s*->\s*.*\{\s*$")
_SHAPE = re.compile(r"^(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


class HloParseError(ValueError):
    """The HLO text has a form this counter does not understand (the message says where)."""


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str        # the result type text (array or tuple)
    opcode: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class Computation:
    name: str
    params: dict[str, str]                    # parameter name -> type text
    instructions: dict[str, Instruction]
    root: str | None = None


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]`` (``(``, ``{`` or ``[``)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    i, stack = start, []
    while i < len(text):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    raise HloParseError(f"unbalanced brackets in {text[start:start + 120]!r}")


def _split_top(text: str) -> list[str]:
    """Splits on commas outside brackets."""
    out, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_instruction(line: str) -> Instruction | None:
    m = re.match(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    om = re.match(r"(?P<op>[\w\-]+)\(", rest)
    if not om:
        raise HloParseError(f"cannot read the opcode of {line.strip()[:160]!r}")
    close = _balanced(rest, om.end() - 1)
    operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[om.end():close - 1])]
    return Instruction(m.group("name"), shape, om.group("op"), operands, rest[close:])


def parse(hlo_text: str) -> tuple[dict[str, Computation], str]:
    """``(computations by name, name of the entry computation)``."""
    comps: dict[str, Computation] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if current is None:
            m = _HEADER.match(stripped)
            if m:
                params = {}
                for p in _split_top(m.group("params")):
                    if ":" in p:
                        pname, ptype = p.split(":", 1)
                        params[pname.strip().lstrip("%")] = ptype.strip()
                current = Computation(m.group("name"), params, {})
                if stripped.startswith("ENTRY"):
                    entry = current.name
            continue
        if stripped == "}":
            comps[current.name] = current
            current = None
            continue
        inst = _parse_instruction(stripped)
        if inst is not None:
            current.instructions[inst.name] = inst
            if stripped.startswith("ROOT"):
                current.root = inst.name
    if entry is None:
        raise HloParseError("no ENTRY computation in the HLO text")
    return comps, entry


def dims_of(shape: str) -> list[int] | None:
    """``f32[128,256]{1,0:T(8,128)}`` -> ``[128, 256]``; None for tuples / tokens."""
    m = _SHAPE.match(shape.strip())
    if not m:
        return None
    return [int(d) for d in m.group("dims").split(",") if d]


def _elements(shape: str) -> int:
    dims = dims_of(shape)
    return 0 if dims is None else math.prod(dims)


class FlopCounter:
    """Counts the FLOPs of an HLO module (see the module docstring)."""

    def __init__(self, hlo_text: str):
        self.comps, self.entry = parse(hlo_text)
        self._memo: dict[str, float] = {}
        self.loops: list[tuple[str, int]] = []   # (while instruction, trip count) as found

    def total(self) -> float:
        return self.computation(self.entry)

    def _shape_of(self, comp: Computation, name: str) -> str:
        if name in comp.instructions:
            return comp.instructions[name].shape
        if name in comp.params:
            return comp.params[name]
        raise HloParseError(f"{comp.name}: operand %{name} is neither an instruction nor a parameter")

    def computation(self, name: str) -> float:
        if name not in self._memo:
            comp = self.comps.get(name)
            if comp is None:
                raise HloParseError(f"called computation %{name} is not in the module")
            self._memo[name] = sum(self.instruction(comp, inst) for inst in comp.instructions.values())
        return self._memo[name]

    def instruction(self, comp: Computation, inst: Instruction) -> float:
        op = inst.opcode
        if op == "convolution":
            return self._convolution(comp, inst)
        if op == "dot":
            lhs = dims_of(self._shape_of(comp, inst.operands[0]))
            m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
            contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if (lhs and m) else 1
            return 2.0 * _elements(inst.shape) * contracted
        if op == "while":
            body = re.search(r"\bbody=%([\w.\-]+)", inst.attrs).group(1)
            cond = re.search(r"\bcondition=%([\w.\-]+)", inst.attrs).group(1)
            trips = self.trip_count(cond)
            self.loops.append((inst.name, trips))
            return trips * self.computation(body) + (trips + 1) * self.computation(cond)
        if op == "conditional":
            branches = []
            m = _BRANCHES.search(inst.attrs)
            if m:
                branches = [b.strip().lstrip("%") for b in m.group(1).split(",") if b.strip()]
            branches += _CALLS.findall(inst.attrs)
            return max((self.computation(b) for b in branches), default=0.0)
        if op in ("fusion", "call", "async-start", "custom-call"):
            flops = sum(self.computation(c) for c in re.findall(r"\bcalls=%([\w.\-]+)", inst.attrs))
            if op == "custom-call":
                declared = re.search(r'"flops"\s*:\s*"?(\d+)', inst.attrs)
                flops += float(declared.group(1)) if declared else 0.0
            return flops
        if op in ELEMENTWISE:
            return float(_elements(inst.shape))
        if op in REDUCTIONS and inst.operands:
            return float(_elements(self._shape_of(comp, inst.operands[0])))
        return 0.0

    def _convolution(self, comp: Computation, inst: Instruction) -> float:
        """``2 x`` the multiply-adds that touch real input elements (TPU writes batched
        matmuls as convolutions whose window runs over dilated, mostly empty, inputs)."""
        lhs = dims_of(self._shape_of(comp, inst.operands[0]))
        rhs = dims_of(self._shape_of(comp, inst.operands[1]))
        out = dims_of(inst.shape)
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
        if lhs is None or rhs is None or out is None or labels is None:
            raise HloParseError(f"{comp.name}: cannot size convolution %{inst.name}")
        lhs_l, rhs_l, out_l = labels.groups()
        window = _window(inst.attrs)
        macs = float(rhs[rhs_l.index("i")])                      # input features per group
        for label, size in zip(out_l, out):
            if not label.isdigit():                              # batch and output features
                macs *= size
        for d in range(sum(c.isdigit() for c in out_l)):
            w = window[d] if d < len(window) else {}
            macs *= _valid_taps(lhs[lhs_l.index(str(d))], rhs[rhs_l.index(str(d))], out[out_l.index(str(d))],
                                w.get("stride", 1), w.get("pad", (0, 0))[0], w.get("lhs_dilate", 1),
                                w.get("rhs_dilate", 1))
        return 2.0 * macs

    def trip_count(self, cond_name: str) -> int:
        """``N`` of a loop condition ``counter < N`` (the counter starts at 0): a ``compare``
        with ``direction=LT`` against a constant, in the condition itself or in a fusion it
        calls (the constant then passed in as an operand)."""
        cond = self.comps.get(cond_name)
        if cond is not None:
            for inst in cond.instructions.values():
                if self._is_less_than(inst):
                    value = self._constant(cond, inst.operands[1])
                    if value is not None:
                        return value
                for callee in re.findall(r"\bcalls=%([\w.\-]+)", inst.attrs):
                    inner = self.comps.get(callee)
                    for c in (inner.instructions.values() if inner else ()):
                        if not self._is_less_than(c):
                            continue
                        value = self._constant(inner, c.operands[1])
                        index = self._parameter_index(inner, c.operands[1])
                        if value is None and index is not None and index < len(inst.operands):
                            value = self._constant(cond, inst.operands[index])
                        if value is not None:
                            return value
        raise HloParseError(f"loop condition %{cond_name}: no 'counter < constant' compare found")

    @staticmethod
    def _is_less_than(inst: Instruction) -> bool:
        return inst.opcode == "compare" and "direction=LT" in inst.attrs and len(inst.operands) == 2

    @staticmethod
    def _constant(comp: Computation, name: str) -> int | None:
        inst = comp.instructions.get(name)
        if inst is None or inst.opcode != "constant" or not inst.operands:
            return None
        m = re.fullmatch(r"\s*(-?\d+)\s*", inst.operands[0])
        return int(m.group(1)) if m else None

    @staticmethod
    def _parameter_index(comp: Computation, name: str) -> int | None:
        inst = comp.instructions.get(name)
        if inst is not None and inst.opcode == "parameter" and inst.operands and inst.operands[0].isdigit():
            return int(inst.operands[0])
        return None

    def _reachable(self, name: str) -> Iterator[str]:
        seen, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n in seen or n not in self.comps:
                continue
            seen.add(n)
            yield n
            for inst in self.comps[n].instructions.values():
                todo += _CALLS.findall(inst.attrs)


def _window(attrs: str) -> list[dict]:
    """``window={size=16x4 stride=15x3 pad=0_0x1_2 lhs_dilate=16x4}`` -> one dict per spatial dim."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    if not m:
        return []
    dims: list[dict] = []
    for field in m.group(1).split():
        key, value = field.split("=", 1)
        for d, part in enumerate(value.split("x")):
            while len(dims) <= d:
                dims.append({})
            dims[d][key] = tuple(int(v) for v in part.split("_")) if key == "pad" else int(part)
    return dims


def _valid_taps(size: int, kernel: int, out: int, stride: int, pad_low: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """Number of (output position, kernel position) pairs of one spatial dimension that read a
    real input element (not padding, not a hole of the input dilation)."""
    last = (size - 1) * lhs_dilate                              # last real position (dilated input)
    total = 0
    for k in range(kernel):
        c = k * rhs_dilate - pad_low                            # position = stride * o + c
        lo = (-c + stride - 1) // stride if c < 0 else 0          # first o with position >= 0
        hi = min(out - 1, (last - c) // stride) if last >= c else -1
        if hi < lo:
            continue
        if lhs_dilate == 1:
            total += hi - lo + 1
            continue
        step = lhs_dilate // math.gcd(stride, lhs_dilate)
        first = next((o for o in range(lo, lo + step) if (stride * o + c) % lhs_dilate == 0), None)
        if first is not None and first <= hi:
            total += (hi - first) // step + 1
    return total


def program_flops(hlo_text: str) -> tuple[float, list[tuple[str, int]]]:
    """(FLOPs of the whole program, per device for a partitioned program; the loops found
    with their trip counts)."""
    counter = FlopCounter(hlo_text)
    return counter.total(), counter.loops
