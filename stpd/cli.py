"""``stpd``: the STPD daemon, in the foreground (systemd or a terminal)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import resource
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from pki.console import OutputError, one_line, output_failed, reader_gone, standard_streams
from pki.errors import PkiError
from pki.files import write_public
from pki.inifile import ConfigError, format_host_port
from pki.layout import INI_DIR_HELP, Layout, path_argument, resolve_ini_dir, saveset_argument
from stpd import __version__
from stpd.aio import single_error
from stpd.config import StpdConfig, load_config, open_files_to_the_hard_limit, stpd_address
from stpd.server import OPEN_PER_SERVED, Stpd, transfers_named
from stpd.store import SavesetStore, StoreError

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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
        choices=["run", "status", "list", "delete"],
        default="run",
        help="run (default) the daemon; show the running daemon's status; list the savesets "
        "of every client in the data directory; delete the savesets named",
    )
    parser.add_argument(
        "savesets",
        nargs="*",
        type=saveset_argument,
        metavar="SAVESET",
        help="delete: the saveset ids, as list shows them",
    )
    parser.add_argument("--json", action="store_true", help="status, list: print JSON")
    return parser


class OneLineFormatter(logging.Formatter):
    """One log record, one line: messages quote what peers send (a
    certificate's subject, an upload's source), which may hold a newline
    and then a forged line of their own. The traceback that format() adds
    after the message stays as it is."""

    # Times in UTC, said so, as every other time stpd and sbc print: a
    # local time without its zone is ambiguous across an RDS fleet.
    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


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


async def run_daemon(daemon: Stpd, pid_file: Path | None = None) -> None:
    """SIGTERM/SIGINT: drain and stop (a second one stops at once);
    SIGHUP: reload configuration and certificates. ``pid_file`` is
    written once stpd listens, and removed at the end if it is still
    ours: a second stpd that cannot take the port must not replace, or
    remove, the running one's."""
    written: list[Path] = []

    def write_ours() -> None:
        if pid_file is not None:
            write_pid_file(pid_file)
            written.append(pid_file)

    try:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

                async def serve_then_stop() -> None:
                    await daemon.serve(on_listening=write_ours)
                    nursery.cancel_scope.cancel()  # served out: stop listening for signals

                nursery.start_soon(serve_then_stop)
                await _handle_signals(daemon, signals, nursery.cancel_scope)
    finally:
        for path in written:
            if _holds_our_pid(path):
                path.unlink(missing_ok=True)


