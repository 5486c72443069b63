"""``sbc``: back up to, restore from, and list savesets on an STPD."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from pki.console import (
    OutputError,
    as_tar_lists,
    expiry_in_words,
    in_days,
    one_line,
    output_failed,
    reader_gone,
    share_of,
    standard_streams,
)
from pki.errors import PkiError
from pki.inifile import ConfigError
from pki.layout import INI_DIR_HELP, Layout, path_argument, resolve_ini_dir, saveset_argument
from pki.tls import ANONYMOUS
from sbc.archive import ArchiveError, WalkOptions
from sbc.client import SbcError, Session
from sbc.config import SbcConfig, load_config
from sbc.progress import TransferProgress, backup_label, estimate_tar_bytes, wanted
from stpd import __version__
from stpd.config import open_files_to_the_hard_limit, stpd_address
from stpd.tarcheck import path_parts
from stpd.tlsconn import signals_end_waits


def _server(text: str) -> tuple[str, int]:
    try:
        return stpd_address(text)
    except ValueError:
        url = ", not a URL" if "://" in text else ""
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT]{url}, got {text!r}") from None


def _add_common_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The options every command takes, before the command or after it
    (`sbc --json status` and `sbc status --json` alike). Given after it,
    each is parsed by the command's parser, whose default is SUPPRESS so
    that one given before it stands."""
    parser.add_argument("--ini-dir", type=path_argument, default=default, help=INI_DIR_HELP)
    parser.add_argument(
        "--server",
        type=_server,
        default=default,
        help="HOST[:PORT] of the STPD (default: SBC_SERVER in sm.ini)",
    )
    flag = {} if default is None else {"default": default}
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON", **flag)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output", **flag)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="sbc", description="SEP sesam backup client over mutual TLS"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True)
    backup = commands.add_parser(
        "backup", parents=[common], help="back up a file or directory tree"
    )
    backup.add_argument("path", type=backup_source, help="the file or directory tree to back up")
    backup.add_argument(
        "--one-file-system",
        action="store_true",
        help="stay on PATH's file system: directories where another one is mounted are "
        "stored without their contents (as tar --one-file-system)",
    )
    backup.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out entries matching this shell pattern, and what is under them: "
        "without '/' it is matched against names ('*.tmp', '.cache'), with '/' against "
        "whole paths ('/home/*/Downloads'), or their ends if it does not begin with '/' "
        "('work/old'); may be repeated",
    )
    restore = commands.add_parser(
        "restore", parents=[common], help="restore a saveset into a directory"
    )
    restore.add_argument(
        "saveset", type=saveset_argument, help="the saveset id, as `sbc list` shows it"
    )
    restore.add_argument(
        "target_dir", type=path_argument, help="where to restore it (made if missing)"
    )
    restore.add_argument(
        "entries",
        nargs="*",
        default=[],  # else argparse names ENTRY among the missing arguments
        metavar="ENTRY",
        type=saveset_entry,
        help="restore only these entries and what is under them, named as stored: "
        "etc/hosts for a file of `sbc backup /etc` (default: everything)",
    )
    restore.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files that exist in the target (default: keep them, and say which)",
    )
    listing = commands.add_parser(
        "list", parents=[common], help="list this client's savesets, or one saveset's entries"
    )
    listing.add_argument(
        "saveset",
        nargs="?",
        type=saveset_argument,
        help="list the entries of this saveset (the names ENTRY takes)",
    )
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="have stpd check a saveset's stored data against the checksum taken at backup",
    )
    verify.add_argument(
        "saveset", type=saveset_argument, help="the saveset id, as `sbc list` shows it"
    )
    commands.add_parser("status", parents=[common], help="show the STPD's status")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, but ENTRY arguments of restore may follow its
    options too (`restore ID DIR --overwrite etc/hosts`): argparse takes a
    command's positionals only before them and leaves the rest over."""
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "restore" and not any(e.startswith("-") for e in extra):
        try:
            args.entries += [saveset_entry(raw) for raw in extra]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument ENTRY: {exc}")
        extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def saveset_entry(raw: str) -> str:
    """An ENTRY of ``sbc restore`` as stored: "/etc/hosts/" and "./etc/hosts"
    mean etc/hosts (members have relative names)."""
    name = "/".join(path_parts(raw))
    if not name:
        raise argparse.ArgumentTypeError(f"{raw!r} names no entry")
    return name


