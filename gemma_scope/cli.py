"""The command-line convention of every entry point (train, activations, evaluate, score, browse, steer,
data.build, sweep).

- Entry points whose input is an experiment config (``train``, ``activations``) take ml_collections'
  ``--config=FILE[:ARG]`` plus ``--config.x.y=value`` overrides (absl flags); the others take ``--snake_case``
  options (argparse, ``parser``). ``--help`` lists every option.
- A user error (``USER_ERRORS``: a bad value, a missing file, a file where a directory is expected, an unknown
  config key) ends the command with ONE line ``error: <message>`` on stderr and exit status 2; ``--verbose`` shows
  the traceback instead. Commands check what they can before loading a model or reading data.
- An exception with an ``exit_status`` attribute ends it with one line and that status: a full disk
  (``files.NoSpaceError``, 74), a preempted run (``training.stopping.Preempted``, 75: its line names the saved
  checkpoint). A lost peer process exits with 69 (``training.stopping``). Any other write that failed for lack of
  space (``files.is_no_space``: one no ``files.space_for`` names with its size) ends the same way as a full disk,
  naming the file.

Each ``main(argv)`` raises its errors; the module's ``if __name__ == "__main__"`` calls ``run`` (argparse) or
``run_app`` (absl), which turn them into that one line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import ConfigDict

from gemma_scope.files import as_no_space, is_no_space

# Errors that mean the user asked for something wrong (extend here; every entry point uses this tuple).
# FloatingPointError: training diverged (train.NonFiniteError); its message names the step and the checkpoint to
# resume from, which is all a user needs.
# NotADirectoryError, FileExistsError, IsADirectoryError: a path given where the other kind of path was expected.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, FloatingPointError,
                                                NotADirectoryError, FileExistsError, IsADirectoryError)
VERBOSE_HELP = "on an error, show the traceback instead of one line"
EXIT_USER_ERROR = 2
_EXIT_PREEMPTED = 75  # training.stopping.EXIT_PREEMPTED (not imported: it imports jax): a stop, not an error

flags.DEFINE_bool("verbose", False, VERBOSE_HELP)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own prints the usage first; the convention is one line
        print(f"error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for ``python -m <prog>`` with the shared ``--verbose`` option; help shows defaults. Its
    own errors (a missing or malformed option, ``parser.error``) are one line and exit status 2, as the rest."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def _message(error: BaseException) -> str:
    """The one line for ``error``; an OSError in Python's bare ``[Errno n] text: 'path'`` form says which path is in
    the way."""
    if isinstance(error, OSError) and error.filename is not None and str(error).startswith("[Errno"):
        if isinstance(error, NotADirectoryError) or (isinstance(error, FileExistsError)
                                                     and not os.path.isdir(error.filename)):
            return (f"{error.filename}: expected a directory, but it or one of its parents is a file "
                    f"({error.strerror})")
        if isinstance(error, IsADirectoryError):
            return f"{error.filename}: expected a file, found a directory"
    return " ".join(str(error).split()) or type(error).__name__


def _fail(error: BaseException) -> None:
    message = _message(error)
    status = getattr(error, "exit_status", EXIT_USER_ERROR)
    print(message if status == _EXIT_PREEMPTED else f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _handled(error: BaseException) -> BaseException | None:
    """The exception to report in one line for ``error`` (itself, or the full disk behind it), or None."""
    if isinstance(error, USER_ERRORS) or hasattr(error, "exit_status"):
        return error
    return as_no_space(error, os.getcwd()) if is_no_space(error) else None


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Calls ``main(argv)`` (default ``sys.argv[1:]``); a ``USER_ERRORS`` exception becomes one line on stderr
    and exit status 2, unless ``--verbose`` is given."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except Exception as e:
        reported = _handled(e)
        if "--verbose" in argv or reported is None:
            raise
        _fail(reported)


def _unknown_key(error: Exception, argv: list[str]) -> tuple[list[str], int] | None:
    """(keys of the ``--config.a.b=v`` override, index of its key that config_dict could not find), or None.

    config_dict names the missing key (``'widht'\\nDid you mean "width" instead of "widht"?``, or ``Attribute
    <class 'int'>.x does not exist ... lookup: a.b.x``); the override is the first one holding exactly that key."""
    text = str(error)
    path = re.search(r"Attempting to lookup: ([\w.]+)", text)
    named = re.search(r'instead of "(\w+)"', text) or re.match(r"""[\\'"]*(\w+)""", text)
    for arg in argv:
        keys = arg.split("=", 1)[0].removeprefix("--").split(".")
        if keys[0] != "config" or len(keys) < 2:
            continue
        if path and keys[1:] == path[1].split("."):
            return keys, len(keys) - 1
        if not path and named and named[1] in keys[1:]:
            return keys, keys.index(named[1], 1)
    return None


def parse_config_flags(argv: list[str]) -> list[str]:
    """``flags.FLAGS(argv)`` for an entry point with a ``--config`` config-file flag. The config file is loaded
    once, by ``config_flags``, which also checks each ``--config.a.b=v`` override against it; its refusals become
    one clear message.

    Raises:
      FileNotFoundError: a ``--config`` file that cannot be loaded.
      ValueError: an unknown flag or config key (named, with where it was looked up), a config file with a syntax
        error (file and line) or whose ``get_config()`` returns no ConfigDict, or a bad ``--config`` value (e.g.
        ``FILE:ARG`` refused by ``get_config``: its error's last line).
    """
    source = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "the config")
    example = "an ml_collections ConfigDict (see experiments/from_activations.py)"
    not_a_config = f"--config={source}: the file defines no get_config() returning {example}"
    returned = f"--config={source}: get_config() returned an object of type {{}}; expected {example}"
    try:
        rest = flags.FLAGS(argv)
        value = flags.FLAGS["config"].value
        if value is not None and not isinstance(value, ConfigDict):
            getattr(value, "keys", None)  # a file config_flags could not load gives OSError here
            raise ValueError(returned.format(type(value).__name__))
        return rest
    except OSError as e:
        raise FileNotFoundError(f"--config: {str(e).splitlines()[-1].strip()}") from None
    except SyntaxError as e:
        raise ValueError(f"--config={source}: syntax error in {e.filename}, line {e.lineno}: {e.msg}") from None
    except (flags.Error, AttributeError, KeyError) as e:  # config_flags raises AttributeError for unknown keys
        unknown = _unknown_key(e, argv) if isinstance(e, (AttributeError, KeyError)) else None
        if unknown:
            keys, i = unknown
            flag, parent = "--" + ".".join(keys), ".".join(keys[:i])
            held = re.search(r"Attribute <class '([\w.]+)'>", str(e))
            if held and i == 1:
                raise ValueError(returned.format(held[1])) from None
            if held:
                raise ValueError(f"{flag}: {parent!r} of {source} is of type {held[1]}, not a group of config keys; "
                                 f"there is no key {keys[i]!r} under it") from None
            hint = re.search(r'Did you mean "\w+" instead of "\w+"\?', str(e))
            raise ValueError(f"{flag}: unknown config key {keys[i]!r} under {parent!r} of {source}."
                             + (f" {hint[0]}" if hint else "")) from None
        if isinstance(e, AttributeError) and "'get_config'" in str(e):
            raise ValueError(not_a_config) from None
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
            reported = _handled(e)
            if verbose or reported is None:
                raise
            _fail(reported)

    app.run(guarded, flags_parser=parse)
