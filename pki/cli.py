"""``sm_ssl_cert``: create the root CA, issue, renew and revoke certificates,
and list what was issued."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509

from pki.authority import (
    CA_RENEWAL,
    CA_REPLACEMENT,
    CA_VALIDITY_DAYS,
    CLOCK_HINT,
    DEFAULT_KEY_TYPE,
    EXPIRY_WARNING_DAYS,
    KEY_TYPES,
    LEAF_VALIDITY_DAYS,
    PROFILES,
    RSA_KEY_SIZE,
    CertificateAuthority,
    IssuedCert,
    days_left,
    format_fingerprint,
    format_name,
    format_serial,
    inventory_entry,
    key_description,
    move_old_server_keys,
    read_certificate,
)
from pki.console import (
    OutputError,
    expiry_in_words,
    in_days,
    one_line,
    output_failed,
    reader_gone,
    standard_streams,
)
from pki.crl import (
    CRL_VALIDITY_DAYS,
    CRL_WARNING_DAYS,
    DEFAULT_REASON,
    REASONS,
    CrlState,
    CrlWritten,
    read_crl,
    revoke,
    write_crl,
)
from pki.errors import PkiError
from pki.files import open_to_others, read_passphrase
from pki.inifile import MAX_DAYS
from pki.inventory import Entry, Inventory, timestamp
from pki.layout import INI_DIR_ENV, INI_DIR_HELP, Layout, path_argument, resolve_ini_dir
from pki.names import certificate_names
from stpd import __version__  # of the whole distribution (pyproject reads it there)

PROG = "sm_ssl_cert"
EXIT_ERROR = 2
_WARNING_WINDOW = timedelta(days=CRL_WARNING_DAYS)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sm_ssl_cert`` command; ``argv`` (not None) runs it within a
    program, with that program's standard streams as they are."""
    if argv is None:
        standard_streams()
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        layout = Layout(resolve_ini_dir(getattr(args, "ini_dir", None), parser))
    except SystemExit as exc:  # usage errors and --help: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        args.run(layout, args, sys.stdout)
        sys.stdout.flush()
    except PkiError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        return reader_gone()
    except OutputError as exc:  # (not the ini directory's fault)
        return _fail(output_failed(exc))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(
            f"{exc.strerror or exc}{where} (check --ini-dir / {INI_DIR_ENV} and the "
            "permissions of that directory)"
        )
    return 0