def _pid_in(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _stpd_named_in(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` when it is another stpd's, still running."""
    pid = _pid_in(pid_file)
    if pid is None or pid == os.getpid():
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"stpd" in command else None


def _holds_our_pid(pid_file: Path) -> bool:
    return _pid_in(pid_file) == os.getpid()


async def _handle_signals(
    daemon: Stpd, signals: AsyncIterator[int], stop: trio.CancelScope
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("received SIGHUP: reloading")
            daemon.reload()
        elif daemon.draining:
            running = list(daemon.transfers.values())
            log.warning(
                "received %s again: stopping at once, cutting off %s",
                name,
                transfers_named(running, " (nothing partial is kept)" if running else ""),
            )
            stop.cancel()  # then serve() says "stpd stopped"
        else:
            log.info("received %s", name)
            daemon.shutdown()


def write_pid_file(path: Path) -> None:
    """Through a new file beside it (O_EXCL, mode 0644 whatever the umask),
    renamed: a reader never sees it half written, and a symbolic link
    planted at a fixed temporary name (in /run/stpd, the service user's)
    does not make a root stpd write through it. A failure names the pid
    file, not that file, and leaves nothing behind. One that names another
    running stpd is left to it (a second stpd on another port and data
    directory, given the same --pid-file, took it over, then removed it)."""
    running = _stpd_named_in(path)
    if running is not None:
        raise OSError(
            errno.EEXIST,
            f"cannot write the pid file: it names stpd {running}, still running: stop that one "
            "first, or give this one another --pid-file",
            str(path),
        )
    try:
        write_public(path, f"{os.getpid()}\n".encode(), make_parent=False)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the pid file: {exc.strerror}", str(path)) from None


def status(layout: Layout, config: StpdConfig, as_json: bool) -> int:
    """Ask the running daemon over HTTPS, as a client of this ini directory.
    A daemon listening on all addresses is reached on loopback, where its
    certificate's names do not apply: we pin our own ssl/server.pem instead."""
    import dataclasses

    from cryptography import x509

    from pki.tls import ClientCertPolicy, fingerprint_sha256
    from sbc.cli import main as sbc_main

    host, port = config.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        ours = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {layout.server_cert}: {exc}") from None

    # Below level 2 the daemon serves a client without a certificate: on a
    # server that has none in x.509/ (the usual), present none.
    present = config.client_cert_policy == ClientCertPolicy.REQUIRE or layout.client_cert.exists()

    def pin_our_certificate(sbc_config: Any) -> Any:
        return dataclasses.replace(
            sbc_config,
            server_fingerprint=fingerprint_sha256(ours),
            check_names=False,  # pinned: the names are for the clients' hosts
            client_ssl_auth=sbc_config.client_ssl_auth and present,
            server_from=f"STPD_HTTPS_LISTEN in {layout.stpd_ini}, or --listen",
            pinned=f"that of {layout.server_cert}",
            pin_mismatch="the running stpd presents another certificate than the one here "
            "(renewed, and not yet reloaded?): send it SIGHUP (systemctl reload stpd)",
            check_server_crl=False,  # pinned: the CRL would tell nothing of it
        )

    argv = ["--ini-dir", str(layout.ini_dir), "status", "--server", format_host_port(host, port)]
    return sbc_main(argv + (["--json"] if as_json else []), adjust=pin_our_certificate, prog="stpd")


def _open_store(config: StpdConfig) -> SavesetStore:
    """The data directory, for the administrator's commands: they read and
    remove files beside a running stpd (which reads the directory at every
    request) and take no lock."""
    store = SavesetStore(config.saveset_dir)
    try:
        os.scandir(store.root).close()  # an unreadable one would list as empty
    except FileNotFoundError:
        raise StoreError(
            f"no data directory {store.root}: check STPD_DATA_DIR in {config.layout.stpd_ini} "
            "(or --data-dir), and that its file system is mounted; stpd makes it when it starts"
        ) from None
    except OSError as exc:
        raise StoreError(
            f"cannot read the data directory {store.root}: {exc.strerror or exc}; run this as "
            "the user stpd runs as, with its --ini-dir (or --data-dir)"
        ) from None
    return store


def list_savesets(config: StpdConfig, as_json: bool) -> int:
    store = _open_store(config)
    scan = store.scan()
    # What stpd neither lists nor serves, or lists but cannot serve: on stderr.
    for warning in scan.warnings():
        print(f"stpd: warning: {one_line(warning)}", file=sys.stderr)  # an owner in it: a peer's
    if as_json:
        print(json.dumps([meta.to_json() for meta in scan.savesets], indent=2))
        return 0
    for meta in scan.savesets:
        owner, source = one_line(meta.owner), one_line(meta.source)  # a peer chose them
        print(f"{meta.saveset}  {meta.created}  {meta.bytes:>14}  {owner}  {source}")
    # The bytes there are: a saveset without its data takes no room.
    lost_data = {meta.saveset for meta in scan.without_data}
    total = sum(meta.bytes for meta in scan.savesets if meta.saveset not in lost_data)
    lost = f"; {len(scan.without_data)} of them without data" if scan.without_data else ""
    print(f"{len(scan.savesets)} saveset(s), {total} bytes, in {store.root}{lost}")
    files, size = store.in_incoming()
    if files:  # neither listed nor served, but it takes room
        print(
            f"{files} file(s), {size} bytes in {store.incoming}: uploads in progress, or "
            "leftovers of interrupted ones, which stpd clears up when it starts"
        )
    return 0


def delete_savesets(config: StpdConfig, savesets: list[str]) -> int:
    """All or nothing: an id that is not there is an error before any is
    removed (a typo must not cost the savesets named before it). What is
    left of a broken saveset (metadata that cannot be read, a tar without
    metadata or metadata without its tar) is removed by its id too."""
    ini_dir, data_dir = (shlex.quote(str(p)) for p in (config.layout.ini_dir, config.saveset_dir))
    listing = f"`stpd --ini-dir {ini_dir} --data-dir {data_dir} list`"
    if not savesets:
        raise StoreError(f"delete: name the savesets to delete ({listing} shows them)")
    store = _open_store(config)
    found = {saveset: store.files_of(saveset) for saveset in savesets}
    missing = [saveset for saveset, files in found.items() if not files]
    if missing:
        raise StoreError(
            f"no saveset {', '.join(missing)} in {store.root} ({listing} shows what is "
            "there); nothing was deleted"
        )
    for saveset in found:
        obstacle = store.obstacle(saveset)  # not stpd's to remove, whatever it holds
        if obstacle is not None:
            raise StoreError(f"{obstacle}; nothing was deleted")
    for saveset, files in found.items():
        meta = store.get(saveset)
        store.remove(saveset)
        if meta is None:
            names = " and ".join(path.name for path in files)
            print(f"deleted saveset {saveset}, which had no readable metadata: {names}")
            continue
        lost = "" if store.tar_path(saveset) in files else " (its data was gone already)"
        print(
            f"deleted saveset {saveset} of {one_line(meta.owner)}: {meta.bytes} bytes of "
            f"{one_line(meta.source)}, stored {meta.created}{lost}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``stpd`` command; ``argv`` (not None) runs it within a program,
    with that program's standard streams as they are."""
    if argv is None:
        standard_streams()
    parser = build_parser()
    # Intermixed: the options may come between the command and its savesets
    # (`stpd delete --data-dir D ID`); parse_args took the command and the
    # savesets only as one run of positionals.
    args = parser.parse_intermixed_args(argv)
    if args.savesets and args.command != "delete":
        parser.error(f"unexpected arguments for {args.command}: {' '.join(args.savesets)}")
    layout = Layout(resolve_ini_dir(args.ini_dir, parser))
    try:
        try:
            config = load_config(layout, listen=args.listen, data_dir=args.data_dir)
            if args.command in ("status", "list", "delete"):
                code = {
                    "status": lambda: status(layout, config, args.json),
                    "list": lambda: list_savesets(config, args.json),
                    "delete": lambda: delete_savesets(config, args.savesets),
                }[args.command]()
                sys.stdout.flush()
                return code
            configure_logging()
            raise_open_files_limit(config.max_connections)
            daemon = Stpd(config)
            trio.run(run_daemon, daemon, args.pid_file)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
    except (ConfigError, PkiError, StoreError) as exc:
        print(f"stpd: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `stpd list | head`
        return reader_gone()
    except OutputError as exc:  # `stpd list > /dev/full`
        print(f"stpd: error: {output_failed(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename or ("listen address" if args.command == "run" else "")
        print(
            f"stpd: error: {exc.strerror or exc}{f' ({where})' if where else ''}", file=sys.stderr
        )
        return 2
    return 0
