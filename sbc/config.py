"""``SbcConfig``: everything the client reads from ``sm.ini``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pki.inifile import TIMEOUT_HINT, Key, choice, load_settings, timeout_seconds
from pki.layout import Layout
from stpd.config import stpd_address

SECONDS = 1.0
SSL_SECTION = "SBC_SSL"  # the original's section for the two flags
SECTION = "SBC"  # our further settings


def _flag(text: str) -> bool:
    return bool(choice(0, 1)(text))


def _fingerprint(text: str) -> str:
    digest = text.replace(":", "").strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(text)
    return digest


@dataclass(frozen=True)
class SbcConfig:
    layout: Layout
    client_ssl_auth: bool = True  # present x.509/client.pem
    server_verify: bool = True  # verify the server certificate and its names
    server: tuple[str, int] | None = None  # the STPD we talk to
    connect_timeout: float = 10 * SECONDS  # TCP connect and TLS handshake
    io_timeout: float = 60 * SECONDS  # no progress while sending or receiving
    server_fingerprint: str | None = None  # SHA-256 pin of the server certificate
    # Not ini keys, for `stpd status`, which reaches its own daemon on
    # 127.0.0.1 and pins its certificate: the names in it are not the host
    # we connect to (nor, for a wildcard, any host), so they are not checked;
    # and where that address comes from.
    check_names: bool = True
    server_from: str = "--server or SBC_SERVER in sm.ini"
    # What the pin is and what a mismatch means (stpd status pins ssl/server.pem).
    pinned: str = "the pinned SBC_SERVER_FINGERPRINT"
    pin_mismatch: str = (
        "update the pin only if the server certificate was renewed; the pin applies to "
        "every server sbc talks to, one given with --server too (an RDS has its own "
        "certificate: use an sm.ini without the pin for it, with --ini-dir)"
    )
    # Check the server certificate against ca/crl.pem. `stpd status` pins its
    # own, and its own CRL out of date would hide what stpd says of that.
    check_server_crl: bool = True


KEYS = [
    Key(
        SSL_SECTION,
        "SBC_CLIENT_SSL_AUTH",
        "client_ssl_auth",
        _flag,
        "0 or 1",
    ),
    Key(
        SSL_SECTION,
        "SBC_SSL_SERVER_VERIFY",
        "server_verify",
        _flag,
        "0 or 1",
    ),
    Key(SECTION, "SBC_SERVER", "server", stpd_address, "HOST or HOST:PORT of the STPD"),
    Key(SECTION, "SBC_CONNECT_TIMEOUT", "connect_timeout", timeout_seconds, TIMEOUT_HINT),
    Key(SECTION, "SBC_IO_TIMEOUT", "io_timeout", timeout_seconds, TIMEOUT_HINT),
    Key(
        SSL_SECTION,
        "SBC_SERVER_FINGERPRINT",
        "server_fingerprint",
        _fingerprint,
        "the server certificate's SHA-256 fingerprint, 64 hex digits (colons allowed)",
    ),
]


def load_config(layout: Layout, **overrides: Any) -> SbcConfig:
    """Read ``sm.ini`` of ``layout``; ``overrides`` (None values ignored)
    are what the operator gave on the command line."""
    return load_settings(SbcConfig(layout=layout), layout.sm_ini, KEYS, overrides)