def _fail(message: str) -> int:
    text = " ".join(message.split())
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    # --ini-dir is accepted before and after the command; SUPPRESS keeps the
    # subcommand's default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--ini-dir",
        metavar="DIR",
        type=path_argument,
        default=argparse.SUPPRESS,
        help=INI_DIR_HELP,
    )
    # Every command that signs reads the root CA key, which may be encrypted.
    signing = argparse.ArgumentParser(add_help=False)
    signing.add_argument(
        "--passphrase-file",
        type=path_argument,
        metavar="FILE",
        help="the passphrase of ca/rootCA.key is the first line of FILE (mode 0600); "
        "with `ca`, the new key is encrypted with it",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Create the SEP sesam root CA and issue server and client certificates.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = commands.add_parser(
        "ca",
        parents=[common, signing],
        help="create ca/rootCA.pem and ca/rootCA.key",
        description="Create the self-signed root CA. Refuses to replace an existing one "
        "unless --force is given (the old files are then moved aside).",
    )
    ca.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA; every certificate it issued stops working",
    )
    _add_key_options(ca, CA_VALIDITY_DAYS)
    ca.set_defaults(run=_run_ca)

    server = commands.add_parser(
        "server",
        parents=[common, signing],
        help="issue ssl/server.pem and ssl/server.key",
        description="Issue a server certificate (serverAuth) signed by the root CA.",
    )
    server.add_argument(
        "--common-name",
        required=True,
        metavar="NAMES",
        help="comma-separated host names, IP addresses, *.domain.tld and a.b.c.* wildcards; "
        "the first is the subject CN",
    )
    server.add_argument(
        "--path",
        type=path_argument,
        metavar="DIR",
        help="write into DIR instead of ssl/ (for an RDS)",
    )
    _add_key_options(server, LEAF_VALIDITY_DAYS)
    server.set_defaults(run=_run_server)

    client = commands.add_parser(
        "client",
        parents=[common, signing],
        help="issue x.509/client.pem and x.509/client.key",
        description="Issue a client certificate (clientAuth) signed by the root CA.",
    )
    client.add_argument(
        "--oid",
        metavar="OPTIONS",
        help="subject as KEY:VALUE,... with keys C CN DQ GN GQ I L N O OU P PC S T "
        "(default: CN=<this machine's host name>)",
    )
    client.add_argument(
        "--path", type=path_argument, metavar="DIR", help="write into DIR instead of x.509/"
    )
    _add_key_options(client, LEAF_VALIDITY_DAYS)
    client.set_defaults(run=_run_client)

    clean = commands.add_parser(
        "clean-ssl",
        parents=[common],
        help="move old keys and certificates in ssl/ aside",
        description="Rename every ssl/*.key and ssl/*.pem to <name>.old-<UTC time>; "
        "nothing is deleted.",
    )
    clean.set_defaults(run=_run_clean_ssl)

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="list issued certificates (ca/inventory.json) with days to expiry",
        description="List every certificate recorded in ca/inventory.json: serial, profile, "
        "status (valid, REVOKED, superseded; EXPIRED marked), expiry and days left. Warns "
        f"when the CRL's next update is past or within {CRL_WARNING_DAYS} days. Needs no "
        "CA key.",
    )
    listing.add_argument("--json", action="store_true", help="print machine-readable JSON")
    listing.set_defaults(run=_run_list)

    revoking = commands.add_parser(
        "revoke",
        parents=[common, signing],
        help="revoke a certificate and write ca/crl.pem",
        description="Mark a certificate revoked in the inventory and write the signed CRL "
        f"ca/crl.pem (next update in {CRL_VALIDITY_DAYS} days). STPD refuses a revoked "
        "client certificate (level 2) or serves it as anonymous with a warning (level 1).",
    )
    revoking.add_argument(
        "target",
        type=_revoke_target,
        metavar="SERIAL|CERT_FILE",
        help="the serial in hex (as `list` prints it) or the certificate file (a relative "
        "path is taken from the current directory, not from the ini directory)",
    )
    revoking.add_argument(
        "--reason",
        default=DEFAULT_REASON,
        metavar="R",
        help="RFC 5280 reason: " + ", ".join(REASONS) + f" (default: {DEFAULT_REASON})",
    )
    revoking.set_defaults(run=_run_revoke)

    crl = commands.add_parser(
        "crl",
        parents=[common, signing],
        help="write ca/crl.pem again (a new next update)",
        description="Sign and write the CRL ca/crl.pem from the inventory. A CRL past its "
        "next update makes STPD refuse every client certificate: run this regularly "
        "(e.g. weekly from cron) and copy the file to every STPD.",
    )
    crl.add_argument(
        "--days",
        type=_days,
        default=CRL_VALIDITY_DAYS,
        metavar="N",
        help=f"days until the next update (default: {CRL_VALIDITY_DAYS})",
    )
    crl.set_defaults(run=_run_crl)

    renew = commands.add_parser(
        "renew",
        parents=[common, signing],
        help="re-issue the server or client certificate with the same subject and names",
        description="Issue a new certificate with the subject and names of the current one "
        "in ssl/ (server), x.509/ (client) or --path DIR, and a new key unless --keep-key. "
        "The old files are moved aside and the old certificate is marked superseded.",
    )
    renew.add_argument("profile", choices=PROFILES, help="which certificate to renew")
    renew.add_argument(
        "--path",
        type=path_argument,
        metavar="DIR",
        help="the certificate is in DIR (e.g. for an RDS)",
    )
    renew.add_argument(
        "--keep-key", action="store_true", help="keep the current key (the key file is untouched)"
    )
    renew.add_argument(
        "--days",
        type=_days,
        default=LEAF_VALIDITY_DAYS,
        metavar="N",
        help=f"validity in days (default: {LEAF_VALIDITY_DAYS})",
    )
    renew.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default=None,
        help="algorithm of the new key (default: that of the current certificate)",
    )
    renew.set_defaults(run=_run_renew)
    return parser


def _add_key_options(parser: argparse.ArgumentParser, default_days: int) -> None:
    parser.add_argument(
        "--days",
        type=_days,
        default=default_days,
        metavar="N",
        help=f"validity in days (default: {default_days})",
    )
    parser.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default=DEFAULT_KEY_TYPE,
        help=f"key algorithm: ec = ECDSA P-256, rsa = RSA {RSA_KEY_SIZE} bit for old peers "
        f"(default: {DEFAULT_KEY_TYPE})",
    )


