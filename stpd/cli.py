"""``stpd``: the STPD daemon, in the foreground (systemd or a terminal)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from pki.errors import PkiError
from pki.inifile import ConfigError, parse_host_port
from pki.layout import Layout, resolve_ini_dir
from stpd.config import STPD_HTTPS_PORT, load_config
from stpd.server import Stpd
from stpd.store import StoreError
from stpd.transfer import single_error

log = logging.getLogger("stpd")


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, STPD_HTTPS_PORT)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpd", description="SEP sesam transfer protocol daemon (HTTPS)"
    )
    parser.add_argument(
        "--ini-dir", help="ini directory (default: $SESAM_INI_DIR or /var/opt/sesam/var/ini)"
    )
    parser.add_argument(
        "--listen", type=_listen, help="HOST:PORT to listen on (stpd.ini: STPD_HTTPS_LISTEN)"
    )
    parser.add_argument("--data-dir", help="saveset directory (stpd.ini: STPD_DATA_DIR)")
    return parser


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def run_daemon(daemon: Stpd) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(daemon.serve)
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    layout = Layout(resolve_ini_dir(args.ini_dir))
    data_dir = Path(args.data_dir) if args.data_dir else None
    try:
        try:
            config = load_config(layout, listen=args.listen, data_dir=data_dir)
            daemon = Stpd(config)
            trio.run(run_daemon, daemon)
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
