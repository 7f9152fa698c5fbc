"""Command-line plumbing shared by the launchers in ``launch/``.

* :func:`run` replaces ``absl.app.run``: it checks every ``--config.a.b=value`` override
  against the config file *before* absl parses it (an unknown or mistyped key is one line
  naming the flag, the config file and the closest existing keys), turns flag-parsing and
  usage errors into one line with exit code 2, and the library's user-facing errors
  (bad config, checkpoint, annotation file, video, data) raised by ``main`` into one line
  too (exit code 2: the command line or its inputs need fixing).
* :func:`setup_logging`: quiet by default. The console shows warnings and errors only
  (``warning: ...``); library INFO logs (Orbax, absl, JAX, the pipeline) go to a log file
  (:func:`add_log_file`, the workdir's ``train.log`` for training), and to the console
  as well with ``--verbosity=0`` (INFO) or ``--verbosity=1`` (DEBUG).

Exit codes: 0 success, 1 an unexpected failure (a traceback: a bug to report), 2 a usage
or input error (the one-line message says what to change), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

EXIT_USAGE = 2
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UsageError(Exception):
    """A command line or input that cannot work; the message is the whole error line."""


def fail(message: str) -> NoReturn:
    """Prints ``error: message`` (one line) on stderr and exits with code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------- config overrides


def _config_overrides(argv: Sequence[str], name: str) -> tuple[str | None, list[tuple[str, str]]]:
    """``(--<name> value, [(flag as typed, dotted path)])`` from a raw command line."""
    spec, overrides = None, []
    args = list(argv[1:])
    for k, arg in enumerate(args):
        if arg == "--":
            break
        if arg in (f"--{name}", f"-{name}") and k + 1 < len(args):
            spec = args[k + 1]
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            spec = arg.split("=", 1)[1]
        for prefix in (f"--{name}.", f"-{name}.", f"--no{name}.", f"-no{name}."):
            if arg.startswith(prefix):
                overrides.append((arg, arg[len(prefix):].split("=", 1)[0]))
                break
    return spec, overrides


