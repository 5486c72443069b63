"""sbc against an HTTPS server that is not stpd (a wrong port in
--server): it copes with what is valid HTTP (``Connection: close``), and an
answer stpd would not send is one ``sbc: error:`` line saying that the
server does not look like stpd, never a traceback."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import sbc.client
from tests.conftest import LOOPBACK, Pki, run_sbc

SS = "SS-20260101T120000Z-0123abcd"
STATUS = {
    "version": "0.1.0",
    "level": 2,
    "uptime_seconds": 1.5,
    "connections": 1,
    "active_transfers": 0,
    "server_certificate": {"subject": "CN=x", "not_after": "2030-01-01T00:00:00Z", "days_left": 9},
    "storage": {"free_bytes": 10**9, "total_bytes": 2 * 10**9},
    "data_directory": "ok",
    "crl": None,
}
ENTRY = {"name": "a", "type": "file", "size": 1, "mode": "0644", "owner": "u/g", "mtime": "x"}

Answers = dict[str, tuple[int, str, bytes]]  # path: status, content type, body


@contextmanager
def other_https_server(
    pki: Pki, answers: Answers, headers: tuple[tuple[str, str], ...] = ()
) -> Iterator[str]:
    """An HTTPS server (Python's http.server) with stpd's certificate that
    answers each path as ``answers`` says, with ``Connection: close`` and
    ``headers``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # (it answers Expect: 100-continue)

        def do_GET(self) -> None:
            status, content_type, body = answers[self.path.split("?")[0]]
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            while size := int(self.rfile.readline().split(b";")[0], 16):  # chunked: read it all
                self.rfile.read(size + 2)
            while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                pass
            self.do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.layout.server_cert, pki.layout.server_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="other-https", daemon=True
    )
    thread.start()
    try:
        yield f"{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def as_json(value: object) -> bytes:
    return json.dumps(value).encode()


def test_an_answer_with_connection_close_is_taken(pki: Pki) -> None:
    client = pki.client_ini("other")
    answers = {
        "/status": (200, "application/json", as_json(STATUS)),
        "/savesets": (200, "application/json", b"[]"),
    }
    with other_https_server(pki, answers) as address:
        ini = ("--ini-dir", str(client.ini_dir))
        code, out, err = run_sbc(*ini, "status", "--server", address)
        assert (code, err) == (0, ""), err
        assert out.startswith(f"stpd 0.1.0 at {address}: level 2"), out
        code, out, err = run_sbc(*ini, "list", "--server", address)
        assert (code, out, err) == (0, f"no savesets for this client on {address}\n", "")


def test_a_servers_reason_for_anonymous_is_shown_without_escapes(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The STPD-Certificate-Not-Accepted header is a server's words, printed
    on the terminal: a C1 control (0x9b, CSI) is written as \\x9b. (The
    stdlib's server cannot name a CA in its certificate request, as stpd at
    level 1 does: sbc is told it asked.)"""
    monkeypatch.setattr(sbc.client.Session, "certificate_asked", property(lambda self: True))
    client = pki.client_ini("other")
    answers = {"/savesets": (200, "application/json", b"[]")}
    told = "certificate has been revoked\x9b[2J"
    headers = (("STPD-Certificate-Not-Accepted", told),)
    with other_https_server(pki, answers, headers) as address:
        code, _, err = run_sbc("--ini-dir", str(client.ini_dir), "list", "--server", address)
    assert code == 0
    assert err.startswith(
        f"sbc: WARNING: stpd at {address} did not accept our client certificate: certificate "
        "has been revoked\\x9b[2J; it serves this client as anonymous"
    ), err


@pytest.mark.parametrize(
    ("argv", "answers", "why"),
    [
        (
            ["list", SS],
            {f"/savesets/{SS}/entries": (200, "application/x-ndjson", b'{"name": "a"}\n')},
            f"its answer to GET /savesets/{SS}/entries has no valid 'type'",
        ),
        (
            ["list", SS],
            {
                f"/savesets/{SS}/entries": (
                    200,
                    "application/x-ndjson",
                    as_json({**ENTRY, "mode": "rw-r--r--"}) + b"\n",
                )
            },
            f"its answer to GET /savesets/{SS}/entries has no valid 'mode'",
        ),
        (
            ["list", SS],
            {
                f"/savesets/{SS}/entries": (
                    200,
                    "application/x-ndjson",
                    as_json({**ENTRY, "type": "hardlink", "link": None}) + b"\n",
                )
            },
            f"its answer to GET /savesets/{SS}/entries has no valid 'link'",
        ),
        (
            ["list", SS],
            {
                f"/savesets/{SS}/entries": (
                    200,
                    "application/x-ndjson",
                    as_json({**ENTRY, "device": {"kind": "", "major": 1, "minor": 2}}) + b"\n",
                )
            },
            f"its answer to GET /savesets/{SS}/entries has no valid 'kind' of device",
        ),
        (
            ["status"],
            {
                "/status": (
                    200,
                    "application/json",
                    as_json({**STATUS, "storage": {"free_bytes": 10**400, "total_bytes": True}}),
                )
            },
            "its answer to GET /status has no valid 'free_bytes'",
        ),
        (
            ["list", SS],
            {f"/savesets/{SS}/entries": (200, "application/x-ndjson", b"[1]\n")},
            f"a line of its answer to GET /savesets/{SS}/entries is not a JSON object",
        ),
        (
            ["list"],
            {"/savesets": (200, "application/json", as_json(STATUS))},
            "its answer to GET /savesets is not a JSON array",
        ),
        (
            ["list"],
            {"/savesets": (200, "application/json", b'[{"saveset": "x"}]')},
            "its answer to GET /savesets has no valid 'bytes'",
        ),
        (
            ["status"],
            {"/status": (404, "text/html", b"<html>not found</html>")},
            "its answer is not JSON",
        ),
        (
            ["status"],
            {"/status": (200, "application/json", as_json({**STATUS, "crl": {"days_left": 1}}))},
            "its answer to GET /status has no valid 'next_update'",
        ),
        (
            ["status"],
            {"/status": (200, "application/json", b'"ok"')},
            "its answer to GET /status is not a JSON object",
        ),
        (
            ["backup", "SOURCE"],
            {"/savesets": (201, "application/json", b'{"saveset": 5}')},
            "its answer to PUT /savesets?source=SOURCE has no valid 'saveset'",
        ),
        (
            ["verify", SS],
            {f"/savesets/{SS}/verify": (200, "application/x-ndjson", b'{"intact": true}\n')},
            f"its answer to GET /savesets/{SS}/verify has no valid 'bytes'",
        ),
    ],
)
def test_an_answer_stpd_would_not_send_is_one_line(
    pki: Pki, tmp_path: Path, argv: list[str], answers: Answers, why: str
) -> None:
    client = pki.client_ini("other")
    source = tmp_path / "source.txt"
    source.write_text("data\n")
    argv = [str(source) if arg == "SOURCE" else arg for arg in argv]
    with other_https_server(pki, answers) as address:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), *argv, "--server", address, "--quiet"
        )
    assert (code, out) == (1, ""), err
    why = why.replace("SOURCE", str(source))
    assert err == (
        f"sbc: error: what answers at {address} does not look like stpd: {why}; "
        "check the address in --server or SBC_SERVER in sm.ini\n"
    )