def _passphrase(args: argparse.Namespace) -> bytes | None:
    path = args.passphrase_file
    return None if path is None else read_passphrase(path)


def _encrypted_key(path: Path) -> bool:
    """Whether the PEM key file ``path`` is encrypted (PKCS#8 or the
    traditional form); False when there is none."""
    try:
        head = path.read_bytes()[:200]
    except OSError:
        return False
    return b"ENCRYPTED" in head


def _signing_ca(layout: Layout, args: argparse.Namespace) -> CertificateAuthority:
    """The CA, to sign with. Its key open to other users of this machine is
    said first: whoever reads it can issue certificates every stpd trusts
    (stpd and sbc say the same of their own keys)."""
    ca = CertificateAuthority.load(layout, _passphrase(args))
    loose = open_to_others(layout.ca_key, "root CA key")
    if loose is not None:
        print(f"{PROG}: warning: {loose}", file=sys.stderr)
    now = datetime.now(UTC)
    if ca.cert.not_valid_before_utc > now:  # (an expired one is refused where it issues)
        print(
            f"{PROG}: warning: the root CA {layout.ca_cert} is valid only from "
            f"{ca.cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC, and this machine's clock says "
            f"{now:%Y-%m-%d %H:%M} UTC ({CLOCK_HINT}): what it signs fails verification "
            '("certificate is not yet valid") until then',
            file=sys.stderr,
        )
    return ca


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} days: give at least 1")
    if value > MAX_DAYS:
        raise argparse.ArgumentTypeError(f"{text} days: give at most {MAX_DAYS} (a century)")
    return value


# -- commands ----------------------------------------------------------------------


