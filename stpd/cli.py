"""``stpd``: the STPD daemon, in the foreground (systemd or a terminal)."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from pki.errors import PkiError
from pki.inifile import ConfigError
from pki.layout import INI_DIR_HELP, Layout, path_argument, resolve_ini_dir
from stpd.aio import single_error
from stpd.config import StpdConfig, load_config, open_files_to_the_hard_limit, stpd_address
from stpd.server import OPEN_PER_SERVED, Stpd
from stpd.store import StoreError

log = logging.getLogger("stpd")


def _listen(text: str) -> tuple[str, int]:
    try:
        return stpd_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpd",
        description="SEP sesam transfer protocol daemon (HTTPS). Without a command it runs "
        "in the foreground: SIGTERM stops it gracefully, SIGHUP reloads stpd.ini and certificates.",
    )
    parser.add_argument("--ini-dir", type=path_argument, help=INI_DIR_HELP)
    parser.add_argument(
        "--listen", type=_listen, help="HOST:PORT to listen on (stpd.ini: STPD_HTTPS_LISTEN)"
    )
    parser.add_argument(
        "--data-dir", type=path_argument, help="saveset directory (stpd.ini: STPD_DATA_DIR)"
    )
    parser.add_argument(
        "--pid-file", type=path_argument, help="write the process id here while running"
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "status"],
        default="run",
        help="run (default) the daemon, or show the running daemon's status",
    )
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    return parser


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# Open files per connection served: the sockets of the connections open at
# once (OPEN_PER_SERVED of them: see stpd.server), a saveset file during a
# transfer, and one to spare (a listing, a verification).
FILES_PER_CONNECTION = OPEN_PER_SERVED + 2
FILES_BESIDES = 64  # listeners, the data directory's lock, the log, trio's own


def raise_open_files_limit(max_connections: int) -> None:
    """Let stpd open as many files as it may (the hard limit): the soft one
    is often 1024, which a busy night of backups reaches (twice
    STPD_MAX_CONNECTIONS may be open, see OPEN_PER_SERVED), and then no
    connection can be accepted. Says so when even the hard limit is short
    of what ``max_connections`` may need."""
    try:
        before, soft = open_files_to_the_hard_limit()
    except (ValueError, OSError) as exc:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.warning("cannot raise the open files limit from %d: %s", soft, exc)
    else:
        if soft == resource.RLIM_INFINITY:
            return
        if soft != before:
            log.info("open files limit raised from %d to %d", before, soft)
    needed = FILES_PER_CONNECTION * max_connections + FILES_BESIDES
    if soft < needed:
        log.warning(
            "the open files limit (%d) is below the %d that STPD_MAX_CONNECTIONS=%d may need: "
            "raise it (LimitNOFILE= in the systemd unit, ulimit -n) or lower STPD_MAX_CONNECTIONS",
            soft,
            needed,
            max_connections,
        )


async def run_daemon(daemon: Stpd) -> None:
    """SIGTERM/SIGINT: drain and stop (a second one stops at once);
    SIGHUP: reload configuration and certificates."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

            async def serve_then_stop() -> None:
                await daemon.serve()
                nursery.cancel_scope.cancel()  # served out: stop listening for signals

            nursery.start_soon(serve_then_stop)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reloading")
                    daemon.reload()
                elif daemon.draining:
                    log.warning("received %s again: stopping at once", name)
                    nursery.cancel_scope.cancel()
                else:
                    log.info("received %s", name)
                    daemon.shutdown()


def write_pid_file(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def status(layout: Layout, config: StpdConfig, as_json: bool) -> int:
    """Ask the running daemon over HTTPS, as a client of this ini directory.
    A daemon listening on all addresses is reached on loopback, where its
    certificate's names do not apply: we pin our own ssl/server.pem instead."""
    import dataclasses

    from cryptography import x509

    from pki.names import certificate_names
    from pki.tls import fingerprint_sha256
    from sbc.cli import main as sbc_main

    host, port = config.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        ours = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {layout.server_cert}: {exc}") from None
    names = certificate_names(ours)

    def pin_our_certificate(sbc_config: Any) -> Any:
        return dataclasses.replace(
            sbc_config,
            server_fingerprint=fingerprint_sha256(ours),
            expected_name=names[0] if names else None,
        )

    argv = ["--ini-dir", str(layout.ini_dir), "status", "--server", f"{host}:{port}"]
    return sbc_main(argv + (["--json"] if as_json else []), adjust=pin_our_certificate)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(resolve_ini_dir(args.ini_dir))
    try:
        try:
            config = load_config(layout, listen=args.listen, data_dir=args.data_dir)
            if args.command == "status":
                return status(layout, config, args.json)
            configure_logging()
            raise_open_files_limit(config.max_connections)
            daemon = Stpd(config)
            if args.pid_file:
                write_pid_file(args.pid_file)
            try:
                trio.run(run_daemon, daemon)
            finally:
                if args.pid_file:
                    args.pid_file.unlink(missing_ok=True)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
    except (ConfigError, PkiError, StoreError) as exc:
        print(f"stpd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename or "listen address"
        print(f"stpd: error: {exc.strerror or exc} ({where})", file=sys.stderr)
        return 2
    return 0
