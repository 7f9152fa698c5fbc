"""Progress of a training run and of an evaluation pass, for people.

On a terminal a live ``tqdm`` bar per stage (and per evaluation pass); otherwise (a log
file, CI, a pipe) one plain line per logging interval. Either way a line says the stage's
step, the metrics, the rates, the stage's ETA and the ETA of the whole run: the stages still
to come are estimated from the current stage's measured speed, weighted by how many
sequences a step of each stage processes (:func:`step_cost`: an FPO step runs the chosen
and the rejected response, twice an SFT step of the same batch) until they run and are
measured themselves. Only process 0 reports.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Mapping, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_METRICS = (("loss/total", "loss"), ("loss/lm", "lm"), ("loss/gnd", "gnd"), ("loss/cons", "cons"),
            ("loss/fpo", "fpo"), ("rewards/accuracy", "rew_acc"), ("grounding/accuracy", "gnd_acc"),
            ("lr/base", "lr"))


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_cost(stage: str, batch_size: int) -> float:
    """Sequences one step of ``stage`` runs through the model (the ETA's unit of work)."""
    return float(batch_size) * (2.0 if stage == "fpo" else 1.0)


def _live(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class RunProgress:
    """Progress over every stage of a run.

    Args:
      plan: ``{stage: (steps still to run, cost of one step)}`` in run order (finished
        stages left out; :func:`step_cost`).
      enabled: False on processes other than 0.
      stream: where lines go (stdout); a terminal gets live bars.
    """

    def __init__(self, plan: Mapping[str, tuple[int, float]], enabled: bool = True, stream: TextIO | None = None):
        self.plan = dict(plan)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.live = enabled and _live(self.stream)
        self.stage: str | None = None
        self.total = 0
        self.step = 0
        self.seconds_per_cost: float | None = None
        self._bar: Any = None
        self._redirect: Any = None

    # -- stages
    def start_stage(self, stage: str, start: int, total: int) -> None:
        self.stage, self.total, self.step = stage, total, start
        steps, cost = self.plan.get(stage, (total - start, 1.0))
        self.plan[stage] = (total - start, cost)
        if self.live:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=total, initial=start, desc=f"[{stage}]", unit="step", file=self.stream,
                             dynamic_ncols=True, leave=True, smoothing=0.1)

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.stage is not None:
            self.plan.pop(self.stage, None)
        self.stage = None

    def remaining_run_seconds(self, step: int, steps_per_s: float) -> tuple[float, float]:
        """(this stage, the whole run) seconds left at ``steps_per_s`` for this stage."""
        if steps_per_s <= 0:
            return math.inf, math.inf
        _, cost = self.plan.get(self.stage, (0, 1.0))
        this = (self.total - step) / steps_per_s
        self.seconds_per_cost = 1.0 / (steps_per_s * max(cost, 1e-9))
        later = sum(n * c for s, (n, c) in self.plan.items() if s != self.stage) * self.seconds_per_cost
        return this, this + later

    def update(self, step: int, metrics: Mapping[str, float], rates: Mapping[str, float]) -> None:
        """After ``step`` (1-based) with the interval's mean ``metrics`` and ``rates``
        (``steps``/``tokens``/``frames`` per second)."""
        if not self.enabled:
            return
        stage_eta, run_eta = self.remaining_run_seconds(step, rates["steps"])
        parts = " ".join(f"{short} {metrics[k]:.4g}" for k, short in _METRICS if k in metrics)
        later = len(self.plan) > 1
        eta = f"ETA {format_seconds(stage_eta)}" + (f", all stages ~{format_seconds(run_eta)}" if later else "")
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix_str(f"{parts} | {rates['tokens']:.0f} tok/s" + (
                f" | all stages ~{format_seconds(run_eta)}" if later else ""), refresh=True)
        else:
            print(f"[{self.stage}] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) {parts} | "
                  f"{rates['steps']:.2f} step/s {rates['tokens']:.0f} tok/s {rates['frames']:.0f} frm/s | {eta}",
                  file=self.stream, flush=True)
        self.step = step

    def note(self, text: str) -> None:
        """A line between progress updates (an evaluation result, a resume)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


class PassProgress:
    """Progress of one evaluation pass, as ``progress(batches_done, batches_total)``: the
    first batch (compilation) is left out of the rate."""

    def __init__(self, label: str = "[eval]", enabled: bool = True, stream: TextIO | None = None):
        self.label, self.enabled = label, enabled
        self.stream = stream if stream is not None else sys.stdout
        self.live = enabled and _live(self.stream)
        self.start = time.time()
        self.first_batch_s: float | None = None
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        if done == 1:
            self.first_batch_s = elapsed
        per_batch = (elapsed - self.first_batch_s) / (done - 1) if done > 1 else elapsed
        if self.live:
            if self._bar is None:
                self._bar = tqdm(total=total, desc=self.label, unit="batch", file=self.stream, dynamic_ncols=True)
            self._bar.update(done - self._bar.n)
            if done >= total:
                self.close()
            return
        eta = (f"ETA {format_seconds(per_batch * (total - done))}" if done > 1 or done == total
               else "ETA ? (the first batch includes compilation)")
        print(f"{self.label} batch {done}/{total} ({100 * done / max(total, 1):.0f}%) {per_batch:.2f} s/batch "
              f"| elapsed {format_seconds(elapsed)} {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
