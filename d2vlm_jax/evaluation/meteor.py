"""METEOR 1.5 through the user's own ``meteor-1.5.jar`` (the coco-caption scorer's protocol).

The jar is not part of this project (it is not ours to ship; ``pip install pycocoevalcap``
brings one, under ``pycocoevalcap/meteor/``, with the ``data/paraphrase-en.gz`` it needs
beside it). Without a jar, METEOR and every metric built on it are reported as unavailable,
never guessed.

:class:`MeteorScorer` runs ``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`` once
and speaks its line protocol exactly as coco-caption's ``Meteor.compute_score`` does: one
``SCORE ||| ref_1 ||| ... ||| ref_n ||| hypothesis`` line per item (items in sorted key
order, ``|||`` removed from the hypothesis and double spaces made single), which the jar
answers with a statistics line; then one ``EVAL ||| stats_1 ||| ... ||| stats_n`` line,
answered by one score line per item and the corpus score (METEOR's corpus score comes from
the summed statistics, it is not the mean of the item scores).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Mapping, Sequence

import numpy as np


class MeteorUnavailable(RuntimeError):
    """No METEOR jar was given, or it cannot be started."""


class MeteorScorer:
    """A running METEOR 1.5 process (close it with :meth:`close` or use ``with``)."""

    def __init__(self, jar_path: str, java: str = "java", max_heap: str = "2G"):
        if not jar_path or not os.path.isfile(jar_path):
            raise MeteorUnavailable(f"METEOR jar not found: {jar_path!r}")
        command = [java, "-jar", f"-Xmx{max_heap}", jar_path, "-", "-", "-stdio", "-l", "en",
                   "-norm"]
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, cwd=os.path.dirname(
                                                 os.path.abspath(jar_path)))
        except OSError as error:
            raise MeteorUnavailable(f"cannot start {' '.join(command)}: {error}") from error
        self._lock = threading.Lock()
        self.jar_path = jar_path

    def _ask(self, line: str) -> str:
        self._process.stdin.write((line + "\n").encode("utf-8"))
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        if not answer:
            raise MeteorUnavailable(f"METEOR ({self.jar_path}) closed its output")
        return answer.decode("utf-8")

    def compute_score(self, references: Mapping[str, Sequence[str]],
                      hypotheses: Mapping[str, Sequence[str]]) -> tuple[float, np.ndarray]:
        """Corpus METEOR and per-item scores (items in sorted key order).

        Args:
          references: key -> list of reference strings.
          hypotheses: key -> one-element list holding the hypothesis string.
        """
        if sorted(references) != sorted(hypotheses):
            raise ValueError("METEOR: references and hypotheses must have the same keys")
        keys = sorted(references)
        with self._lock:
            stats = []
            for key in keys:
                if len(hypotheses[key]) != 1:
                    raise ValueError(f"METEOR: item {key!r} needs exactly one hypothesis")
                hypothesis = hypotheses[key][0].replace("|||", "").replace("  ", " ")
                line = " ||| ".join(("SCORE", " ||| ".join(references[key]), hypothesis))
                stats.append(self._ask(line).strip())
            first = self._ask("EVAL ||| " + " ||| ".join(stats))
            lines = [first] + [self._process.stdout.readline().decode("utf-8") for _ in keys]
            scores, corpus = [float(v) for v in lines[:-1]], float(lines[-1])
        return corpus, np.asarray(scores)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