def backup_source(raw: str) -> Path:
    """PATH of ``sbc backup``, absolute. A trailing slash on a symbolic link
    means the directory it points to, as for tar and every POSIX tool (Path
    drops the slash, so it is looked at here)."""
    path = path_argument(raw).absolute()
    if (raw.endswith("/") and path.is_symlink()) or ".." in path.parts:
        # "dir/.." is the directory the kernel finds there (through links),
        # and its name is what members are stored under, not "..".
        return Path(os.path.realpath(path))
    return path


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-6) / 1e6:.1f} MB/s"


def _backup(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    source = args.path
    # The walk holds a directory open while what is under it is walked: in
    # a deep tree, as many as it is deep (sbc.archive.walk).
    with contextlib.suppress(ValueError, OSError):
        open_files_to_the_hard_limit()
    options = WalkOptions(one_file_system=args.one_file_system, exclude=tuple(args.exclude))
    started = time.monotonic()
    with TransferProgress(wanted(args.quiet, args.json), backup_label(source)) as progress:
        progress.estimate_total(lambda: estimate_tar_bytes(source, options))
        meta, stats = session.backup(source, progress, options)
    seconds = time.monotonic() - started
    result = {
        "saveset": meta["saveset"],
        "bytes": meta["bytes"],
        "sha256": meta["sha256"],
        "source": meta["source"],
        "created": meta["created"],
        "owner": meta.get("owner"),
        "server": session.where,
        "files": stats.files,
        "directories": stats.directories,
        "links": stats.links,
        "seconds": round(seconds, 3),
    }
    if stats.skipped:
        result["skipped"] = stats.skipped
    if stats.changed:
        result["changed"] = stats.changed
    if stats.unreadable:
        result["unreadable"] = [{"path": path, "error": what} for path, what in stats.unreadable]
    if source.is_symlink():  # backed up as a link, which a user seldom means
        # Said with --json too: nothing in the JSON shows it (links: 1).
        hint = (
            f"give {source}/ to back up the directory it points to"
            if source.is_dir()
            else "give the path it points to, to back that up"
        )
        _warn(
            f"{source} is a symbolic link (to {os.readlink(source)}): only the link is stored; {hint}"
        )
    if not args.json:
        for path in stats.skipped:
            _warn(f"skipped {path} (sockets and similar cannot be archived)")
        for path in stats.changed:
            _warn(
                f"{path} changed while it was read: stored at the size it had "
                "when the backup reached it (cut, or padded with zeros), and its copy may mix "
                "old and new contents; back it up again"
            )
        for path, what in stats.unreadable:
            _warn(f"could not read {path}: {what}")
        if (
            meta.get("owner") == ANONYMOUS
            and session.config.client_ssl_auth
            and session.certificate_asked
            and session.served_as_anonymous is None  # (else the session warned of it)
        ):
            # Level 1 serves a client whose certificate it refuses, as anyone.
            _warn(
                f"stpd at {session.where} did not accept our client certificate "
                "and stored this saveset as anonymous: every client without a valid "
                "certificate can list and restore it (the stpd log says why it refused the "
                "certificate)"
            )
        print(
            f"saveset {meta['saveset']} stored on {session.where}: {meta['bytes']} bytes, "
            f"{stats.files} file{'' if stats.files == 1 else 's'} in {seconds:.2f}s ({_rate(meta['bytes'], seconds)}), "
            f"sha256 {meta['sha256']}"
        )
    return result


def _restore(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    target = args.target_dir.absolute()
    # (os.path: False, not PermissionError, under a directory this user cannot
    # enter; making it below then says so with the target's name.)
    if os.path.exists(target) and not os.path.isdir(target):
        raise SbcError(f"cannot restore into {target}: it exists and is not a directory")
    # Made before the request, so that an unwritable place fails first.
    try:
        created = _make_directories(target)
    except OSError as exc:
        raise SbcError(
            f"cannot restore into {target}: {exc.strerror or exc} ({exc.filename or target})"
        ) from None
    started = time.monotonic()
    try:
        with TransferProgress(wanted(args.quiet, args.json), f"restore {args.saveset}") as progress:
            restored = session.restore(
                args.saveset, target, progress, overwrite=args.overwrite, only=args.entries
            )
        if args.entries and len(restored.not_found) == len(args.entries):
            raise SbcError(
                f"none of the entries asked for is in saveset {args.saveset}: "
                f"{', '.join(restored.not_found)}; `sbc list {args.saveset}` shows its entries, "
                "named as stored (etc/hosts for a file of `sbc backup /etc`)"
                f"{_escapes_hint(args.entries)}"
            )
    except BaseException:
        _remove_if_empty(created)  # a refused restore (a mistyped id) leaves nothing behind
        raise
    seconds = time.monotonic() - started
    if not args.json:
        for name in restored.skipped:
            _warn(f"not restored: device node {name}")
        for name in restored.not_found:
            _warn(f"not in saveset {args.saveset}: {name}{_escapes_hint([name])}")
        for names, reason in _by_reason(restored.unrestorable):
            if len(names) <= SHOWN_ONE_BY_ONE:
                for name in names:
                    _warn(f"could not restore {name}: {reason}")
            else:  # 5,000 links to one file not asked for: one line, not 5,000
                _warn(f"could not restore {len(names)} entries, each {reason}: {_some(names)}")
        if restored.kept:
            _warn(_kept_summary(restored.kept))
        if restored.kept_different:
            count = len(restored.kept_different)
            _warn(
                f"{count} of the files kept differ from the saveset's in size or "
                f"modification time: {_some(restored.kept_different)} (changed since the "
                "backup, or cut short by a restore that was killed; --overwrite replaces them)"
            )
        if restored.stale_removed:
            count = len(restored.stale_removed)
            _warn(
                f"removed {count} temporary file{'' if count == 1 else 's'} that an earlier sbc "
                f"restore left when it was killed: {_some(restored.stale_removed)}"
            )
        if restored.stale_left:
            count = len(restored.stale_left)
            _warn(
                f"left {count} path{'' if count == 1 else 's'} named like sbc's temporary files "
                f"that may not be stale ones of this user: {_some(restored.stale_left)} (another "
                "owner, another name of a file, not a plain file, or unreadable; remove them by hand once no sbc restore "
                "into this target is running)"
            )
        if restored.unprivileged:
            count = len(restored.unprivileged)
            _warn(
                f"restored {count} file{'' if count == 1 else 's'} without "
                "set-user-id or set-group-id bits or file capabilities, as no privilege comes "
                f"from a saveset: {_some(restored.unprivileged)} (give them back by hand where "
                "you trust the saveset: chmod u+s or g+s, setcap)"
            )
        entries = f"{restored.members} entries"
        if args.entries or restored.extracted != restored.members:  # (some kept, or skipped)
            entries = f"{restored.extracted} of {entries}"
        checked = (
            "sha256 verified"
            if restored.checked
            else "selected entries only, so the saveset's sha256 (of all of it) was not checked"
        )
        print(
            f"restored saveset {args.saveset} into {target}: {entries}, {restored.bytes} bytes "
            f"in {seconds:.2f}s ({_rate(restored.bytes, seconds)}), {checked}"
        )
    result: dict[str, Any] = {
        "saveset": args.saveset,
        "target": str(target),
        "bytes": restored.bytes,
        "members": restored.members,
        "extracted": restored.extracted,
        "sha256": restored.sha256 if restored.checked else None,
        "skipped": restored.skipped,
        "kept": restored.kept,
        "kept_different": restored.kept_different,
        "stale_removed": restored.stale_removed,
        "seconds": round(seconds, 3),
    }
    if restored.not_found:
        result["not_found"] = restored.not_found
    if restored.unprivileged:
        result["unprivileged"] = restored.unprivileged
    if restored.stale_left:
        result["stale_left"] = restored.stale_left
    if restored.unrestorable:
        result["unrestorable"] = [
            {"path": name, "error": reason} for name, reason in restored.unrestorable
        ]
    return result


def _make_directories(target: Path) -> list[Path]:
    """``mkdir -p target``: the directories it made, deepest first."""
    missing = []
    for path in (target, *target.parents):
        if path.exists():
            break
        missing.append(path)
    target.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first; one with anything in it stays
        try:
            directory.rmdir()
        except OSError:
            return


def _warn(text: str) -> None:
    """A warning line on stderr. Names in it may come from a saveset, which
    at levels 0 and 1 any client could have made: written on one line, and
    no escape sequence reaches the terminal (pki.console.one_line)."""
    print(f"sbc: warning: {one_line(text)}", file=sys.stderr)


SHOWN_ONE_BY_ONE = 3  # entries that share a reason not to be restored, each on its line


def _by_reason(refused: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """The names grouped by their reason, in the order the reasons came."""
    groups: dict[str, list[str]] = {}
    for name, reason in refused:
        groups.setdefault(reason, []).append(name)
    return [(names, reason) for reason, names in groups.items()]


def _some(names: list[str], shown: int = 5) -> str:
    """The first names of a long list, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _escapes_hint(names: list[str]) -> str:
    """For ENTRY names copied from `sbc list`, which shows bytes that are not
    UTF-8 and control characters escaped as tar does (\\351, \\n): the entry
    is matched as given, so such a name is to be given as its bytes."""
    if not any("\\" in name for name in names):
        return ""
    return (
        " (a name `sbc list` shows with escapes such as \\351 or \\n is matched by its own "
        "bytes: in bash give it as $'NAME', which reads the same escapes)"
    )


def _kept_summary(kept: list[str]) -> str:
    """The kept paths, apart from the entries left out under one of them
    (under a file or link where the saveset has a directory): those do not
    exist in the target, and counting them as existing paths misled."""
    names = set(kept)
    existing = [name for name in kept if not _under_one_of(names, name)]
    under = len(kept) - len(existing)
    plural, them = ("", "it") if len(existing) == 1 else ("s", "them")
    entries = "entry" if under == 1 else "entries"
    left_out = f", and left out the {under} {entries} of the saveset under {them}" if under else ""
    return (
        f"kept {len(existing)} existing path{plural} instead of restoring over {them}: "
        f"{_some(existing)}{left_out} (--overwrite replaces them)"
    )


def _under_one_of(names: set[str], name: str) -> bool:
    parts = name.split("/")
    return any("/".join(parts[:end]) in names for end in range(1, len(parts)))


def _list(session: Session, args: argparse.Namespace) -> list[dict[str, Any]] | None:
    if args.saveset is not None:
        _list_entries(session, args.saveset, args.json)
        return None  # printed as it came
    savesets = session.savesets()
    if not args.json:
        if not savesets:
            print(f"no savesets for this client on {session.where}")
        for item in savesets:
            source = one_line(item["source"])  # as its client sent it
            print(f"{item['saveset']}  {item['created']}  {item['bytes']:>14}  {source}")
    return list(savesets)


# As tar -tv shows an entry's type, and what leads to a link's target.
_TYPE_LETTERS = {"file": "-", "directory": "d", "symlink": "l", "hardlink": "h", "fifo": "p"}
_LINK_WORDS = {"symlink": " -> ", "hardlink": " link to "}


def _list_entries(session: Session, saveset: str, as_json: bool) -> None:
    """Each entry as it arrives (a saveset may hold millions): a line as
    ``tar -tv`` prints it, or, with ``as_json``, an element of one array."""
    separator = "[\n"
    for entry in session.entries(saveset):
        if as_json:
            print(separator + json.dumps(entry), end="")
            separator = ",\n"
            continue
        device = entry.get("device")
        letter = _TYPE_LETTERS.get(entry["type"], "?")
        size = entry["size"]
        if device:  # as tar -tv: its kind, and major,minor where the size would be
            letter, size = device["kind"][0], f"{device['major']},{device['minor']}"
        mode = letter + stat.filemode(int(entry["mode"], 8))[1:]
        link = _LINK_WORDS.get(entry["type"], "")
        target = f"{link}{as_tar_lists(entry.get('link', ''))}" if link else ""
        print(
            f"{mode} {as_tar_lists(entry['owner'])} {size:>12} {entry['mtime']} {as_tar_lists(entry['name'])}"
            f"{target}"
        )
    if as_json:
        print("[]" if separator == "[\n" else "\n]")


def _verify(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    verdict = session.verify(args.saveset)
    if not verdict["intact"]:
        if args.json:  # a script reads the verdict as the API gives it, beside the error
            print(json.dumps(verdict, indent=1), flush=True)
        raise SbcError(
            f"saveset {args.saveset} is damaged: its stored data is {verdict['bytes']} bytes "
            f"with sha256 {verdict['sha256']}, but was {verdict['recorded_bytes']} bytes with "
            f"sha256 {verdict['recorded_sha256']} when stored; restore from another saveset"
        )
    if not args.json:
        print(
            f"saveset {args.saveset} is intact: {verdict['bytes']} bytes, "
            f"sha256 {verdict['sha256']} as recorded when it was stored"
        )
    return verdict


def _status(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    status = session.status()
    missing = status.get("data_directory") == "missing"  # (an older stpd does not say)
    crl = status.get("crl") or {}
    crl_out_of_date = _crl_out_of_date(crl)
    # A script reads the status as the API gives it, beside the error.
    if args.json and (missing or crl_out_of_date):
        print(json.dumps(status, indent=1), flush=True)
    if not args.json:
        cert = status.get("server_certificate") or {}
        storage = status.get("storage") or {}
        if {"free_bytes", "total_bytes"} <= storage.keys():
            free = f", {share_of(storage['free_bytes'], storage['total_bytes'])} free for savesets"
        else:
            free = ", data directory missing" if missing else ""
        crl_text = ""
        if crl_out_of_date:
            crl_text = f", CRL out of date since {crl.get('next_update', '')}"
        elif "days_left" in crl:
            crl_text = f", CRL next update {in_days(crl['days_left'])}"
        print(
            f"stpd {status.get('version')} at {session.where}: level {status.get('level')}, "
            f"up {status.get('uptime_seconds')}s, {status.get('active_transfers')} active transfers, "
            f"certificate {cert.get('subject')} {_expiry(cert)}{crl_text}"
            f"{free}",
            flush=True,
        )
    if missing:  # exit status 1, for monitoring: stpd runs, but can store nothing
        raise SbcError(
            f"stpd at {session.where} has lost its data directory (its file system unmounted?): "
            "backups, listings and restores fail until it is there again and stpd restarted"
        )
    if crl_out_of_date:  # exit status 1 too: every client certificate now fails there
        raise SbcError(
            f"stpd at {session.where} has a CRL out of date since {crl.get('next_update')}: "
            "every client certificate fails validation there; write a new one with "
            "`sm_ssl_cert crl` where the CA key is and copy it into its ca/"
        )
    return dict(status)


def _expiry(cert: dict[str, Any]) -> str:
    """When the server certificate of a status ends, as stpd's log says
    it (its days_left is cut toward zero: 0 for 12 hours left or past)."""
    try:
        left = (
            dt.datetime.fromisoformat(cert["not_after"]) - dt.datetime.now(dt.UTC)
        ).total_seconds()
        return expiry_in_words(left / 86400)
    except (KeyError, TypeError, ValueError):  # (an older stpd, or a field missing)
        return f"expires in {cert.get('days_left')} days"


def _crl_out_of_date(crl: dict[str, Any]) -> bool:
    """Whether the CRL in force at stpd (its status's ``crl``) is past its
    next update, as stpd calls it: days_left is cut toward zero, so 0 is up
    to a day past too."""
    if "days_left" not in crl:
        return False
    next_update = str(crl.get("next_update", ""))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return bool(crl["days_left"] < 0 or (next_update and next_update <= now))


def _warn_loudly(message: str) -> None:
    """What Session warns of (an unverified server), to stderr. Not through
    logging: importing it cost every sbc start 3.5 ms."""
    print(f"sbc: WARNING: {message}", file=sys.stderr)


# The saveset was stored, but some paths could not be read (as restic's 3);
# or the restore ended, but some links or FIFOs could not be made, or some
# entries asked for were not in the saveset.
INCOMPLETE = 3

COMMANDS = {
    "backup": _backup,
    "restore": _restore,
    "list": _list,
    "verify": _verify,
    "status": _status,
}


def _run(config: SbcConfig, server: tuple[str, int], args: argparse.Namespace) -> Any:
    with Session(config, server, _warn_loudly) as session:
        return COMMANDS[args.command](session, args)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's time limit, a closed terminal),
    taken as Ctrl-C is: a restore then removes the file it was writing.
    Their default ended sbc at once and left that file, cut short, under
    its name, where the same restore run again kept it as restored."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped here, unless ignored (``nohup``)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (sbc's main() run in a thread, by tests)
        return
    signals = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) == signal.SIG_DFL]
    for number in signals:
        signal.signal(number, _stop)
    try:
        yield
    finally:
        for number in signals:
            signal.signal(number, signal.SIG_DFL)


# What an interrupted command leaves, said after "interrupted".
_AFTER_INTERRUPT = {
    "backup": ": stpd keeps nothing of a backup it did not receive whole (`sbc list` shows "
    "what was stored)",
    "restore": ": a file it was writing part-way was removed, what came before it stays; the "
    "same restore run again finishes it",
}


def main(
    argv: list[str] | None = None,
    *,
    adjust: Callable[[SbcConfig], SbcConfig] | None = None,
    prog: str = "sbc",
) -> int:
    """``adjust`` lets another program (``stpd status``) change the loaded
    configuration before use, and ``prog`` is the name its errors go by."""
    parser = build_parser()
    args = parse_arguments(parser, argv)
    layout = Layout(resolve_ini_dir(args.ini_dir, parser))
    try:
        config = load_config(layout)
        if adjust is not None:
            config = adjust(config)
        server = args.server or config.server
        if server is None:
            raise SbcError(
                f"no server given: pass --server HOST[:PORT] or set SBC_SERVER in [SBC] of {layout.sm_ini}"
            )
        if args.command == "backup":
            try:
                args.path.lstat()
            except FileNotFoundError:
                raise SbcError(f"nothing to back up: {args.path} does not exist") from None
            except OSError as exc:  # a directory above it closed to this user
                raise SbcError(
                    f"cannot back up {args.path}: this user cannot reach it ({exc.strerror})"
                ) from None
        with signals_end_waits(), _stop_signals_interrupt():
            result = _run(config, server, args)
    except (SbcError, ConfigError, PkiError, ArchiveError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return reader_gone()
    except OutputError as exc:  # `sbc list ID > /dev/full`
        print(f"{prog}: error: {output_failed(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        number = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        what = (
            "interrupted"
            if number == signal.SIGINT
            else f"stopped by {signal.Signals(number).name}"
        )
        print(f"{prog}: {what}{_AFTER_INTERRUPT.get(args.command, '')}", file=sys.stderr)
        return 128 + number
    if args.json and result is not None:
        try:
            print(json.dumps(result, indent=1), flush=True)
        except BrokenPipeError:
            return reader_gone()
        except OSError as exc:  # a full disk: the work itself was done
            print(f"{prog}: error: {output_failed(exc)}", file=sys.stderr)
            return 1
    if isinstance(result, dict) and any(
        result.get(key) for key in ("unreadable", "unrestorable", "not_found")
    ):
        return INCOMPLETE
    return 0


def run() -> NoReturn:
    """The ``sbc`` command: ``main``, then a quick exit. Python's own
    shutdown (collecting every module's objects) costs about 40 ms, a
    fifth of a short sbc run, and has nothing left to do by then: the
    connection is closed and every restored file written and closed. Only
    the standard streams are flushed here: the output that main() left in
    stdout's buffer may fail to go out only now."""
    standard_streams()
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = reader_gone()
    except OSError as exc:  # `sbc status > /dev/full`
        print(f"sbc: error: {output_failed(exc)}", file=sys.stderr)
        code = code or 1
    try:
        sys.stderr.flush()
    except OSError:
        sys.exit(code)
    os._exit(code)
