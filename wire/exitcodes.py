"""Process exit codes, one table for `dlrm-daemon` and its engine processes (docs/OPERATIONS.md).

systemd's unit reads the daemon's (RestartPreventExitStatus); the supervisor reads an engine's, so an
engine that could not load its model is told apart from one that crashed.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # clean exit, including after SIGTERM/SIGINT and a finished drain (engine: after Shutdown)
    RUNTIME_FAILURE = 1  # daemon: failure while serving (bind failed, ...); engine: its dispatcher is gone
    USAGE = 2  # bad command line (argparse)
    ENGINE_LOAD_FAILURE = 70  # EX_SOFTWARE: daemon: no engine could load the model; engine: it could not
    CONFIG_ERROR = 78  # EX_CONFIG: invalid configuration (the message names the key)