def _run_ca(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    was_encrypted = _encrypted_key(layout.ca_key)
    ca = CertificateAuthority.create(
        layout,
        days=args.days,
        key_type=args.key_type,
        force=args.force,
        passphrase=_passphrase(args),
    )
    for path in ca.moved_aside:
        print(f"moved aside: {path}", file=out)
    encrypted = ", encrypted with the passphrase" if args.passphrase_file else ""
    print(f"wrote root CA key:         {layout.ca_key} (mode 0600{encrypted})", file=out)
    if was_encrypted and not args.passphrase_file:
        print(
            f"{PROG}: warning: the new {layout.ca_key} is NOT encrypted, unlike the one moved "
            "aside: to encrypt it, run `ca --force --passphrase-file FILE` again, or "
            "`openssl pkey -aes256` (README, encrypted rootCA.key)",
            file=sys.stderr,
        )
    print(f"wrote root CA certificate: {layout.ca_cert}", file=out)
    _describe(out, ca.cert, args.days)
    if ca.moved_aside:  # a CA replaced: nothing the old one issued is trusted any more
        print(
            "next: every certificate of the old CA is now refused, so re-issue them all: this "
            "server's (`sm_ssl_cert server --common-name=...`), each RDS's (with --path) and "
            "each client's (`sm_ssl_cert client --oid ... --path ...`); copy the new "
            "ca/rootCA.pem to every server and client and remove the old CA's ca/crl.pem there; "
            "then move rootCA.key and its old copy (.old-...) off this server",
            file=out,
        )
        return
    print(
        f"next: issue certificates with {layout.command('server --common-name=...')} and "
        f"{layout.command('client')}; then keep rootCA.key off the server (only issuing "
        "needs it)",
        file=out,
    )


def _run_server(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    ca = _signing_ca(layout, args)
    # Without --path it replaces this machine's own: an RDS's certificate
    # issued so (--path forgotten) took the backup server's place unsaid.
    replaced = read_certificate(layout.server_cert) if args.path is None else None
    issued = ca.issue_server(
        args.common_name, out_dir=args.path, days=args.days, key_type=args.key_type
    )
    _print_issued(out, "server", issued, args.days)
    if replaced is not None and set(certificate_names(replaced)) != set(issued.names):
        print(
            f"{PROG}: warning: this replaced the certificate of this machine's stpd "
            f"({', '.join(certificate_names(replaced))}) in {layout.server_dir}, moved aside "
            "as shown: for another server (an RDS), issue with --path DIR and move the old "
            "files back; else send this stpd SIGHUP",
            file=sys.stderr,
        )
    print(f"  names:       {', '.join(issued.names)}", file=out)
    wildcards = [name for name in issued.names if name.endswith(".*")]
    if wildcards:
        print(
            f"note: IP wildcards ({', '.join(wildcards)}) are honoured by sbc only; "
            "curl, browsers and openssl never match an IP address against them",
            file=out,
        )
    if args.path is not None:
        print(
            f"next: copy {issued.cert_path.name} and {issued.key_path.name} into ssl/ of "
            "the RDS, and rootCA.pem into its ca/",
            file=out,
        )


def _run_client(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    ca = _signing_ca(layout, args)
    issued = ca.issue_client(args.oid, out_dir=args.path, days=args.days, key_type=args.key_type)
    _print_issued(out, "client", issued, args.days)
    print(
        f"next: copy {issued.cert_path.name}, {issued.key_path.name} (into x.509/) and "
        "rootCA.pem (into ca/) to the client it is for (each client has its own)",
        file=out,
    )


def _run_clean_ssl(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    moved = move_old_server_keys(layout)
    if not moved:
        print(f"nothing to move: no *.key or *.pem in {layout.server_dir}", file=out)
    for path in moved:
        print(f"moved aside: {path}", file=out)


def _run_list(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    inventory = Inventory.read(layout)
    entries = list(inventory.entries)
    ca_cert = read_certificate(layout.ca_cert)
    if ca_cert is None and not entries and not layout.inventory.exists():
        raise PkiError(
            f"nothing to list: no inventory at {layout.inventory} and no root CA at "
            f"{layout.ca_cert}; check --ini-dir, or create the CA with " + layout.command("ca")
        )
    # The CA is recorded with the first certificate it issues; show it before that too.
    if ca_cert is not None and inventory.find(ca_cert.serial_number) is None:
        entries.insert(0, inventory_entry(ca_cert, "ca", layout.ca_cert))
    now = datetime.now(UTC)
    warnings: list[str] = []
    try:
        crl = read_crl(layout)
    except PkiError as exc:
        crl = None
        warnings.append(str(exc))
    warnings += _crl_warnings(layout, entries, crl, now)
    found = _found_at_paths(entries)
    rows = [_list_row(entry, now, found) for entry in entries]
    warnings += _expiry_warnings(entries, layout, now, found)
    if args.json:
        document = {
            "inventory": str(layout.inventory),
            "certificates": rows,
            "crl": _crl_json(crl, now),
            "warnings": warnings,
        }
        print(json.dumps(document, indent=1), file=out)
    else:
        _print_table(out, layout, rows)
    for warning in warnings:
        print(f"{PROG}: warning: {' '.join(warning.split())}", file=sys.stderr)


def _run_revoke(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    ca = _signing_ca(layout, args)
    result = revoke(ca, args.target, args.reason)
    entry = result.entry
    what = f"serial {entry.serial} ({entry.profile} {entry.subject}, {entry.path})"
    if result.already:
        print(
            f"{what} was already revoked on {entry.revoked_at} ({entry.revocation_reason}); "
            "the CRL was written again",
            file=out,
        )
    else:
        print(f"revoked {what}: {entry.revocation_reason}", file=out)
    _print_crl(out, layout, result.crl)


def _run_crl(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    ca = _signing_ca(layout, args)
    _print_crl(out, layout, write_crl(ca, days=args.days))


def _run_renew(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    ca = _signing_ca(layout, args)
    issued = ca.renew(
        args.profile,
        out_dir=args.path,
        keep_key=args.keep_key,
        days=args.days,
        key_type=args.key_type,
    )
    profile = args.profile
    revoked = issued.superseded_revoked
    if issued.superseded:
        was = f"was revoked ({revoked})" if revoked else "is superseded"
        print(f"renewed {profile} certificate: serial {issued.superseded} {was}", file=out)
    _print_issued(out, profile, issued, args.days)
    if issued.names:
        print(f"  names:       {', '.join(issued.names)}", file=out)
    if profile == "server":
        where = (
            f"copy {issued.cert_path.name} and {issued.key_path.name} into ssl/ of the RDS and "
            "send its stpd SIGHUP (systemctl reload stpd)"
            if args.path is not None
            else "send stpd SIGHUP (systemctl reload stpd)"
        )
        print(
            f"next: {where} so that it presents the new certificate; sbc clients that pin it "
            f"need SBC_SERVER_FINGERPRINT={format_fingerprint(issued.cert)}",
            file=out,
        )
    else:
        old_one = (
            "the old certificate stays revoked"
            if revoked
            else "the old certificate stays valid until it expires (revoke it with "
            f"{layout.command(f'revoke {shlex.quote(str(issued.superseded))}')} if it must "
            "stop working now)"
        )
        print(
            f"next: copy {issued.cert_path.name} and {issued.key_path.name} into x.509/ of the "
            f"client; {old_one}",
            file=out,
        )


def _revoke_target(raw: str) -> str:
    """An empty SERIAL|CERT_FILE is a script's unset variable: a usage error
    (it read as the current directory, ".")."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("empty: give a serial (as `list` prints it) or a file")
    return raw


def _print_crl(out: TextIO, layout: Layout, written: CrlWritten) -> None:
    print(
        f"wrote CRL {written.path}: number {written.number}, {written.revoked} revoked "
        f"certificate{'s' if written.revoked != 1 else ''}, next update "
        f"{written.next_update:%Y-%m-%d %H:%M} UTC",
        file=out,
    )
    if written.carried:
        print(
            f"{PROG}: warning: {written.carried} of them only the previous CRL listed, not the "
            f"inventory {layout.inventory} (it was begun anew?): they stay revoked",
            file=sys.stderr,
        )
    print(
        f"next: copy {written.path.name} into ca/ of every STPD (the backup server and each "
        f"RDS), where it takes effect at the next connection; write it again before {written.next_update:%Y-%m-%d} with "
        f"{layout.command('crl')} (an out-of-date CRL makes stpd refuse "
        "every client certificate)",
        file=out,
    )


# -- list --------------------------------------------------------------------------


def _found_at_paths(entries: list[Entry]) -> dict[str, int | None]:
    """The serial of the certificate now at each path the inventory names
    (None: none there). Files are moved by hand too: a superseded one put
    back in place is in use again, and a valid one may have been replaced."""
    found: dict[str, int | None] = {}
    for entry in entries:
        if entry.path not in found:
            cert = read_certificate(Path(entry.path))
            found[entry.path] = None if cert is None else cert.serial_number
    return found


def _in_use(entry: Entry, found: dict[str, int | None]) -> bool:
    """Valid, or superseded but back at its path (see _found_at_paths)."""
    back = entry.status == "superseded" and found.get(entry.path) == entry.serial_number
    return entry.status == "valid" or back


def _expiry_warnings(
    entries: list[Entry], layout: Layout, now: datetime, found: dict[str, int | None]
) -> list[str]:
    """Certificates in use (see _in_use) that expired or expire soon."""
    warnings = []
    for entry in entries:
        left = days_left(entry.not_after_utc, now)
        if not _in_use(entry, found) or left >= EXPIRY_WARNING_DAYS:
            continue
        what = f"{entry.profile} certificate {entry.subject} (serial {entry.serial}, {entry.path})"
        if entry.profile == "ca":
            renew = CA_RENEWAL if left > 0 else f"a root CA is not renewed: {CA_REPLACEMENT}"
        else:  # where it was issued (--path DIR), or renew would renew the local one
            where = Path(entry.path).parent
            usual = layout.server_dir if entry.profile == "server" else layout.client_dir
            path = "" if where == usual else f" --path {shlex.quote(str(where))}"
            renew = f"renew it with {layout.command(f'renew {entry.profile}{path}')}"
        warnings.append(f"{what} {expiry_in_words(left)}: {renew}")
    return warnings


def _list_row(entry: Entry, now: datetime, found: dict[str, int | None]) -> dict[str, Any]:
    row = entry.to_json()
    row["days_left"] = int(days_left(entry.not_after_utc, now))  # -3: expired 3 days ago
    row["expired"] = entry.not_after_utc <= now
    row["not_yet_valid"] = entry.not_before_utc > now
    # What is at its path now: this certificate, another one, or nothing
    # (a client's, copied to its machine, may well be gone from here).
    there = found.get(entry.path)
    row["at_path"] = "this" if there == entry.serial_number else "other" if there else "none"
    return row


def _status_text(row: dict[str, Any]) -> str:
    if row["status"] == "revoked":
        text = f"REVOKED ({row['revocation_reason']})"
    elif row["status"] == "superseded":
        text = "superseded, but at its path again" if row["at_path"] == "this" else "superseded"
    elif row["at_path"] == "other":
        text = "replaced at its path"
    else:
        text = "" if row["expired"] or row["not_yet_valid"] else "valid"
    marks = [text] if text else []
    if row["expired"]:
        marks.append("EXPIRED")
    if row["not_yet_valid"]:
        marks.append("not yet valid")
    return ", ".join(marks)


def _print_table(out: TextIO, layout: Layout, rows: list[dict[str, Any]]) -> None:
    counts = {
        "revoked": sum(row["status"] == "revoked" for row in rows),
        "superseded": sum(row["status"] == "superseded" for row in rows),
        "expired": sum(row["expired"] for row in rows),
    }
    summary = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    print(
        f"{len(rows)} certificate{'s' if len(rows) != 1 else ''} in {layout.inventory}"
        + (f" ({summary})" if summary else ""),
        file=out,
    )
    header = ("SERIAL", "PROFILE", "STATUS", "EXPIRES", "DAYS", "SUBJECT", "PATH")
    table = [header] + [
        (
            row["serial"],
            row["profile"],
            _status_text(row),
            row["not_after"][:10],
            str(row["days_left"]),
            # (a subject recorded before sm_ssl_cert refused control characters)
            one_line(row["subject"] + (f" [{', '.join(row['names'])}]" if row["names"] else "")),
            one_line(row["path"] if row["at_path"] == "this" else row["moved_to"] or row["path"]),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]), file=out)


def _crl_warnings(
    layout: Layout, entries: list[Entry], crl: CrlState | None, now: datetime
) -> list[str]:
    command = layout.command("crl")
    fix = f"{command} and copy it to every STPD"
    revoked = [entry for entry in entries if entry.status == "revoked"]
    if crl is None:
        if revoked and not layout.crl.exists():
            return [
                f"{len(revoked)} revoked certificate(s) but no CRL at {layout.crl}, so no STPD "
                f"refuses them: write it with {fix}"
            ]
        return []
    warnings = []
    if crl.next_update is None or crl.next_update <= now:
        since = f" since {crl.next_update:%Y-%m-%d %H:%M} UTC" if crl.next_update else ""
        warnings.append(
            f"the CRL {crl.path} is out of date{since} (its next update has passed): stpd then "
            f"refuses every client certificate; write a new one now with {fix}"
        )
    elif crl.next_update - now <= _WARNING_WINDOW:
        warnings.append(
            f"the CRL {crl.path} must be written again before its next update "
            f"{in_days(days_left(crl.next_update, now))} ({crl.next_update:%Y-%m-%d %H:%M} UTC), "
            f"or every client certificate fails validation: run {command} (e.g. weekly from "
            "cron) and copy it to every STPD"
        )
    missing = [entry.serial for entry in revoked if entry.serial_number not in crl.revoked_serials]
    if missing:
        warnings.append(
            f"revoked certificate(s) {', '.join(missing)} are not on the CRL {crl.path}: "
            f"write it again with {fix}"
        )
    return warnings


def _crl_json(crl: CrlState | None, now: datetime) -> dict[str, Any] | None:
    if crl is None:
        return None
    return {
        "path": str(crl.path),
        "number": crl.number,
        "last_update": timestamp(crl.last_update),
        "next_update": timestamp(crl.next_update) if crl.next_update else None,
        "days_left": int(days_left(crl.next_update, now)) if crl.next_update else None,
        "revoked": sorted(format_serial(serial) for serial in crl.revoked_serials),
    }


# -- output --------------------------------------------------------------------------


def _print_issued(out: TextIO, profile: str, issued: IssuedCert, days: int) -> None:
    for path in issued.moved_aside:
        print(f"moved aside: {path}", file=out)
    if issued.key_written:
        print(f"wrote {profile} key:         {issued.key_path} (mode 0600)", file=out)
    else:
        print(f"kept {profile} key:          {issued.key_path} (--keep-key)", file=out)
    print(f"wrote {profile} certificate: {issued.cert_path}", file=out)
    _describe(out, issued.cert, days)
    print(f"  sha256:      {format_fingerprint(issued.cert)}", file=out)


def _describe(out: TextIO, cert: x509.Certificate, days: int) -> None:
    expires = cert.not_valid_after_utc
    print(f"  subject:     {format_name(cert.subject)}", file=out)
    print(f"  issuer:      {format_name(cert.issuer)}", file=out)
    print(f"  serial:      {format_serial(cert.serial_number)}", file=out)
    print(f"  key:         {key_description(cert)}", file=out)
    asked = f"{days} days; --days changes it"
    if expires < datetime.now(UTC) + timedelta(days=days - 1):  # cut at the CA's end
        asked = (
            f"not the {days} days asked for: the root CA ends then, and every certificate with it"
        )
    print(f"  valid until: {expires:%Y-%m-%d %H:%M} UTC ({asked})", file=out)
