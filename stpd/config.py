"""``StpdConfig``: everything the daemon reads from ``stpd.ini``.

Command-line options override only what the operator gave; every other
value comes from the file, then from the defaults below (units in names).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pki.inifile import (
    MAX_DAYS,
    TIMEOUT_HINT,
    Key,
    choice,
    load_settings,
    parse_host_port,
    positive_int,
    timeout_seconds,
)
from pki.layout import Layout
from pki.names import SUBJECT_KEYS
from pki.tls import ClientCertPolicy

SECONDS = 1.0
STPD_HTTPS_PORT = 11443  # STPD's customary HTTPS port
MAX_REQUEST_TARGET = 8192  # characters: a longer request target is refused (400)
SECTION = "STPD_Server"


def stpd_address(text: str) -> tuple[str, int]:
    """HOST[:PORT] of an STPD, the port defaulting to STPD's HTTPS port."""
    return parse_host_port(text, STPD_HTTPS_PORT)


def _path(text: str) -> Path:
    if not text:
        raise ValueError(text)
    return Path(text)


def _whole_days(text: str) -> int:
    days = int(text)
    if not 0 <= days <= MAX_DAYS:
        raise ValueError(text)
    return days


def _allowed_clients(text: str) -> tuple[str, ...]:
    """FIELD:PATTERN items; empty, none (every valid client). A field that
    is not an --oid key, or an empty pattern, would match no certificate
    and so lock every client out without a word."""
    if not text:
        return ()
    items = tuple(item.strip() for item in text.split(","))
    for item in items:
        field, colon, pattern = item.partition(":")
        if not colon or field.strip().upper() not in SUBJECT_KEYS or not pattern.strip():
            raise ValueError(text)
    return items


@dataclass(frozen=True)
class StpdConfig:
    layout: Layout
    client_cert_policy: ClientCertPolicy = ClientCertPolicy.REQUIRE  # safe default: level 2
    listen: tuple[str, int] = ("0.0.0.0", STPD_HTTPS_PORT)
    data_dir: Path | None = None  # None: data/ beside the ini directory
    handshake_timeout: float = 10 * SECONDS
    header_timeout: float = 10 * SECONDS  # request line and headers must arrive within this
    idle_timeout: float = 60 * SECONDS  # keep-alive connection with no request
    io_timeout: float = 60 * SECONDS  # no progress while receiving or sending a body
    shutdown_grace: float = 30 * SECONDS  # SIGTERM: running transfers may finish within this
    max_connections: int = 64  # beyond it new clients get 503
    max_header_bytes: int = 16 * 1024  # request line + headers; larger gets 431
    allowed_clients: tuple[str, ...] = ()  # empty: every valid client identity
    retention_days: int = 0  # savesets older than this are removed; 0: kept for ever

    @property
    def saveset_dir(self) -> Path:
        return self.data_dir or self.layout.default_data_dir

    def describe_level(self) -> str:
        """The level in words, and the allow-list when there is one (the
        start and reload lines say what is in force)."""
        level = {
            0: "0 (client certificates not requested)",
            1: "1 (validated, invalid ones served with a warning)",
            2: "2 (validated, invalid ones refused)",
        }[int(self.client_cert_policy)]
        listed = ",".join(self.allowed_clients)
        if self.allowed_clients and self.client_cert_policy != ClientCertPolicy.IGNORE:
            level += f", only clients of STPD_ALLOWED_CLIENTS={listed}"
        elif self.allowed_clients:  # set, and it looks in force: it cannot be without certificates
            level += f", STPD_ALLOWED_CLIENTS={listed} not applied (it needs level 1 or 2)"
        return level


KEYS = [
    Key(
        SECTION,
        "STPD_HTTPS_USE_CLIENT_CERT",
        "client_cert_policy",
        lambda t: ClientCertPolicy(choice(0, 1, 2)(t)),
        "0, 1 or 2",
    ),
    Key(SECTION, "STPD_HTTPS_LISTEN", "listen", stpd_address, "HOST:PORT, e.g. 0.0.0.0:11443"),
    Key(SECTION, "STPD_DATA_DIR", "data_dir", _path, "a directory path"),
    Key(SECTION, "STPD_HANDSHAKE_TIMEOUT", "handshake_timeout", timeout_seconds, TIMEOUT_HINT),
    Key(SECTION, "STPD_HEADER_TIMEOUT", "header_timeout", timeout_seconds, TIMEOUT_HINT),
    Key(SECTION, "STPD_IDLE_TIMEOUT", "idle_timeout", timeout_seconds, TIMEOUT_HINT),
    Key(SECTION, "STPD_IO_TIMEOUT", "io_timeout", timeout_seconds, TIMEOUT_HINT),
    Key(SECTION, "STPD_SHUTDOWN_GRACE", "shutdown_grace", timeout_seconds, TIMEOUT_HINT),
    Key(SECTION, "STPD_MAX_CONNECTIONS", "max_connections", positive_int, "a whole number > 0"),
    Key(SECTION, "STPD_MAX_HEADER_BYTES", "max_header_bytes", positive_int, "a whole number > 0"),
    Key(
        SECTION,
        "STPD_RETENTION_DAYS",
        "retention_days",
        _whole_days,
        f"a whole number of days from 0 to {MAX_DAYS} (0: keep for ever)",
    ),
    Key(
        SECTION,
        "STPD_ALLOWED_CLIENTS",
        "allowed_clients",
        _allowed_clients,
        "empty, or comma-separated FIELD:PATTERN items, FIELD one of "
        + ", ".join(SUBJECT_KEYS)
        + " (e.g. CN:host1,CN:*.example.test)",
    ),
]


def load_config(layout: Layout, **overrides: Any) -> StpdConfig:
    """Read ``stpd.ini`` of ``layout``; ``overrides`` (None values ignored)
    are what the operator gave on the command line."""
    return load_settings(StpdConfig(layout=layout), layout.stpd_ini, KEYS, overrides)


def open_files_to_the_hard_limit() -> tuple[int, int]:
    """Raise the soft open files limit (often 1024) to the hard one (often
    far more): stpd for its connections, sbc for the directories a backup
    holds open (see sbc.archive.walk). Returns the soft limit before and
    after; ValueError or OSError when it cannot be raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    return soft, soft
