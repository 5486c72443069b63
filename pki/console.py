"""What the commands (sm_ssl_cert, sbc) share about their standard streams."""

from __future__ import annotations

import os
import signal
import sys


def reader_gone() -> int:
    """stdout's reader went away (``sm_ssl_cert list | head``): end quietly,
    with the status of a tool killed by SIGPIPE, and keep Python from
    failing to flush at exit. The work itself is done by then."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE
