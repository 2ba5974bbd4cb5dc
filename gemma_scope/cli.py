"""The command-line convention of every entry point (train, activations, evaluate, score, browse, steer,
data.build, sweep).

- Entry points whose input is an experiment config (``train``, ``activations``) take ml_collections'
  ``--config=FILE[:ARG]`` plus ``--config.x.y=value`` overrides (absl flags); the others take ``--snake_case``
  options (argparse, ``parser``). ``--help`` lists every option.
- A user error (``USER_ERRORS``: a bad value, a missing file, an unknown config key) ends the command with ONE line
  ``error: <message>`` on stderr and exit status 2; ``--verbose`` shows the traceback instead.
- An exception with an ``exit_status`` attribute ends it with one line and that status: a full disk
  (``files.NoSpaceError``, 74), a preempted run (``training.stopping.Preempted``, 75: its line names the saved
  checkpoint). A lost peer process exits with 69 (``training.stopping``).

Each ``main(argv)`` raises its errors; the module's ``if __name__ == "__main__"`` calls ``run`` (argparse) or
``run_app`` (absl), which turn them into that one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from absl import app, flags

# Errors that mean the user asked for something wrong (extend here; every entry point uses this tuple).
# FloatingPointError: training diverged (train.NonFiniteError); its message names the step and the checkpoint to
# resume from, which is all a user needs.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, FloatingPointError)
VERBOSE_HELP = "on an error, show the traceback instead of one line"
EXIT_USER_ERROR = 2
_EXIT_PREEMPTED = 75  # training.stopping.EXIT_PREEMPTED (not imported: it imports jax): a stop, not an error

flags.DEFINE_bool("verbose", False, VERBOSE_HELP)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for ``python -m <prog>`` with the shared ``--verbose`` option; help shows defaults."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def _fail(error: BaseException) -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    status = getattr(error, "exit_status", EXIT_USER_ERROR)
    print(message if status == _EXIT_PREEMPTED else f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _handled(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or hasattr(error, "exit_status")


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Calls ``main(argv)`` (default ``sys.argv[1:]``); a ``USER_ERRORS`` exception becomes one line on stderr
    and exit status 2, unless ``--verbose`` is given."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except Exception as e:
        if "--verbose" in argv or not _handled(e):
            raise
        _fail(e)


def parse_config_flags(argv: list[str]) -> list[str]:
    """``flags.FLAGS(argv)`` for an entry point with a ``--config`` config-file flag. The config file is loaded
    once, by ``config_flags``, which also checks each ``--config.a.b=v`` override against it; its refusals become
    one clear message.

    Raises:
      FileNotFoundError: a ``--config`` file that cannot be loaded.
      ValueError: an unknown flag or config key (named, with where it was looked up), or a bad ``--config`` value
        (e.g. ``FILE:ARG`` refused by ``get_config``: its error's last line).
    """
    try:
        rest = flags.FLAGS(argv)
        if flags.FLAGS["config"].value is not None:
            flags.FLAGS["config"].value.keys()  # a file config_flags could not load gives OSError here
        return rest
    except OSError as e:
        raise FileNotFoundError(f"--config: {str(e).splitlines()[-1].strip()}") from None
    except (flags.Error, AttributeError, KeyError) as e:  # config_flags raises AttributeError for unknown keys
        source = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "the config")
        for arg in argv if isinstance(e, (AttributeError, KeyError)) else ():
            keys = arg.split("=", 1)[0].removeprefix("--").split(".")
            if keys[0] == "config" and len(keys) > 1 and keys[-1] in str(e):
                hint = str(e).strip("'\"").split("\\n")[-1]  # config_dict's "Did you mean ..."
                raise ValueError(f"--{'.'.join(keys)}: unknown config key {keys[-1]!r} under "
                                 f"{'.'.join(keys[:-1])!r} of {source}. {hint}") from None
        if isinstance(e, AttributeError) and "'get_config'" in str(e):
            raise ValueError(f"--config={source}: the file defines no get_config() returning an ml_collections "
                             "ConfigDict (see experiments/from_activations.py)") from None
        text = str(e).strip()  # get_config's traceback, when it raised, is embedded in the message: keep its last line
        raise ValueError(text.split("Traceback")[0] + text.splitlines()[-1] if "Traceback" in text else text) from None


def run_app(main: Callable[[list[str]], object]) -> None:
    """``absl.app.run(main)`` with ``parse_config_flags`` and the shared error convention (module docstring)."""
    verbose = "--verbose" in sys.argv

    def parse(argv):
        try:
            return parse_config_flags(argv)
        except USER_ERRORS as e:
            if verbose:
                raise
            _fail(e)

    def guarded(argv):
        try:
            main(argv)  # its return value is for Python callers; absl would print it
        except Exception as e:
            if verbose or not _handled(e):
                raise
            _fail(e)

    app.run(guarded, flags_parser=parse)
