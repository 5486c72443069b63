"""Typed reading of ``sm.ini`` and ``stpd.ini``.

Both files are INI with values that may carry trailing ``#`` comments, as
in the original. Each program declares its keys once (:class:`Key`); an
unknown key in our sections or a bad value is a :class:`ConfigError` that
names the file, the key and what is allowed. Sections we do not own are
left alone: the real sesam files hold many more.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pki.files import unreadable

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration mistake; ``str()`` names file, key and the fix."""


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives, how it parses, what it means."""

    section: str
    name: str
    field: str  # the config dataclass field it sets
    parse: Callable[[str], Any]
    allowed: str  # words for the error message, e.g. "0, 1 or 2"


def choice(*values: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = int(text)
        if number not in values:
            raise ValueError(text)
        return number

    return parse


MAX_DAYS = 36500  # a century: days past it ran past the calendar's end, a traceback
MAX_SECONDS = 86400.0  # a day: beyond it a wait overflows poll()'s milliseconds and socket timeouts
TIMEOUT_HINT = "seconds > 0, at most 86400 (a day)"


def timeout_seconds(text: str) -> float:
    """A timeout (``TIMEOUT_HINT``)."""
    value = float(text)
    if not 0 < value <= MAX_SECONDS:  # also refuses nan and inf
        raise ValueError(text)
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def read_ini(path: Path, keys: Iterable[Key]) -> dict[str, Any]:
    """Values of ``keys`` found in ``path`` as ``{field: value}``; a missing
    file gives ``{}`` (every key has a default)."""
    keys = list(keys)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:  # not "missing": its settings would be dropped unseen
        raise ConfigError(unreadable(path, "configuration file", exc)) from None
    our_sections = {k.section for k in keys}
    # Files edited on Windows: Notepad may write a byte-order mark, and
    # comments may be in a legacy code page (a German "für"). Keys are
    # ASCII, so such bytes must not make the file unreadable; in a value
    # (a path) they pass through as the bytes they are.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    try:
        try:
            parser = _parse(text, path, strict=True)
        except configparser.DuplicateOptionError as exc:
            if exc.section in our_sections:  # which of the two was meant?
                raise ConfigError(
                    f"{path}: {exc.option} is set twice in [{exc.section}] (again on line "
                    f"{exc.lineno}): keep one"
                ) from None
            parser = _parse(text, path, strict=False)  # another program's section
        except configparser.DuplicateSectionError as exc:
            if exc.section in our_sections:  # merged, its later keys won without a word
                raise ConfigError(
                    f"{path}: section [{exc.section}] appears twice (again on line "
                    f"{exc.lineno}): keep one, with every key in it"
                ) from None
            parser = _parse(text, path, strict=False)
    except configparser.Error as exc:
        raise ConfigError(
            f"{path}: cannot be read as an INI file: {_bad_line(exc, text)}"
        ) from None
    by_upper = {section.upper(): section for section in our_sections}
    for section in parser.sections():
        ours = by_upper.get(section.upper())
        if ours is not None and section != ours:  # read as another program's, unseen
            raise ConfigError(
                f"{path}: section [{section}] is not read: write it as [{ours}] (section "
                "names are case-sensitive)"
            )
    by_name = {(k.section, k.name.upper()): k for k in keys}
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # field -> the key's name as written
    for section in our_sections:
        if not parser.has_section(section):
            continue
        for name, raw in parser.items(section):
            key = by_name.get((section, name.upper()))
            if key is None:
                known = ", ".join(sorted(k.name for k in keys if k.section == section))
                raise ConfigError(
                    f"{path}: unknown key {name} in [{section}] (known keys: {known})"
                )
            if key.field in spelled:  # the same key in another case: configparser keeps both
                raise ConfigError(
                    f"{path}: {key.name} is set twice in [{section}] (as {spelled[key.field]} "
                    f"and as {name}): keep one"
                )
            spelled[key.field] = name
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
                # An INI value is all that follows "=": STPD_DATA_DIR="/x" was
                # the directory ./"/x"/ under stpd's working directory.
                raise ConfigError(
                    f"{path}: [{section}] {key.name}={raw} has quotes around its value, which "
                    f"would be part of it: write it without quotes ({key.name}={raw[1:-1]})"
                )
            try:
                values[key.field] = key.parse(raw)
            except ValueError:
                raise ConfigError(
                    f"{path}: [{section}] {key.name}={raw!r} is not valid; allowed: {key.allowed}"
                ) from None
    return values


def _bad_line(exc: configparser.Error, text: str) -> str:
    """Where and what the line is that configparser could not read: its
    first line of message named only the file ("Source contains parsing
    errors: 'stpd.ini'")."""
    if isinstance(exc, configparser.MissingSectionHeaderError):  # (a ParsingError too)
        return f"line {exc.lineno} comes before any [SECTION] line: {exc.line.strip()!r}"
    if isinstance(exc, configparser.ParsingError):
        lineno = exc.errors[0][0]
        line = text.split("\n")[lineno - 1]  # configparser counts lines as "\n" ends them
        more = len(exc.errors) - 1
        also = f" (and {more} more line{'s' if more > 1 else ''} like it)" if more else ""
        return f"line {lineno} is neither [SECTION] nor KEY=VALUE: {line.strip()!r}{also}"
    return str(exc).splitlines()[0]


def _parse(text: str, path: Path, *, strict: bool) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        inline_comment_prefixes=("#", ";"), interpolation=None, strict=strict
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are upper case
    parser.read_string(text, source=str(path))
    return parser


def load_settings(defaults: T, path: Path, keys: Iterable[Key], overrides: dict[str, Any]) -> T:
    """``defaults`` (a frozen dataclass) with the values of ``path``, then
    the ``overrides`` the operator gave (None means "not given")."""
    values = read_ini(path, keys)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return dataclasses.replace(defaults, **values)  # type: ignore[type-var]


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``v6`` -> (host, port)."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):  # "[::1", "[::1]2222": no port dropped
            raise ValueError(text)
        port = _port(rest[1:]) if rest else default_port
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text)
    else:
        host, port = text, default_port
    if not host or not 0 <= port <= 65535 or not _could_be_host(host):
        raise ValueError(text)
    return host, port


def _port(text: str) -> int:
    """Digits only: int() also takes " 22", "+22", "2_2" and other scripts' digits."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def format_host_port(host: str, port: int) -> str:
    """HOST:PORT as parse_host_port reads it back: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _could_be_host(host: str) -> bool:
    """A name or an address: not a URL ("https://h:1" read as an IPv6
    host), nor "h,1" or "h/", which the resolver would only fail on later."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return not any(c in host for c in "/@,?#[] \t")
