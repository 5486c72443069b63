"""Our side of the benchmark: a throw-away PKI made with the real
``sm_ssl_cert``, the real ``stpd`` at level 2 with its data directory on
/dev/shm, and ``sbc`` command lines."""

from __future__ import annotations

import compileall
from pathlib import Path

from bench.common import HOST, BenchError, Server, run_checked, tool

START_TIMEOUT = 60.0  # seconds for stpd to log "listening on"
PKI_TIMEOUT = 120.0  # seconds for one sm_ssl_cert command
DEFAULT_MAX_CONNECTIONS = 64  # stpd's STPD_MAX_CONNECTIONS default


def compile_bytecode() -> None:
    """Bytecode for our packages, as ``pip install .`` leaves it in
    site-packages. The development install runs the checkout's sources,
    and where PYTHONDONTWRITEBYTECODE is set (as on these machines) every
    sbc would compile them anew at its start: 25 ms of its 150."""
    root = Path(__file__).resolve().parent.parent
    for package in ("pki", "stpd", "sbc"):
        if not compileall.compile_dir(root / package, quiet=1):
            raise BenchError(f"cannot compile the {package} package to bytecode")


class Pki:
    """CA, server certificate (127.0.0.1, localhost) and client certificate
    in one ini directory, in the layout every program reads."""

    def __init__(self, ini: Path) -> None:
        self.ini = ini
        self.ca_cert = ini / "ca" / "rootCA.pem"
        self.server_cert = ini / "ssl" / "server.pem"
        self.server_key = ini / "ssl" / "server.key"
        self.client_cert = ini / "x.509" / "client.pem"
        self.client_key = ini / "x.509" / "client.key"

    def create(self) -> None:
        sm_ssl_cert = tool("sm_ssl_cert")
        base = [sm_ssl_cert, "--ini-dir", str(self.ini)]
        run_checked([*base, "ca"], PKI_TIMEOUT)
        run_checked([*base, "server", f"--common-name={HOST},localhost"], PKI_TIMEOUT)
        run_checked([*base, "client", "--oid=CN:bench"], PKI_TIMEOUT)
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise BenchError(f"sm_ssl_cert did not create {path}")
        for path in (self.client_cert, self.client_key):
            if not path.is_file():
                raise BenchError(f"sm_ssl_cert did not create {path}")


class Stpd:
    """``stpd --ini-dir INI --listen 127.0.0.1:0 --data-dir DATA`` at level 2;
    the port is taken from its "listening on" line. ``sm.ini`` for sbc is
    written once that port is known."""

    def __init__(self, pki: Pki, data_dir: Path, clients: int) -> None:
        self.pki = pki
        self.clients = clients
        self.data_dir = data_dir
        self.port = 0
        self.server: Server | None = None

    def start(self) -> None:
        ini = self.pki.ini
        settings = "[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT=2\n"
        if self.clients > DEFAULT_MAX_CONNECTIONS // 2:  # room for the concurrent case
            settings += f"STPD_MAX_CONNECTIONS={2 * self.clients}\n"
        (ini / "stpd.ini").write_text(settings)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            tool("stpd"),
            "--ini-dir",
            str(ini),
            "--listen",
            f"{HOST}:0",
            "--data-dir",
            str(self.data_dir),
        ]
        self.server = Server("stpd", argv)
        line = self.server.wait_for(r"listening on 127\.0\.0\.1:(\d+), (.*)", START_TIMEOUT)
        if "level 2" not in line.group(2):
            raise BenchError(f"stpd is not at level 2: {line.group(0)}")
        self.port = int(line.group(1))
        (ini / "sm.ini").write_text(
            "[SBC_SSL]\nSBC_CLIENT_SSL_AUTH=1\nSBC_SSL_SERVER_VERIFY=1\n"
            f"[SBC]\nSBC_SERVER={HOST}:{self.port}\n"
        )

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def check_alive(self) -> None:
        assert self.server is not None
        if not self.server.alive():
            raise BenchError("stpd exited; its last lines:\n" + self.server.tail())

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def saveset_path(self, saveset: str) -> Path:
        return self.data_dir / f"{saveset}.tar"

    def delete_saveset(self, saveset: str) -> None:
        """Remove a saveset's tar and metadata (keeps /dev/shm from filling)."""
        for suffix in (".tar", ".json"):
            (self.data_dir / f"{saveset}{suffix}").unlink(missing_ok=True)


def sbc_backup(pki: Pki, source: Path) -> list[str]:
    return [tool("sbc"), "--ini-dir", str(pki.ini), "backup", str(source), "--json", "--quiet"]


def sbc_restore(pki: Pki, saveset: str, target: Path) -> list[str]:
    return [
        tool("sbc"),
        "--ini-dir",
        str(pki.ini),
        "restore",
        saveset,
        str(target),
        "--json",
        "--quiet",
    ]


def sbc_status(pki: Pki) -> list[str]:
    return [tool("sbc"), "--ini-dir", str(pki.ini), "status", "--json", "--quiet"]
