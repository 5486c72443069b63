"""The inventory of issued certificates: ``ca/inventory.json`` beside the CA.

One JSON document lists every certificate the CA issued (serial, subject,
names, profile, validity, the path it was written to, and its status: valid,
revoked or superseded). It holds no secret, so it is written 0644.

Concurrent ``sm_ssl_cert`` runs must not lose each other's entries: every
change is a read-modify-write under an exclusive ``fcntl.flock`` on
``ca/inventory.lock`` (a separate file, because the JSON file itself is
replaced on every write), and the new document is written atomically
(``pki.files.write_public``). Readers that only look (``sm_ssl_cert list``)
need no lock: they always see one complete version.

This module knows nothing of keys or signing; ``pki.authority`` turns
certificates into :class:`Entry` objects and ``pki.crl`` turns revoked
entries into a CRL.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pki.errors import PkiError
from pki.files import ensure_directory, write_public
from pki.layout import Layout

FORMAT_VERSION = 1
PROFILES = ("ca", "server", "client")
STATUSES = ("valid", "revoked", "superseded")
LOCK_NAME = "inventory.lock"
LOCK_MODE = 0o644


def parse_serial(text: str) -> int:
    """A serial as ``sm_ssl_cert`` and ``openssl x509 -serial`` print it: hex,
    optionally with colons or a ``0x`` prefix, any case."""
    digits = text.strip().replace(":", "")
    if digits.lower().startswith("0x"):
        digits = digits[2:]
    if not digits or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(text)
    return int(digits, 16)


def serial_text(serial: int) -> str:
    """Upper-case hex with an even number of digits (``openssl x509 -serial``)."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC to the second, as every file and JSON answer of ours
    writes times: ``2026-11-28T07:10:06Z``."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Entry:
    """One issued certificate. Times are ISO 8601 UTC strings."""

    serial: str
    profile: str  # ca, server or client
    subject: str
    names: list[str]
    not_before: str
    not_after: str
    path: str  # where the certificate was written
    recorded_at: str  # when this entry was written
    sha256: str  # fingerprint, as openssl prints it (SBC_SERVER_FINGERPRINT takes it)
    status: str = "valid"
    revoked_at: str | None = None
    revocation_reason: str | None = None
    superseded_by: str | None = None
    moved_to: str | None = None  # where the file went when a newer one replaced it

    @property
    def serial_number(self) -> int:
        return int(self.serial, 16)

    @property
    def not_after_utc(self) -> datetime:
        return parse_timestamp(self.not_after)

    @property
    def not_before_utc(self) -> datetime:
        return parse_timestamp(self.not_before)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        if not isinstance(data, dict):
            raise ValueError("an entry is not an object")
        known = {f.name for f in fields(cls)}
        entry = cls(**{key: value for key, value in data.items() if key in known})
        parse_serial(entry.serial)
        parse_timestamp(entry.not_before)
        parse_timestamp(entry.not_after)
        if entry.profile not in PROFILES or entry.status not in STATUSES:
            raise ValueError(f"entry {entry.serial}: unknown profile or status")
        return entry


@dataclass
class Inventory:
    """The inventory as read from disk; change it only inside :func:`locked`."""

    path: Path
    entries: list[Entry] = field(default_factory=list)
    crl_number: int = 0  # the number of the last CRL written (RFC 5280 cRLNumber)
    changed: bool = False

    @classmethod
    def read(cls, layout: Layout) -> Inventory:
        """The current inventory (empty when there is none yet). No lock is
        needed to read: the file is only ever replaced whole."""
        path = layout.inventory
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
                raise ValueError(f"expected an object with format {FORMAT_VERSION}")
            entries = [Entry.from_json(item) for item in data.get("certificates", [])]
            crl_number = int(data.get("crl_number", 0))
        except (ValueError, TypeError) as exc:
            raise PkiError(
                f"inventory {path} is damaged ({exc}): restore it from a backup, or move it "
                "aside and sm_ssl_cert starts a new one (certificates it listed stay valid)"
            ) from None
        return cls(path, entries, crl_number)

    def find(self, serial: int) -> Entry | None:
        for entry in self.entries:
            if entry.serial_number == serial:
                return entry
        return None

    def add(self, entry: Entry) -> Entry:
        """Record ``entry``; a serial already recorded is kept as it is."""
        existing = self.find(entry.serial_number)
        if existing is not None:
            return existing
        self.entries.append(entry)
        self.changed = True
        return entry

    def revoked(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.status == "revoked"]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "crl_number": self.crl_number,
            "certificates": [entry.to_json() for entry in self.entries],
        }

    def save(self) -> None:
        data = json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"
        write_public(self.path, data.encode())
        self.changed = False


@contextmanager
def lock(layout: Layout) -> Iterator[None]:
    """Hold the exclusive lock beside the CA (``ca/inventory.lock``)."""
    ensure_directory(layout.ca_dir)
    fd = os.open(layout.ca_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        yield
    finally:
        os.close(fd)


@contextmanager
def locked(layout: Layout) -> Iterator[Inventory]:
    """Read the inventory under the exclusive lock and yield it; when the block
    ends without an exception and changed it, write it back before unlocking."""
    with lock(layout):
        inventory = Inventory.read(layout)
        yield inventory
        if inventory.changed:
            inventory.save()
