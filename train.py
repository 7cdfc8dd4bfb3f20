"""hocp-jax training program.

    python train.py --config configs/default.py --workdir /tmp/hocp [--config.key=value ...]

``--config`` is an ml_collections config file (``configs/*.py``); dotted overrides are
checked against it (an unknown key is an error). ``--workdir`` receives checkpoints, logs,
``results.json``/``results.md`` and plots; re-running the same command resumes. Several
hosts: start the same command on every host under SLURM / Open MPI / Cloud TPU (detected),
or export ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (see
README); one host needs nothing. A bad config value or missing data ends the program with
one ``error: ...`` line on stderr and exit status 2.
"""

import os
import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from hocp_jax.training import jobs
from hocp_jax.training.distributed import WorkdirInUseError, maybe_initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines drown the progress bars
    tfds.display_progress_bar(False)
    maybe_initialize_distributed()
    config = _CONFIG.value
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    if not config.data.data_dir:
        config.data.data_dir = os.path.join(workdir, "data")
    try:
        jobs.run(config, workdir)
    except (ValueError, FileNotFoundError, WorkdirInUseError) as err:  # user errors: no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