def load_config_file(spec: str, flag: str = "--config") -> Any:
    """``configs/<name>.py[:arg]`` -> its ``get_config(arg)`` (how ``config_flags`` loads it);
    a missing file or a failing ``get_config`` is a :class:`UsageError`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        here = os.path.dirname(path) or "."
        known = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
        close = difflib.get_close_matches(os.path.basename(path), known, n=1)
        hint = f" (did you mean {os.path.join(os.path.dirname(path), close[0])}?)" if close else ""
        raise UsageError(f"{flag}={spec}: config file {path} not found{hint}")
    try:
        module_spec = importlib.util.spec_from_file_location(f"_d2vlm_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - any error of the user's config file
        raise UsageError(f"{flag}={spec}: the config file fails to load: {type(e).__name__}: {e}") from None


def _flat_keys(config: Any, prefix: str = "") -> list[str]:
    import ml_collections
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _flat_keys(value, path + ".")
    return keys


def check_override(config: Any, path: str, flag: str, spec: str) -> None:
    """Raises :class:`UsageError` when ``path`` (``a.b.c``) is not a field of ``config``,
    naming the first missing part and the closest existing fields."""
    import ml_collections
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the top level"
        if not isinstance(node, ml_collections.ConfigDict):
            raise UsageError(f"{flag}: config.{'.'.join(parts[:depth])} is a value "
                             f"({type(node).__name__}), not a section ({spec})")
        if part not in node:
            local = [".".join(parts[:depth] + [g]) for g in difflib.get_close_matches(part, list(node.keys()), n=2,
                                                                                       cutoff=0.6)]
            whole = difflib.get_close_matches(path, _flat_keys(config), n=3, cutoff=0.6)
            guesses = list(dict.fromkeys(local + whole))[:3]
            hint = ("did you mean " + " or ".join(f"--config.{g}" for g in guesses) + "?") if guesses else (
                f"fields at {where}: {', '.join(sorted(node.keys()))}")
            raise UsageError(f"{flag}: {spec} has no field '{part}' at {where}; {hint} "
                             f"(--check_config prints every field)")
        node = node[part]


def check_config_overrides(argv: Sequence[str], name: str = "config") -> None:
    """Loads ``--<name>`` and checks each ``--<name>.a.b`` path exists (see :func:`run`)."""
    spec, overrides = _config_overrides(argv, name)
    if spec is None:
        return          # absl reports the missing flag
    config = load_config_file(spec, f"--{name}")
    for flag, path in overrides:
        check_override(config, path, flag, spec)


# ----------------------------------------------------------------------------- running


def user_error_types() -> tuple[type[BaseException], ...]:
    """The library's exceptions whose message already says what is wrong with the input
    (file, field, value): printed as one line, exit code 2. Imported lazily (jax)."""
    from d2vlm_jax.config import ConfigError
    from d2vlm_jax.data.pipeline import DataError, FramesError
    from d2vlm_jax.data.schema import AnnotationError
    from d2vlm_jax.data.template import ExampleError
    from d2vlm_jax.data.video import VideoError
    from d2vlm_jax.data.tokenizer import TokenizerError
    from d2vlm_jax.evaluation.records import EvaluationInputError
    from d2vlm_jax.inference.runner import CheckpointError
    from d2vlm_jax.train.loop import TrainingError
    from d2vlm_jax.weights.common import CheckpointError as WeightsCheckpointError
    return (ConfigError, DataError, FramesError, AnnotationError, ExampleError, VideoError, CheckpointError,
            TrainingError, TokenizerError, EvaluationInputError, WeightsCheckpointError, UsageError)


def run(main: Callable[[list[str]], Any], *, config_flag: str | None = None) -> None:
    """``absl.app.run(main)`` with one-line errors (module docstring).

    Args:
      main: the launcher's ``main(argv)``.
      config_flag: name of the ``config_flags.DEFINE_config_file`` flag whose overrides
        are checked before parsing (None: the launcher has none).
    """
    from absl import app, flags

    def parse(argv: list[str]) -> list[str]:
        try:
            if config_flag:
                check_config_overrides(argv, config_flag)
            remaining = flags.FLAGS(argv)
        except UsageError as e:
            fail(str(e))
        except flags.Error as e:
            fail(f"{e} (--helpshort lists the flags)")
        except (KeyError, AttributeError, TypeError, ValueError) as e:   # config_flags override errors
            fail(f"bad --{config_flag} override: {e}")
        setup_logging()
        if len(remaining) > 1:
            fail(f"unexpected arguments: {' '.join(remaining[1:])} (flags are written --name=value)")
        return remaining

    def guarded_main(argv: list[str]) -> Any:
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted (a training run resumes from its newest checkpoint with the same command)",
                  file=sys.stderr, flush=True)
            sys.exit(130)
        except app.UsageError as e:
            fail(str(e))
        except Exception as e:  # noqa: BLE001
            if isinstance(e, user_error_types()):
                fail(str(e))
            raise

    app.run(guarded_main, flags_parser=parse)


# ----------------------------------------------------------------------------- logging


class _ConsoleFormatter(logging.Formatter):
    """``warning: message`` for warnings and errors; absl's prefix for INFO/DEBUG (verbose)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        from absl import logging as absl_logging
        return absl_logging.get_absl_log_prefix(record) + record.getMessage()


class _QuietLibraries(logging.Filter):
    """Keeps the libraries' own warnings (Orbax: "waiting for previous save...") off the
    console; they stay in the log file. Errors always show."""

    PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not any(p in record.pathname for p in self.PATHS)


def setup_logging(verbosity: int | None = None) -> None:
    """Console: WARNING and above (not the warnings of Orbax and Grain themselves), or
    everything from ``--verbosity`` (absl: 0 = INFO, 1 = DEBUG) when given; INFO and above
    still reach the log files (:func:`add_log_file`).
    Python warnings are logged (``py.warnings``) rather than printed."""
    from absl import flags
    from absl import logging as absl_logging
    if verbosity is None:
        flag = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
        verbosity = flag.value if flag is not None and flag.present else -1
    console_level = logging.WARNING if verbosity < 0 else (logging.INFO if verbosity == 0 else logging.DEBUG)
    root = logging.getLogger()
    absl_handler = absl_logging.get_absl_handler()
    for handler in list(root.handlers):
        if handler is absl_handler or getattr(handler, "_d2vlm_console", False):
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console._d2vlm_console = True
    console.setLevel(console_level)
    console.setFormatter(_ConsoleFormatter())
    if verbosity < 0:
        console.addFilter(_QuietLibraries())
    root.addHandler(console)
    root.setLevel(min(console_level, logging.INFO))
    logging.getLogger("absl").setLevel(logging.NOTSET)
    logging.captureWarnings(True)


def add_log_file(path: str) -> str:
    """Appends INFO-and-above records of every logger to ``path`` (created with its
    directory); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == os.path.abspath(path):
            return path
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)
    return path


__all__ = ["EXIT_USAGE", "UsageError", "fail", "run", "load_config_file", "check_override",
           "check_config_overrides", "user_error_types", "setup_logging", "add_log_file"]
