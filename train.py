"""hocp-jax training program.

    python train.py --config configs/default.py --workdir /tmp/hocp [--config.key=value ...]

``--config`` is an ml_collections config file (``configs/*.py``); dotted overrides are
checked against it (an unknown key is an error). ``--workdir`` receives checkpoints, logs,
``results.json``/``results.md`` and plots; re-running the same command resumes. Several
hosts: start the same command on every host under SLURM / Open MPI / Cloud TPU (detected),
or export ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (see
README); one host needs nothing. A bad config value or missing data ends the program with
one ``error: ...`` line on stderr and exit status 2, as does a bad flag or override (e.g. an
unknown config key). A SIGTERM (a scheduler's preemption notice) checkpoints the stage at the
step it is seen and ends the program with status 143; the same command resumes.
"""

import os
import re
import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from hocp_jax.checks import dangling_link
from hocp_jax.training import jobs
from hocp_jax.training.checkpoint import NonFiniteError
from hocp_jax.training.distributed import Preempted, WorkdirInUseError, maybe_initialize_distributed

DEFAULT_CONFIG = "configs/default.py"
PREEMPTED_STATUS = 128 + 15  # a shell's status for a process ended by SIGTERM
# No default here: ml_collections would load it, with the overrides, at import, outside _parse_flags.
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Training configuration file (default {DEFAULT_CONFIG}).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.", required=True)


@flags.validator("workdir")
def _check_workdir(value) -> bool:
    """--workdir is a directory or a path where one can be made: not empty (the current directory),
    nor a file or a path under one, nor a symbolic link to nothing (a refused value: an ``error:``
    line from _parse_flags)."""
    if value is None:  # absl's check of a required flag says it
        return True
    if not value:
        raise flags.ValidationError("expected a directory (an empty path would be the current directory)")
    path = os.path.abspath(os.path.expanduser(value))
    link = dangling_link(path)
    if link:
        raise flags.ValidationError(f"{link} is a symbolic link to {os.readlink(link)}, which does not exist; "
                                    "expected a directory")
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise flags.ValidationError(f"{path} is a file; expected a directory")
    return True


def _fail(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _unknown_key(argv: list[str], err: Exception) -> str:
    """The override of ``argv`` naming the key ml_collections' error ``err`` says is missing."""
    inner = err
    while inner.__context__ is not None:  # the first KeyError holds the bare key
        inner = inner.__context__
    key = str(inner.args[0]) if inner.args else ""
    overrides = [m[1] for m in map(re.compile(r"--config\.([^=\s]+)").match, argv[1:]) if m]
    parts = next((o for o in overrides if key in o.split(".")), key).split(".")
    close = re.search(r'Did you mean "([^"]+)"', str(err))
    hint = f" (did you mean config.{'.'.join(close[1] if p == key else p for p in parts)}?)" if close else ""
    return f"config.{'.'.join(parts)}{hint}"


def _one_line(message: str) -> str:
    """The first and last lines of a message that embeds a traceback (a config file's error)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with errors as one ``error:`` line and exit status 2 (ml_collections
    raises a KeyError/AttributeError, a traceback, for an override of a key the config lacks)."""
    if not any(re.match(r"--?config(=|$)", arg) for arg in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    try:
        args = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a config file that failed to load raises OSError here
        return args
    except (flags.Error, OSError) as err:
        _fail(_one_line(str(err)))
    except (AttributeError, KeyError) as err:
        if getattr(err, "name", None) == "get_config":  # (the flag is unparsed: its value is in argv)
            i, arg = next((i, a) for i, a in enumerate(argv) if re.match(r"--?config(=|$)", a))
            _fail(f"--config={arg.partition('=')[2] or argv[i + 1]}: the file has no get_config() function")
        _fail(f"unknown config key {_unknown_key(argv, err)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines drown the progress bars
    tfds.display_progress_bar(False)
    config = _CONFIG.value
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    if not config.data.data_dir:
        config.data.data_dir = os.path.join(workdir, "data")
    try:
        maybe_initialize_distributed()
        jobs.run(config, workdir)
    except (ValueError, FileNotFoundError, WorkdirInUseError) as err:  # user errors: no traceback
        _fail(str(err))
    except NonFiniteError as err:  # a diverged run, not a bad setting: status 1, but no traceback either
        _fail(str(err), 1)
    except Preempted as notice:  # checkpointed at the step the SIGTERM was seen; exit as a SIGTERM would
        print(notice, file=sys.stderr)
        sys.exit(PREEMPTED_STATUS)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
