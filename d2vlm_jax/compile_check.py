"""Deviceless compile check: the real train step compiled for a Cloud TPU topology on a CPU host.

``check(config, topology="v5p:2x2x1", stage="sft")`` builds exactly what
``train.loop.train_stage`` jits, through the same ``train.loop.build_train_step`` (model,
optimizer, micro-batches, remat policy, parameter and optimizer-state shardings from
``jax.eval_shape``, donation of the state) on a mesh of
*compile-only* TPU devices (``jax.experimental.topologies.get_topology_desc``), lowers it with
abstract inputs (``jax.ShapeDtypeStruct`` carrying ``NamedSharding``; the batch at the config's
largest buckets, as ``shape_policy="max"`` pads every multi-host batch) and compiles it with
libtpu. Nothing is allocated: a full-size plan is checked in minutes on a laptop.

The report (:class:`CompileReport`) gives per-chip memory from ``compiled.memory_analysis()``
(arguments, temporaries, outputs, aliased = donated bytes, the peak of live bytes, total vs the
chip's HBM: the larger of the parts' sum and the peak, as libtpu's temporaries can miss some), FLOPs per
step counted from the compiled program's HLO with every loop's trip count
(``d2vlm_jax.hlo_cost``: hardware FLOPs, remat recomputation included; XLA's own
``cost_analysis()`` counts a loop body once, which scanned layers, micro-batches and frame
chunks would undercount), the model FLOPs of the same program without rematerialization
(``lowered.cost_analysis()`` of the remat-free, loop-free program lowered for the host CPU,
not compiled), the roofline step time ``FLOPs / (chips x peak)``, the MFU implied by an
assumed hardware utilization, and the host cost of the compile: wall and CPU time and the peak
resident memory of this process while it lowered and compiled (``VmHWM``, reset before each
plan where Linux allows). An out-of-memory plan (XLA's RESOURCE_EXHAUSTED, or a total above
HBM) is reported with its shortfall.

Needs the ``tpu`` extra (``pip install 'jax[tpu]==0.10.2'``, libtpu); :class:`NoLibtpuError`
says so when it is missing. Set ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (several checks at once) and
``TPU_LOG_DIR`` (libtpu's log files) before JAX starts; :func:`set_libtpu_env` does it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import ml_collections

from d2vlm_jax import batch as batch_lib
from d2vlm_jax import config as cfg_lib
from d2vlm_jax import hlo_cost, sharding
from d2vlm_jax.models.d2vlm import D2VLMConfig
from d2vlm_jax.testing import random_batch

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation: HBM and peak dense bf16 FLOP/s per chip (public Cloud TPU figures)."""
    name: str
    hbm_bytes: int
    peak_bf16_flops: float


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GIB, 275e12),
    "v5e": ChipSpec("v5e", 16 * GIB, 197e12),
    "v5p": ChipSpec("v5p", 95 * GIB, 459e12),
    "v6e": ChipSpec("v6e", 32 * GIB, 918e12),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


class NoLibtpuError(RuntimeError):
    """libtpu (the ``tpu`` extra) is not installed, so TPU programs cannot be compiled here."""


class CompileCheckError(ValueError):
    """A bad topology / plan request (the message names the argument)."""


def set_libtpu_env(log_dir: str | None = None) -> None:
    """Environment libtpu needs for compile-only use on a host without TPUs (call before JAX
    initializes a backend): several libtpu users at once, logs in ``log_dir``, and no probing
    of the (absent) TPU metadata server."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_LOG_DIR", log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "tpu_logs"))
    os.makedirs(os.environ["TPU_LOG_DIR"], exist_ok=True)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's probe for pod workers


def chip_of(topology: str) -> ChipSpec:
    """``"v5p:2x2x1"`` -> the v5p :class:`ChipSpec`."""
    gen = topology.split(":", 1)[0].strip().lower()
    gen = _ALIASES.get(gen, gen)
    if gen not in CHIPS:
        raise CompileCheckError(f"--topology {topology!r}: unknown TPU generation {gen!r}; known {sorted(CHIPS)}")
    return CHIPS[gen]


def chips_in(topology: str) -> int:
    """Chips of one slice from the topology name (``"v5e:4x4"`` -> 16)."""
    try:
        dims = [int(d) for d in topology.split(":", 1)[1].lower().split("x")]
    except (IndexError, ValueError):
        raise CompileCheckError(f"--topology {topology!r}: expected '<generation>:<AxB[xC]>', e.g. 'v5p:2x2x1'")
    return math.prod(dims)


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices of ``num_slices`` slices of ``topology``.

    Raises:
      NoLibtpuError: libtpu is not installed (or cannot start) on this host.
    """
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise NoLibtpuError(
            "the TPU compile check needs libtpu, which is not installed in this environment: "
            "install the project's tpu extra (pip install -e '.[tpu]' or pip install 'jax[tpu]==0.10.2')") from e
    from jax.experimental import topologies
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - libtpu reports bad names as generic runtime errors
        raise CompileCheckError(f"--topology {topology!r} (num_slices={num_slices}) is not a topology libtpu "
                                f"knows: {e}") from e


