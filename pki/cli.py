"""``sm_ssl_cert``: create the root CA and issue server and client certificates."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from cryptography import x509

from pki.authority import (
    CA_VALIDITY_DAYS,
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    LEAF_VALIDITY_DAYS,
    RSA_KEY_SIZE,
    CertificateAuthority,
    IssuedCert,
    format_name,
    format_serial,
    move_old_server_keys,
)
from pki.errors import PkiError
from pki.layout import DEFAULT_INI_DIR, INI_DIR_ENV, Layout, resolve_ini_dir

PROG = "sm_ssl_cert"
EXIT_ERROR = 2
KEY_DESCRIPTIONS = {"ec": "ECDSA P-256", "rsa": f"RSA {RSA_KEY_SIZE} bit"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    layout = Layout(resolve_ini_dir(getattr(args, "ini_dir", None)))
    try:
        args.run(layout, args, sys.stdout)
    except PkiError as exc:
        return _fail(str(exc))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(
            f"{exc.strerror or exc}{where} (check --ini-dir / {INI_DIR_ENV} and the "
            "permissions of that directory)"
        )
    return 0


def _fail(message: str) -> int:
    one_line = " ".join(message.split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)
    return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    # --ini-dir is accepted before and after the command; SUPPRESS keeps the
    # subcommand's default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--ini-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"ini directory (default: ${INI_DIR_ENV}, else {DEFAULT_INI_DIR})",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Create the SEP sesam root CA and issue server and client certificates.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = commands.add_parser(
        "ca",
        parents=[common],
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
        parents=[common],
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
        "--path", type=Path, metavar="DIR", help="write into DIR instead of ssl/ (for an RDS)"
    )
    _add_key_options(server, LEAF_VALIDITY_DAYS)
    server.set_defaults(run=_run_server)

    client = commands.add_parser(
        "client",
        parents=[common],
        help="issue x.509/client.pem and x.509/client.key",
        description="Issue a client certificate (clientAuth) signed by the root CA.",
    )
    client.add_argument(
        "--oid",
        metavar="OPTIONS",
        help="subject as KEY:VALUE,... with keys C CN DQ GN GQ I L N O OU P PC S T "
        "(default: CN=<this machine's host name>)",
    )
    client.add_argument("--path", type=Path, metavar="DIR", help="write into DIR instead of x.509/")
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
    return parser


def _add_key_options(parser: argparse.ArgumentParser, default_days: int) -> None:
    parser.add_argument(
        "--days",
        type=_positive_int,
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} days: give at least 1")
    return value


# -- commands ----------------------------------------------------------------------


def _run_ca(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    ca = CertificateAuthority.create(
        layout, days=args.days, key_type=args.key_type, force=args.force
    )
    for path in ca.moved_aside:
        print(f"moved aside: {path}", file=out)
    print(f"wrote root CA key:         {layout.ca_key} (mode 0600)", file=out)
    print(f"wrote root CA certificate: {layout.ca_cert}", file=out)
    _describe(out, ca.cert, args.days, args.key_type)
    print(
        "next: issue certificates with `sm_ssl_cert server --common-name=...` and "
        "`sm_ssl_cert client`; then keep rootCA.key off the server (only issuing needs it)",
        file=out,
    )


def _run_server(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    ca = CertificateAuthority.load(layout)
    issued = ca.issue_server(
        args.common_name, out_dir=args.path, days=args.days, key_type=args.key_type
    )
    _print_issued(out, "server", issued, args.days, args.key_type)
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
    ca = CertificateAuthority.load(layout)
    issued = ca.issue_client(args.oid, out_dir=args.path, days=args.days, key_type=args.key_type)
    _print_issued(out, "client", issued, args.days, args.key_type)
    print(
        f"next: copy {issued.cert_path.name}, {issued.key_path.name} (into x.509/) and "
        "rootCA.pem (into ca/) to each client",
        file=out,
    )


def _run_clean_ssl(layout: Layout, args: argparse.Namespace, out: TextIO) -> None:
    moved = move_old_server_keys(layout)
    if not moved:
        print(f"nothing to move: no *.key or *.pem in {layout.server_dir}", file=out)
    for path in moved:
        print(f"moved aside: {path}", file=out)


def _print_issued(out: TextIO, profile: str, issued: IssuedCert, days: int, key_type: str) -> None:
    for path in issued.moved_aside:
        print(f"moved aside: {path}", file=out)
    print(f"wrote {profile} key:         {issued.key_path} (mode 0600)", file=out)
    print(f"wrote {profile} certificate: {issued.cert_path}", file=out)
    _describe(out, issued.cert, days, key_type)


def _describe(out: TextIO, cert: x509.Certificate, days: int, key_type: str) -> None:
    expires = cert.not_valid_after_utc
    print(f"  subject:     {format_name(cert.subject)}", file=out)
    print(f"  issuer:      {format_name(cert.issuer)}", file=out)
    print(f"  serial:      {format_serial(cert.serial_number)}", file=out)
    print(f"  key:         {KEY_DESCRIPTIONS[key_type]}", file=out)
    print(
        f"  valid until: {expires:%Y-%m-%d %H:%M} UTC ({days} days; --days changes it)",
        file=out,
    )
