"""Process exit codes of `dlrm-daemon` (documented in docs/OPERATIONS.md)."""
from __future__ import annotations

OK = 0  # clean exit, including after SIGTERM/SIGINT and a finished drain
RUNTIME_FAILURE = 1  # failure while serving (socket bind failed, lost every engine for good, ...)
USAGE = 2  # bad command line (argparse)
ENGINE_LOAD_FAILURE = 70  # EX_SOFTWARE: no engine could load the model at start
CONFIG_ERROR = 78  # EX_CONFIG: invalid configuration (message names the key)
