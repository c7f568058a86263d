"""torchrun that gives its workers time to save after a signal.

    python -m turbo_tune.torchrun [torchrun's arguments]

On SIGTERM or SIGINT, torchrun forwards the signal to its workers and kills them 30 s later, a limit its command line
and environment cannot change (``PContext.close``'s default timeout, torch 2.11). The workers spend that time on the
checkpoint of the step they stopped at (turbo_tune/run_guard.py), which for a real model takes minutes: torchrun
would kill them mid-save. This is torchrun with that wait raised to ``TURBO_TUNE_SHUTDOWN_TIMEOUT`` seconds (default
3600); the scheduler's grace period stays the real limit. A worker that ends before it is not waited for.
"""

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing import api
from torch.distributed.run import main

TIMEOUT_ENV = "TURBO_TUNE_SHUTDOWN_TIMEOUT"
_torch_close = api.PContext.close


def shutdown_timeout() -> int:
    """Seconds the workers get between the forwarded signal and SIGKILL."""
    value = os.environ.get(TIMEOUT_ENV, "3600")
    if not value.isdigit():
        sys.exit(f"{TIMEOUT_ENV}={value!r}: give the seconds to wait for the workers as a whole number.")
    return int(value)


def _close(self: api.PContext, death_sig: signal.Signals | None = None, timeout: int | None = None) -> None:
    _torch_close(self, death_sig, shutdown_timeout() if timeout is None else timeout)


if __name__ == "__main__":
    shutdown_timeout()  # a bad value stops here, not when a signal comes
    api.PContext.close = _close
    main()