def topology_mesh(mesh_sizes: Mapping[str, int], devices: Sequence[Any], num_slices: int = 1) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` mesh over the topology's devices. With several slices the
    ``data`` axis spans the slices (DCN) and ``fsdp``/``tensor`` stay inside one slice (ICI)."""
    sizes = sharding.resolve_mesh_shape(dict(mesh_sizes), len(devices))
    if num_slices == 1:
        return sharding.make_mesh(sizes, devices=devices)
    if sizes["data"] % num_slices:
        raise CompileCheckError(f"mesh {sizes}: with {num_slices} slices the data axis must be a multiple of "
                                f"{num_slices} (it spans the slices)")
    from jax.experimental import mesh_utils
    ici = [sizes["data"] // num_slices, sizes["fsdp"], sizes["tensor"]]
    arr = mesh_utils.create_hybrid_device_mesh(ici, [num_slices, 1, 1], devices=devices)
    return jax.sharding.Mesh(arr, sharding.MESH_AXES)


# ------------------------------------------------------------------------------ plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """One point of the search space."""
    mesh: tuple[int, int, int]   # (data, fsdp, tensor)
    remat_policy: str
    micro_batches: int
    batch_size: int

    def label(self) -> str:
        d, f, t = self.mesh
        return f"mesh d{d}/f{f}/t{t} remat={self.remat_policy} micro={self.micro_batches} batch={self.batch_size}"


@dataclasses.dataclass
class CompileReport:
    """Figures of one compiled plan, per chip unless named otherwise."""
    topology: str
    num_slices: int
    stage: str
    plan: Plan
    batch_shapes: dict[str, tuple[int, ...]]
    chip: ChipSpec
    num_devices: int
    num_chips: int
    compile_seconds: float = 0.0           # host wall time of lowering + compiling the step
    compile_cpu_seconds: float = 0.0       # host CPU time (all threads) of the same: robust to load
    host_peak_rss_bytes: int = 0           # peak resident memory of this process during it
    host_peak_rss_scope: str = "compile"   # "compile" (high-water mark reset first) or "process"
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0                    # most bytes live at once (arguments, temporaries,
                                           # outputs; donated buffers once), libtpu's heap simulation
    flops_per_device: float = 0.0          # compiled (partitioned) step, from its HLO: every loop
                                           # body counted as often as it runs (hlo_cost)
    xla_flops_per_device: float = 0.0      # XLA's cost_analysis() of the same program (loop bodies once)
    loop_trip_counts: list[int] = dataclasses.field(default_factory=list)  # the loops counted
    model_flops: float | None = None       # whole step, remat-free program, host-lowered cost analysis
    error: str | None = None               # compile failure (e.g. RESOURCE_EXHAUSTED)
    oom: bool = False
    largest_buffers: list[str] = dataclasses.field(default_factory=list)  # XLA OOM: top of libtpu's report

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes * self.num_chips // self.num_devices

    @property
    def parts_bytes(self) -> int:
        """arguments + outputs + temporaries - donated (aliased) + code."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes + self.code_bytes

    @property
    def total_bytes(self) -> int:
        """HBM the step needs: the larger of :attr:`parts_bytes` and peak live bytes + code.

        libtpu's ``temp_size_in_bytes`` can leave out temporaries that its ``peak_memory_in_bytes``
        counts (measured: 0 temporaries for a program whose peak holds 8 MiB of intermediates
        beyond its arguments and outputs; see docs/TPU.md), so neither figure alone bounds it."""
        return max(self.parts_bytes, self.peak_bytes + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.error is None and not self.oom and self.total_bytes <= self.hbm_per_device

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.total_bytes - self.hbm_per_device)

    @property
    def step_flops(self) -> float:
        """Hardware FLOPs of one step over all devices."""
        return self.flops_per_device * self.num_devices

    @property
    def roofline_seconds(self) -> float:
        """Step time at 100 % of peak bf16 FLOP/s on every chip."""
        return self.step_flops / (self.num_chips * self.chip.peak_bf16_flops)

    def step_seconds(self, utilization: float) -> float:
        return self.roofline_seconds / utilization

    def mfu(self, utilization: float) -> float | None:
        """MFU implied when the hardware runs at ``utilization`` of peak: model FLOPs (no
        recomputation) per second over the peak. ``None`` without model FLOPs."""
        if not self.model_flops or not self.step_flops:
            return None
        return utilization * self.model_flops / self.step_flops

    def format(self, utilization: float = 0.4) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        lines = [f"topology {self.topology}" + (f" x {self.num_slices} slices" if self.num_slices > 1 else "")
                 + f": {self.num_chips} chips, {self.num_devices} devices ({self.chip.name}, "
                 f"{g(self.hbm_per_device)} HBM per device, {self.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip)",
                 f"stage {self.stage}; {self.plan.label()}",
                 "batch " + ", ".join(f"{k}{list(v)}" for k, v in self.batch_shapes.items()
                                      if k in ("frames", "prefix_ids", "response_ids", "rejected_ids"))]
        host = (f"{self.compile_seconds:.1f} s ({self.compile_cpu_seconds:.1f} s of CPU), host peak RSS {self.host_peak_rss_bytes / 1e9:.2f} GB"
                + ("" if self.host_peak_rss_scope == "compile" else " (whole process so far)"))
        if self.error is not None:
            lines.append(f"compile stopped after {host}")
            lines.append(("OUT OF MEMORY (XLA): " if self.oom else "COMPILE FAILED: ") + self.error)
            if self.largest_buffers:
                lines.append("largest live buffers per device (libtpu's report; shapes are per-device shards):")
                lines += ["  " + b for b in self.largest_buffers]
            return "\n".join(lines)
        lines += [f"compiled in {host}",
                  f"memory per device: arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)}, "
                  f"temporaries {g(self.temp_bytes)}, aliased (donated) {g(self.alias_bytes)}, code {g(self.code_bytes)}; "
                  f"peak live {g(self.peak_bytes)}",
                  f"total {g(self.total_bytes)} of {g(self.hbm_per_device)} HBM "
                  f"({100 * self.total_bytes / self.hbm_per_device:.0f}%)"
                  + ("" if self.fits else f" -> DOES NOT FIT, short by {g(self.shortfall_bytes)}"),
                  f"FLOPs per step: {self.step_flops:.4g} (hardware, {self.flops_per_device:.4g} per device, "
                  f"{len(self.loop_trip_counts)} loops counted by trip count)"
                  + (f"; model (no remat) {self.model_flops:.4g}" if self.model_flops else ""),
                  f"roofline step time {self.roofline_seconds * 1e3:.3g} ms at 100% of peak; "
                  f"{self.step_seconds(utilization) * 1e3:.3g} ms at {100 * utilization:.0f}% hardware utilization"
                  + (f" = {100 * self.mfu(utilization):.1f}% MFU" if self.mfu(utilization) is not None else "")]
        return "\n".join(lines)


def batch_shapes(config: ml_collections.ConfigDict, model_cfg: D2VLMConfig, stage: str,
                 batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch at the config's largest buckets (``shape_policy="max"``).

    Shapes follow :func:`d2vlm_jax.testing.random_batch` (the batch contract), e.g.
    ``frames uint8[B, N, S, S, 3]``, ``prefix_ids int32[B, P]``, ``rejected_ids int32[B, C, R]``.
    """
    from d2vlm_jax.data import pipeline
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    for k, v in config[stage].get("data", ml_collections.ConfigDict()).items():
        data_cfg[k] = v
    buckets = pipeline.buckets_from_config(data_cfg)
    top = {k: max(v) for k, v in buckets.items()}
    example = random_batch(model_cfg, seed=0, batch=1, frames=top["N"], qformer_len=top["L"], prefix=top["P"],
                           response=top["R"], evidence=top["M"], events=top["K"], question_evidence=top["Q"],
                           rejected=top["C"] if stage == "fpo" else 0)
    keys = batch_lib.FPO_KEYS if stage == "fpo" else batch_lib.SFT_KEYS
    return {k: jax.ShapeDtypeStruct((batch_size,) + example[k].shape[1:], example[k].dtype) for k in keys}


def _with_plan(config: ml_collections.ConfigDict, stage: str, plan: Plan) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.mesh = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, plan.mesh)))
    c.model.llm.remat_policy = plan.remat_policy
    c[stage].micro_batches = plan.micro_batches
    c[stage].batch_size = plan.batch_size
    return c


def plan_of(config: ml_collections.ConfigDict, stage: str, num_devices: int) -> Plan:
    sizes = sharding.resolve_mesh_shape(config.mesh.to_dict(), num_devices)
    return Plan(mesh=tuple(sizes[a] for a in sharding.MESH_AXES), remat_policy=config.model.llm.remat_policy,
                micro_batches=int(config[stage].micro_batches), batch_size=int(config[stage].batch_size))


def _lower(config: ml_collections.ConfigDict, stage: str, mesh: jax.sharding.Mesh | None, model_cfg: D2VLMConfig,
           batch_abstract: Mapping[str, jax.ShapeDtypeStruct]):
    """Lowers the train step exactly as ``loop.train_stage`` jits it (both use
    ``loop.build_train_step``: shardings, donation). ``mesh=None``: one host CPU device, for the
    cost analysis of the program as written (model FLOPs)."""
    from d2vlm_jax.train import loop
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices("cpu")[:1])
    # the schedule length only changes constants of the program, not its shape or cost
    setup = loop.build_train_step(config, stage, model_cfg, mesh, total_steps=1000)
    with_reference = stage == "fpo" and cfg_lib.loss_config(config).fpo_reference == "frozen_params"
    with jax.set_mesh(mesh):
        return setup.jit(with_reference).lower(*setup.abstract_arguments(batch_abstract, with_reference))


def largest_buffers(since: float, top: int = 12, log_dir: str | None = None) -> list[str]:
    """The first ``top`` rows of the memory usage report libtpu writes to its log
    (``$TPU_LOG_DIR/tpu_driver.*.ERROR.*.<pid>``) when a compile runs out of HBM: cumulative
    size, buffer size and the shapes sharing it, largest first. Only this process's log files
    written after ``since`` (a ``time.time()``) are read; ``[]`` when there is none."""
    log_dir = log_dir or os.environ.get("TPU_LOG_DIR", "")
    if not log_dir or not os.path.isdir(log_dir):
        return []
    paths = [os.path.join(log_dir, n) for n in os.listdir(log_dir)
             if n.startswith("tpu_driver") and ".ERROR." in n and n.endswith(f".{os.getpid()}")]
    for path in sorted((p for p in paths if os.path.getmtime(p) >= since), key=os.path.getmtime, reverse=True):
        with open(path, errors="replace") as f:
            text = f.read()
        start = text.rfind("Memory usage report")
        if start < 0:
            continue
        rows = [line.strip() for line in text[start:].splitlines()
                if re.match(r"\s*[\d.]+[KMGT]?i?B\(\s*\d+%\);", line)]
        return rows[:top]
    return []


def _is_oom(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or re.search(r"\bout of memory\b|exceeds the .*memory", message, re.I) is not None


def check(config: ml_collections.ConfigDict, *, topology: str, stage: str = "sft", num_slices: int = 1,
          plan: Plan | None = None, devices: Sequence[Any] | None = None, model_flops: bool = True,
          hlo_path: str | None = None) -> CompileReport:
    """Compiles the train step of ``config`` (or of ``plan`` applied to it) for ``topology``.

    Args:
      config: an experiment config (``configs/*.py``); ``model.llm.vocab_size`` and
        ``model.video.qformer.vocab_size`` must be set (> 0), as they are for full-size configs.
      topology: Cloud TPU topology name, e.g. ``"v5p:2x2x1"``, ``"v5e:4x4"``.
      stage: ``"sft"`` or ``"fpo"``.
      num_slices: slices joined over DCN (multi-slice); the data axis spans them.
      plan: mesh / remat / micro-batches / batch size to use instead of the config's.
      devices: the topology's devices (reuse across many checks).
      model_flops: also lower (not compile) the remat-free program for model FLOPs / MFU.
      hlo_path: write the compiled program's optimized HLO text here (what the FLOPs are
        counted from; ``d2vlm_jax.hlo_cost.program_flops`` reads it back).

    Returns:
      A :class:`CompileReport`; a compile failure (out of memory or otherwise) is recorded in
      ``error`` rather than raised.
    """
    if stage not in ("sft", "fpo"):
        raise CompileCheckError(f"--stage must be 'sft' or 'fpo', got {stage!r}")
    if stage not in config:
        raise CompileCheckError(f"the config has no {stage!r} section")
    chip = chip_of(topology)
    devices = list(devices) if devices is not None else topology_devices(topology, num_slices)
    plan = plan or plan_of(config, stage, len(devices))
    config = _with_plan(config, stage, plan)
    for field, value in (("model.llm.vocab_size", config.model.llm.vocab_size),
                         ("model.video.qformer.vocab_size", config.model.video.qformer.vocab_size)):
        if not value:
            raise CompileCheckError(f"config.{field} is 0 (taken from the tokenizer at training time); set it, "
                                    f"e.g. --config.{field}=32064")
    stage_cfg = config[stage]
    try:
        mesh_sizes = cfg_lib.check_mesh_and_batch(config, len(devices), 1, stage_cfg.batch_size,
                                                  stage_cfg.micro_batches, f"config.{stage}")
    except cfg_lib.ConfigError as e:
        raise CompileCheckError(str(e)) from e
    model_cfg = cfg_lib.model_config(config)
    mesh = topology_mesh(mesh_sizes, devices, num_slices)
    batch_abs = batch_shapes(config, model_cfg, stage, stage_cfg.batch_size)
    report = CompileReport(topology=topology, num_slices=num_slices, stage=stage, plan=plan,
                           batch_shapes={k: tuple(v.shape) for k, v in batch_abs.items()}, chip=chip,
                           num_devices=len(devices), num_chips=chips_in(topology) * num_slices)
    rss_scope = "compile" if reset_peak_rss() else "process"
    t0, cpu0 = time.time(), _cpu_seconds()
    try:
        compiled = _lower(config, stage, mesh, model_cfg, batch_abs).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError / XlaRuntimeError
        message = str(e)
        report.error = message.strip().splitlines()[0][:600] if message.strip() else type(e).__name__
        report.oom = _is_oom(message)
        if report.oom:
            report.largest_buffers = largest_buffers(since=t0)
        report.compile_seconds, report.compile_cpu_seconds = time.time() - t0, _cpu_seconds() - cpu0
        report.host_peak_rss_bytes, report.host_peak_rss_scope = peak_rss_bytes(), rss_scope
        return report
    report.compile_seconds, report.compile_cpu_seconds = time.time() - t0, _cpu_seconds() - cpu0
    report.host_peak_rss_bytes, report.host_peak_rss_scope = peak_rss_bytes(), rss_scope
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    report.peak_bytes = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    report.oom = report.total_bytes > report.hbm_per_device
    # Every loop (micro-batches, scanned layer stacks, frame chunks) counted as often as it
    # runs, from the compiled HLO; XLA's own figure counts each loop body once.
    report.xla_flops_per_device = float(_cost(compiled).get("flops", 0.0))
    hlo_text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo_text)
    report.flops_per_device, loops = hlo_cost.program_flops(hlo_text)
    report.loop_trip_counts = [n for _, n in loops]
    if model_flops:
        report.model_flops = _model_flops(config, stage, plan, batch_abs)
    return report


def _model_flops(config: ml_collections.ConfigDict, stage: str, plan: Plan,
                 batch_abs: Mapping[str, jax.ShapeDtypeStruct]) -> float | None:
    """FLOPs of the step as written: the program without remat, without loops (layers
    unrolled, one frame chunk; the micro-batch scan counted ``micro_batches`` times) and with
    the XLA attention (kernels change how, not what, is computed), lowered for the host CPU
    (libtpu's compile-only client has no cost model for unoptimized HLO)."""
    no_remat = _with_plan(config, stage, dataclasses.replace(plan, remat_policy="none"))
    no_remat.model.video.vision.frame_chunks = 1
    if "scan_layers" in no_remat.model:
        no_remat.model.scan_layers = False
    for part in (no_remat.model.llm, no_remat.model.video.vision, no_remat.model.video.qformer):
        if "scan_layers" in part:
            part.scan_layers = False
    if "attention_impl" in no_remat.model.llm:
        no_remat.model.llm.attention_impl = "xla"
    try:
        lowered = _lower(no_remat, stage, None, cfg_lib.model_config(no_remat), batch_abs)
        return float(_cost(lowered).get("flops", 0.0)) * plan.micro_batches or None
    except Exception:  # noqa: BLE001 - model FLOPs are an extra; the report stands without them
        return None


def model_flops_of(config: ml_collections.ConfigDict, stage: str, plan: Plan) -> float | None:
    """Model FLOPs (:func:`_model_flops`) of ``plan`` applied to ``config``, e.g. for the rows of
    a sweep that fit (they are compiled without)."""
    config = _with_plan(config, stage, plan)
    model_cfg = cfg_lib.model_config(config)
    return _model_flops(config, stage, plan, batch_shapes(config, model_cfg, stage, plan.batch_size))


def _cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss() -> bool:
    """Resets this process's resident-memory high-water mark (``VmHWM``; Linux >= 4.0, by
    writing 5 to ``/proc/self/clear_refs``). False where that is not possible: the peak read
    afterwards is then the whole process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: ``VmHWM`` of ``/proc/self/status``, else
    ``getrusage``'s ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cost(obj) -> dict:
    cost = obj.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


# ------------------------------------------------------------------------------ sweep


def mesh_candidates(num_devices: int, tensor_sizes: Iterable[int] = (1, 2, 4)) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) splits of the devices: tensor from ``tensor_sizes``; the rest
    either all fsdp, all data, or (when square-ish) both."""
    out = []
    for t in tensor_sizes:
        if num_devices % t:
            continue
        rest = num_devices // t
        for d in sorted({1, rest} | {d for d in (2, 4) if rest % d == 0 and d < rest}):
            out.append((d, rest // d, t))
    return list(dict.fromkeys(out))


def sweep_plans(config: ml_collections.ConfigDict, stage: str, num_devices: int, *,
                meshes: Sequence[tuple[int, int, int]] | None = None, remat_policies: Sequence[str] = REMAT_POLICIES,
                micro_batches: Sequence[int] | None = None, batch_size: int | None = None,
                batch_sizes: Sequence[int] | None = None) -> list[Plan]:
    """The valid plans of a sweep: every (batch rows per step, mesh, remat, micro-batches)
    whose micro-batch is divisible by ``data * fsdp``. ``batch_sizes`` (default: the config's,
    or ``batch_size``) are the rows per step; micro-batch counts default to 1, 2, 4, 8 that
    divide each and the config's own."""
    batches = list(batch_sizes or [int(batch_size or config[stage].batch_size)])
    meshes = meshes or mesh_candidates(num_devices)
    plans = []
    for batch in batches:
        micros = micro_batches or sorted({m for m in (1, 2, 4, 8) if batch % m == 0}
                                         | {int(config[stage].micro_batches)})
        for mesh, remat, micro in itertools.product(meshes, remat_policies, micros):
            if math.prod(mesh) != num_devices or batch % micro or (batch // micro) % (mesh[0] * mesh[1]):
                continue
            plans.append(Plan(mesh=tuple(mesh), remat_policy=remat, micro_batches=micro, batch_size=batch))
    return plans


def format_table(reports: Sequence[CompileReport], utilization: float = 0.4) -> str:
    """One row per plan: memory per device, fit, FLOPs, step time, MFU and the host cost of
    the compile (wall time, peak RSS)."""
    util = str(int(100 * utilization)) + "%"
    head = f"{'mesh d/f/t':>11} {'remat':>33} {'micro':>5} {'batch':>5} {'GiB/dev':>8} {'fits':>5} " \
           f"{'TFLOP/step':>10} {'roofline ms':>11} {'ms@' + util:>9} {'MFU@' + util:>8} {'compile s':>9} " \
           f"{'cpu s':>7} {'RSS GB':>6}"
    rows = [head, "-" * len(head)]
    for r in reports:
        p = r.plan
        mesh = "/".join(str(x) for x in p.mesh)
        if r.error is not None:
            status = "OOM" if r.oom else "error"
            rows.append(f"{mesh:>11} {p.remat_policy:>33} {p.micro_batches:>5} {p.batch_size:>5} {'-':>8} {status:>5}  "
                        f"{r.error[:70]}")
            continue
        mfu = r.mfu(utilization)
        rows.append(f"{mesh:>11} {p.remat_policy:>33} {p.micro_batches:>5} {p.batch_size:>5} "
                    f"{r.total_bytes / GIB:8.2f} {'yes' if r.fits else 'NO':>5} {r.step_flops / 1e12:10.2f} "
                    f"{r.roofline_seconds * 1e3:11.1f} {r.step_seconds(utilization) * 1e3:9.1f} "
                    f"{(f'{100 * mfu:.1f}%' if mfu is not None else '-'):>8} {r.compile_seconds:9.1f} "
                    f"{r.compile_cpu_seconds:7.1f} {r.host_peak_rss_bytes / 1e9:6.2f}")
    return "\n".join(rows)
