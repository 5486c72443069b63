"""``sbc`` as a process: it starts without trio, and Ctrl-C ends it at once,
also while it waits for a silent server.

sbc waits for its socket in C (poll() in stpd/_tlsio.c, with the GIL
released); a signal must end that wait so that Python can raise
KeyboardInterrupt, instead of poll() being restarted until SBC_IO_TIMEOUT.
The silent server is ``openssl s_server``: it completes the handshake,
prints the request it got, and never answers.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import WAIT_SECONDS, Pki

OPENSSL = shutil.which("openssl")
SBC = str(Path(sys.executable).parent / "sbc")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


def _lines(stream: object) -> queue.Queue[str]:
    """The lines of ``stream`` as they come, read by a thread."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for_line(lines: queue.Queue[str], prefix: str) -> str:
    while not (line := lines.get(timeout=WAIT_SECONDS)).startswith(prefix):
        pass
    return line


def test_ctrl_c_ends_sbc_waiting_for_an_answer(pki: Pki) -> None:
    client = pki.client_ini("waiter", extra_ini="[SBC]\nSBC_IO_TIMEOUT=600\n")
    assert OPENSSL is not None
    server = subprocess.Popen(
        [OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-naccept", "1"]
        + ["-cert", str(pki.layout.server_cert), "-key", str(pki.layout.server_key)],
        stdin=subprocess.PIPE,  # kept open and empty: s_server sends nothing
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = _lines(server.stdout)
        port = _wait_for_line(lines, "ACCEPT").rsplit(":", 1)[1].strip()
        sbc = subprocess.Popen(
            [SBC, "--ini-dir", str(client.ini_dir), "status", "--server", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for_line(lines, "GET /status HTTP/1.1")  # sbc now waits for the answer
            sbc.send_signal(signal.SIGINT)
            _, err = sbc.communicate(timeout=WAIT_SECONDS)  # not the 600 s of SBC_IO_TIMEOUT
        finally:
            sbc.kill()
            sbc.wait()
    finally:
        server.kill()
        server.communicate()
    assert sbc.returncode == 130, err
    assert err.strip() == "sbc: interrupted"


def test_sbc_does_not_import_trio() -> None:
    """Importing trio is about 0.1 s of CPU, half of a short sbc run's
    start-up (16 concurrent backups pay it 16 times): sbc is blocking."""
    check = "import sys, sbc.cli, sbc.client; print(sorted(m for m in sys.modules if m.split('.')[0] == 'trio'))"
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
