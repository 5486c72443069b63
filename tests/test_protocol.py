"""STPD's decisions without sockets: ``judge_peer`` and ``refused_handshake``
(the level table), ``identity_allowed``, ``route`` (the HTTP API), and the
saveset store on disk."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import stpd.store
from pki.tls import NO_HANDSHAKE_REASON, ClientCertPolicy
from stpd.protocol import (
    ANONYMOUS,
    MAX_SOURCE_CHARS,
    Download,
    Entries,
    ListSavesets,
    Metadata,
    Reject,
    Status,
    Upload,
    Verify,
    identity_allowed,
    judge_peer,
    refused_handshake,
    route,
)
from stpd.store import (
    INCOMING,
    SAVESET_ID,
    InvalidArchive,
    Prepared,
    SavesetMeta,
    SavesetStore,
    StoreError,
    saveset_entries,
)
from tests.conftest import Pki, read_only_directory, tar_bytes

PEER = "127.0.0.1:40000"
IGNORE, WARN, REQUIRE = ClientCertPolicy.IGNORE, ClientCertPolicy.WARN, ClientCertPolicy.REQUIRE
SS = "SS-20260101T120000Z-0123abcd"


@pytest.fixture
def client_cert(pki: Pki) -> x509.Certificate:
    return pki.ca.issue_client("CN:host1,O:Example Corp,OU:Backup", out_dir=pki.root / "c").cert


# -- judge_peer ------------------------------------------------------------------


@pytest.mark.parametrize("with_cert", [True, False])
@pytest.mark.parametrize("problems", [[], ["certificate has expired"]])
def test_level_0_serves_everyone_anonymously(
    client_cert: x509.Certificate, with_cert: bool, problems: list[str]
) -> None:
    decision = judge_peer(PEER, IGNORE, client_cert if with_cert else None, problems)
    assert decision.serve
    assert decision.owner == ANONYMOUS
    assert decision.log_level == logging.INFO
    assert decision.message == f"client {PEER} connected (level 0)"


@pytest.mark.parametrize("policy", [WARN, REQUIRE])
def test_valid_certificate_is_authenticated(
    client_cert: x509.Certificate, policy: ClientCertPolicy
) -> None:
    decision = judge_peer(PEER, policy, client_cert, [])
    assert decision.serve
    assert decision.owner == "OU=Backup,O=Example Corp,CN=host1"
    assert decision.log_level == logging.INFO
    assert decision.message == f"client {PEER} authenticated as OU=Backup,O=Example Corp,CN=host1"


def test_level_1_without_certificate_warns_and_serves_anonymous() -> None:
    decision = judge_peer(PEER, WARN, None, [])
    assert decision.serve and decision.owner == ANONYMOUS
    assert decision.log_level == logging.WARNING
    assert decision.message == (
        f"client {PEER}: invalid client certificate: no client certificate presented; "
        "served as anonymous (STPD_HTTPS_USE_CLIENT_CERT=1)"
    )


def test_level_1_invalid_certificate_names_subject_and_every_problem(
    client_cert: x509.Certificate,
) -> None:
    problems = ["certificate has expired", "not signed by our root CA"]
    decision = judge_peer(PEER, WARN, client_cert, problems)
    assert decision.serve and decision.owner == ANONYMOUS
    assert decision.log_level == logging.WARNING
    assert decision.message == (
        f"client {PEER} (OU=Backup,O=Example Corp,CN=host1): invalid client certificate: "
        "certificate has expired; not signed by our root CA; "
        "served as anonymous (STPD_HTTPS_USE_CLIENT_CERT=1)"
    )


def test_level_2_without_certificate_refuses() -> None:
    decision = judge_peer(PEER, REQUIRE, None, [])
    assert not decision.serve
    assert decision.log_level == logging.ERROR
    assert decision.message == (
        f"refused client {PEER}: no client certificate presented (STPD_HTTPS_USE_CLIENT_CERT=2)"
    )


def test_level_2_invalid_certificate_refuses(client_cert: x509.Certificate) -> None:
    decision = judge_peer(PEER, REQUIRE, client_cert, ["certificate has been revoked"])
    assert not decision.serve
    assert decision.log_level == logging.ERROR
    assert decision.message == (
        f"refused client {PEER} (OU=Backup,O=Example Corp,CN=host1): "
        "certificate has been revoked (STPD_HTTPS_USE_CLIENT_CERT=2)"
    )


@pytest.mark.parametrize(
    ("policy", "serve", "level"), [(WARN, True, logging.WARNING), (REQUIRE, False, logging.ERROR)]
)
def test_identity_outside_the_allow_list(
    client_cert: x509.Certificate, policy: ClientCertPolicy, serve: bool, level: int
) -> None:
    decision = judge_peer(PEER, policy, client_cert, [], ("CN:host2", "O:Other*"))
    assert decision.serve is serve
    assert decision.owner == ANONYMOUS
    assert decision.log_level == level
    assert (
        "client identity OU=Backup,O=Example Corp,CN=host1 is not in STPD_ALLOWED_CLIENTS"
        in decision.message
    )
    # The refused client's answer: the reason, without the address the log adds.
    assert decision.refusal == (
        ""
        if serve
        else "client identity OU=Backup,O=Example Corp,CN=host1 is not in STPD_ALLOWED_CLIENTS "
        "(STPD_HTTPS_USE_CLIENT_CERT=2)"
    )


def test_identity_inside_the_allow_list(client_cert: x509.Certificate) -> None:
    decision = judge_peer(PEER, REQUIRE, client_cert, [], ("CN:host2", "O:Example*"))
    assert decision.serve and decision.owner == "OU=Backup,O=Example Corp,CN=host1"


def test_problems_win_over_the_allow_list(client_cert: x509.Certificate) -> None:
    decision = judge_peer(PEER, REQUIRE, client_cert, ["certificate has expired"], ("CN:host1",))
    assert not decision.serve
    assert "certificate has expired" in decision.message


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        ((), True),
        (("CN:host1",), True),
        (("cn:HOST1",), True),  # field and value are case-insensitive
        ((" CN : host1 ",), True),  # spaces around field and pattern
        (("CN:host*",), True),
        (("CN:h?st1",), True),
        (("CN:*.example.test",), False),
        (("CN:host",), False),  # whole value, not a prefix
        (("CN:host10",), False),
        (("O:Example Corp",), True),
        (("OU:Backup",), True),
        (("OU:Back",), False),
        (("O:Example",), False),
        (("L:Berlin",), False),  # field not in the subject
        (("CN:other", "OU:Backup"), True),  # any item
        (("CN:other", "O:nope"), False),
    ],
)
def test_identity_allowed(
    client_cert: x509.Certificate, allowed: tuple[str, ...], expected: bool
) -> None:
    assert identity_allowed(client_cert, allowed) is expected


# -- refused_handshake -------------------------------------------------------------


def test_level_2_handshake_without_certificate_uses_our_words() -> None:
    decision = refused_handshake(PEER, REQUIRE, "peer did not return a certificate")
    assert not decision.serve
    assert decision.log_level == logging.ERROR
    assert decision.message == (
        f"refused client {PEER}: no client certificate presented (STPD_HTTPS_USE_CLIENT_CERT=2)"
    )


def test_level_2_handshake_refusal_keeps_the_verdict() -> None:
    decision = refused_handshake(PEER, REQUIRE, "certificate has expired")
    assert decision.log_level == logging.ERROR
    assert decision.message == (
        f"refused client {PEER}: certificate has expired (STPD_HTTPS_USE_CLIENT_CERT=2)"
    )


def test_level_2_handshake_refusal_names_the_refused_subject() -> None:
    decision = refused_handshake(PEER, REQUIRE, "certificate has expired", "O=Example,CN=laptop1")
    assert decision.message == (
        f"refused client {PEER} (O=Example,CN=laptop1): certificate has expired "
        "(STPD_HTTPS_USE_CLIENT_CERT=2)"
    )


@pytest.mark.parametrize("policy", [IGNORE, WARN])
def test_handshake_failure_below_level_2_is_a_warning(policy: ClientCertPolicy) -> None:
    decision = refused_handshake(PEER, policy, "wrong version number")
    assert not decision.serve
    assert decision.log_level == logging.WARNING
    assert decision.message == f"TLS handshake with {PEER} failed: wrong version number"


@pytest.mark.parametrize("policy", [IGNORE, WARN, REQUIRE])
@pytest.mark.parametrize(
    ("reason", "meaning"),
    [
        ("tlsv1 alert unknown ca", "does not trust our server certificate"),
        ("sslv3 alert certificate expired", "says our server certificate has expired"),
        ("sslv3 alert bad certificate", "rejected our server certificate"),
        ("tlsv1 alert decode error", "aborted the handshake"),
    ],
)
def test_an_alert_from_the_client_is_the_client_giving_up(
    policy: ClientCertPolicy, reason: str, meaning: str
) -> None:
    decision = refused_handshake(PEER, policy, reason)
    assert not decision.serve
    assert decision.log_level == logging.WARNING
    assert decision.message.startswith(f"TLS handshake with {PEER} failed: the client {meaning}")
    assert decision.message.endswith(f"({reason})")
    assert "refused" not in decision.message


@pytest.mark.parametrize("policy", [IGNORE, WARN, REQUIRE])
def test_a_connection_closed_before_its_hello_is_an_info_line(policy: ClientCertPolicy) -> None:
    decision = refused_handshake(PEER, policy, NO_HANDSHAKE_REASON)
    assert not decision.serve
    assert decision.log_level == logging.INFO
    assert (
        decision.message == f"connection from {PEER} closed without a TLS handshake (a port check?)"
    )


# -- route -------------------------------------------------------------------------


def reject(action: object) -> Reject:
    assert isinstance(action, Reject), action
    return action


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("GET", "/status", Status()),
        ("GET", "/status/", Status()),
        ("GET", "/savesets", ListSavesets()),
        ("GET", "/savesets?", ListSavesets()),  # an empty query is no parameter
        ("GET", "/status?", Status()),
        ("PUT", "/savesets?source=/home/user", Upload("/home/user")),
        ("POST", "/savesets?source=/home/user", Upload("/home/user")),
        ("PUT", "/savesets?source=%2Fhome%2Fa%20b%2B%C3%BC", Upload("/home/a b+ü")),
        ("PUT", "/savesets?source=/home/a+b", Upload("/home/a+b")),  # not a form's space
        ("PUT", "/savesets?source=/a%2Bb+c%20d", Upload("/a+b+c d")),
        # ".." is fine in a source: it is a label for what was backed up.
        ("PUT", "/savesets?source=/home/../etc", Upload("/home/../etc")),
        ("PUT", "/savesets?source=..", Upload("..")),
        ("PUT", "/savesets?source=relative/path", Upload("relative/path")),
        ("GET", f"/savesets/{SS}", Download(SS)),
        ("GET", f"/savesets/{SS}/", Download(SS)),
        ("GET", f"/savesets/{SS}?entry=etc/hosts", Download(SS, ("etc/hosts",))),
        ("GET", f"/savesets/{SS}?entry=a%20b&entry=%C3%BC/", Download(SS, ("a b", "ü/"))),
        (
            "GET",
            f"/savesets/{SS}?entry=a+b&entry=c%2Bd",
            Download(SS, ("a+b", "c+d")),
        ),  # as source=
        ("GET", f"/savesets/{SS}/meta", Metadata(SS)),
        ("GET", f"/savesets/{SS}/entries", Entries(SS)),
        ("GET", f"/savesets/{SS}/verify", Verify(SS)),
        ("HEAD", "/status", Status()),  # GET's answer without the body
        ("HEAD", "/savesets", ListSavesets()),
        ("HEAD", f"/savesets/{SS}", Download(SS)),
        ("HEAD", f"/savesets/{SS}/verify", Verify(SS)),
        ("GET", "https://stpd.example.test:11443/status", Status()),  # absolute form
        # Every segment is percent-decoded alike; empty ones do not count.
        ("GET", "/%73tatus", Status()),
        ("GET", f"/%73avesets/{SS.replace('S', '%53')}/meta", Metadata(SS)),
        ("GET", "//status", Status()),  # not a host named "status"
        ("GET", "//savesets//?", ListSavesets()),
    ],
)
def test_route_actions(method: str, target: str, expected: object) -> None:
    assert route(method, target) == expected


def test_source_at_the_length_limit_is_accepted() -> None:
    source = "/" + "a" * (MAX_SOURCE_CHARS - 1)
    assert route("PUT", f"/savesets?source={source}") == Upload(source)


@pytest.mark.parametrize(
    ("method", "target", "status", "message"),
    [
        ("POST", "/status", 405, "use GET /status"),
        ("PUT", "/status", 405, "use GET /status"),
        ("DELETE", "/savesets", 405, "use GET, PUT or POST on /savesets"),
        ("HEAD", "/savesets?source=/x", 400, "unknown query parameter 'source'"),
        ("PUT", f"/savesets/{SS}", 405, "use GET on a saveset"),
        ("DELETE", f"/savesets/{SS}", 405, "use GET on a saveset"),
        ("POST", f"/savesets/{SS}/meta", 405, "use GET on a saveset"),
        ("PUT", f"/savesets/{SS}/entries", 405, "use GET on a saveset"),
        ("GET", "/", 404, "no such resource '/'"),
        ("GET", "/nope", 404, "no such resource '/nope'"),
        ("PUT", "/nope", 404, "no such resource '/nope'"),
        ("GET", "/status/more", 404, "no such resource '/status/more'"),
        ("GET", f"/savesets/{SS}/data", 404, f"no such resource '/savesets/{SS}/data'"),
        ("GET", f"/savesets/{SS}?source=/x", 400, "unknown query parameter 'source'"),
        # README: 400 for an unknown query parameter, on every route
        ("GET", "/status?foo=1", 400, "unknown query parameter 'foo'"),
        ("GET", "/status?foo", 400, "malformed query string"),
        ("GET", "/savesets?foo=1", 400, "unknown query parameter 'foo'"),
        ("GET", "/savesets?source=/x", 400, "unknown query parameter 'source'"),
        ("GET", "/savesets?ignored", 400, "malformed query string"),
        ("GET", f"/savesets/{SS}/meta?x=1", 400, "unknown query parameter 'x'"),
        ("GET", f"/savesets/{SS}/entries?entry=a", 400, "unknown query parameter 'entry'"),
        ("GET", f"/savesets/{SS}/verify?b=1&a=2", 400, "unknown query parameter 'a'"),
        ("POST", "/status?foo=1", 405, "use GET /status"),  # the method is wrong first
        ("GET", f"/savesets/{SS}/data?x=1", 404, f"no such resource '/savesets/{SS}/data'"),
        (
            "GET",
            f"/savesets/{SS}?entry=",
            400,
            "invalid entry name (empty, a NUL byte or longer than 4096 characters)",
        ),
        (
            "GET",
            f"/savesets/{SS}?entry=a%00b",
            400,
            "invalid entry name (empty, a NUL byte or longer than 4096 characters)",
        ),
        ("GET", f"/savesets/{SS}?entry", 400, "malformed query string"),
        ("GET", f"/savesets/{SS}/meta/x", 404, f"no such resource '/savesets/{SS}/meta/x'"),
        ("PUT", "/savesets", 400, "missing query parameter source=PATH"),
        ("PUT", "/savesets?source=", 400, "missing query parameter source=PATH"),
        ("PUT", "/savesets?source=/a&x=1", 400, "unknown query parameter 'x'"),
        ("PUT", "/savesets?path=/a", 400, "unknown query parameter 'path'"),
        ("PUT", "/savesets?source=/a&source=/b", 400, "'source' given more than once"),
        ("PUT", "/savesets?source", 400, "malformed query string"),
        ("PUT", "/savesets?source=%ff", 400, "malformed query string"),  # not UTF-8
        ("PUT", "/savesets?" + "&".join(["source=/a"] * 9), 400, "malformed query string"),
        ("PUT", "/savesets?source=/a%00b", 400, "invalid source path"),
        ("PUT", "/savesets?source=" + "a" * (MAX_SOURCE_CHARS + 1), 400, "invalid source path"),
        ("GET", "/status%00", 400, "invalid request target"),
        ("GET", "/savesets/" + "%00", 400, "invalid request target"),
        ("GET", "/savesets?source=" + "a" * 8192, 400, "invalid request target"),
    ],
)
def test_route_rejects(method: str, target: str, status: int, message: str) -> None:
    rejected = reject(route(method, target))
    assert rejected.status == status
    assert message in rejected.message


@pytest.mark.parametrize(
    "target", ["/status", "/savesets", f"/savesets/{SS}", f"/savesets/{SS}/meta"]
)
def test_a_405_allows_just_the_methods_the_resource_takes(target: str) -> None:
    """RFC 9110: a 405 carries Allow."""
    allow = reject(route("DELETE", target)).allow.split(", ")
    for method in ("GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"):
        action = route(method, target)
        refused = isinstance(action, Reject) and action.status == 405
        assert refused == (method not in allow), (method, target)


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "%2e%2e",
        f"{SS}%2F..",
        f"..%2F{SS}",
        f"{SS}%2Fmeta",
        f"{SS}%0A",  # "$" would match before a trailing newline
        SS.upper(),
        SS[:-1],
        SS + "0",
        "SS-20260101T120000Z-0123abc!",
        "anything",
    ],
)
@pytest.mark.parametrize("suffix", ["", "/meta", "/entries"])
def test_route_rejects_bad_saveset_names(name: str, suffix: str) -> None:
    rejected = reject(route("GET", f"/savesets/{name}{suffix}"))
    assert rejected.status == 400
    assert rejected.message.startswith("invalid saveset name")


def test_saveset_id_pattern() -> None:
    assert SAVESET_ID.match(SS)
    for bad in (SS + "\n", "\n" + SS, SS + "/..", f"../{SS}"):
        assert not SAVESET_ID.match(bad), repr(bad)


# -- the saveset store --------------------------------------------------------------


def without_end_blocks(data: bytes) -> bytes:
    """The archive up to its last member's data: no end-of-archive blocks."""
    content = len(data.rstrip(b"\0"))
    return data[: -(-content // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE]


@pytest.fixture
def store(tmp_path: Path) -> SavesetStore:
    store = SavesetStore(tmp_path / "data")
    assert store.prepare() == Prepared(created=True, removed=[])
    return store


def test_a_relative_data_directory_is_named_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stpd.ini's STPD_DATA_DIR=data, or the default beside a relative
    --ini-dir: the log lines and warnings then say where that is."""
    monkeypatch.chdir(tmp_path)
    store = SavesetStore(Path("data"))
    assert store.root == tmp_path / "data"
    assert store.incoming.parent == tmp_path / "data"


def files_in(store: SavesetStore) -> list[str]:
    return sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*"))


def upload(store: SavesetStore, data: bytes, owner: str = "CN=a", source: str = "/src"):  # type: ignore[no-untyped-def]
    up = store.begin(owner, source, PEER)
    # Pieces of awkward sizes, as they come off the network.
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    up.write(pieces[:3])
    up.write(pieces[3:])
    return up


def test_saveset_entries_read_back_long_unicode_names_owners_and_links(store: SavesetStore) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link in (
            ("d", tarfile.DIRTYPE, ""),
            ("d/" + "ü" * 120, tarfile.REGTYPE, ""),
            ("d/l", tarfile.SYMTYPE, "/etc/localtime"),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, 0o640
            info.mtime = 10**12 if kind == tarfile.SYMTYPE else 0  # year 33658: PAX
            info.uid, info.gid, info.uname = 4321, 5432, "alice"
            data = b"12345" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    meta = upload(store, buffer.getvalue()).commit()
    assert list(saveset_entries(store.tar_path(meta.saveset))) == [
        {"name": "d", "type": "directory", "size": 0, "mode": "0640", "owner": "alice/5432",
         "mtime": "1970-01-01T00:00:00Z"},
        {"name": "d/" + "ü" * 120, "type": "file", "size": 5, "mode": "0640",
         "owner": "alice/5432", "mtime": "1970-01-01T00:00:00Z"},
        {"name": "d/l", "type": "symlink", "size": 0, "mode": "0640", "owner": "alice/5432",
         "mtime": "1000000000000", "link": "/etc/localtime"},
    ]  # fmt: skip


def test_prepare_creates_a_private_incoming_directory(store: SavesetStore) -> None:
    assert store.incoming.is_dir()
    assert store.incoming.stat().st_mode & 0o777 == 0o700
    assert files_in(store) == [INCOMING]


def test_commit_publishes_tar_and_metadata(store: SavesetStore) -> None:
    data = tar_bytes({"a.txt": b"hello\n", "b/c.bin": os.urandom(5000)})
    up = upload(store, data, owner="CN=host1", source="/home/../etc")
    assert files_in(store) == [INCOMING, f"{INCOMING}/{up.saveset}.tar.part"]
    assert store.all() == []  # nothing visible before the commit
    meta = up.commit()
    up.abort()  # a no-op after a commit (the server always calls it)
    assert SAVESET_ID.match(meta.saveset)
    assert files_in(store) == [INCOMING, f"{meta.saveset}.json", f"{meta.saveset}.tar"]
    tar = store.tar_path(meta.saveset)
    assert tar.read_bytes() == data
    assert tar.stat().st_mode & 0o777 == 0o600
    assert meta.bytes == len(data)
    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    assert (meta.owner, meta.source, meta.peer) == ("CN=host1", "/home/../etc", PEER)
    assert meta.started.endswith("Z") and meta.finished.endswith("Z")
    assert meta.started <= meta.finished == meta.created
    on_disk = json.loads((store.root / f"{meta.saveset}.json").read_text())
    assert on_disk == {k: v for k, v in meta.to_json().items() if k != "created"}
    assert meta.to_json()["created"] == meta.finished
    with tarfile.open(tar) as archive:
        assert archive.getnames() == ["a.txt", "b/c.bin"]


def failing_replace(monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """os.replace fails with EIO where it would make a ``suffix`` file in
    the data directory (a failing disk); every other rename goes on."""
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith(suffix) and Path(dst).parent.name == "data":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def failing_directory_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync_dir(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(stpd.store, "_fsync_dir", fsync_dir)


@pytest.mark.parametrize("failing", ["tar rename", "metadata rename", "directory fsync"])
def test_a_publish_that_fails_leaves_neither_file(
    store: SavesetStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A saveset is listed by its metadata: left without its tar, a client
    would see it in `sbc list` and fail to restore it."""
    if failing == "directory fsync":
        failing_directory_fsync(monkeypatch)  # after both renames
    else:
        failing_replace(monkeypatch, ".tar" if failing == "tar rename" else ".json")
    up = upload(store, tar_bytes({"a.txt": b"hello\n"}))
    with pytest.raises(StoreError) as error:
        up.commit()
    assert error.value.status == 500
    assert str(error.value) == "cannot store the saveset: Input/output error"
    assert files_in(store) == [INCOMING]
    assert store.all() == []


def test_metadata_that_cannot_be_removed_keeps_its_tar(
    store: SavesetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Undoing a failed publish, the metadata is removed first; when even
    that fails the saveset stays listed, so its tar stays too: both or neither."""
    failing_directory_fsync(monkeypatch)
    real = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path.suffix == ".json":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    up = upload(store, tar_bytes({"a.txt": b"hello\n"}))
    with pytest.raises(StoreError, match="cannot store the saveset: Input/output error"):
        up.commit()
    [meta] = store.all()
    assert files_in(store) == [INCOMING, f"{meta.saveset}.json", f"{meta.saveset}.tar"]
    assert store.tar_path(meta.saveset).stat().st_size == meta.bytes


def test_abort_leaves_nothing(store: SavesetStore) -> None:
    up = upload(store, tar_bytes({"a.txt": b"x" * 10_000}))
    up.abort()
    up.abort()
    assert files_in(store) == [INCOMING]
    assert store.all() == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not a tar archive\n" * 100, id="text"),
        pytest.param(tar_bytes({"a.txt": b"x" * 10_000})[:5000], id="truncated"),
        pytest.param(without_end_blocks(tar_bytes({"a.txt": b"x" * 10_000})), id="no-end"),
    ],
)
def test_invalid_tar_is_rejected_and_leaves_nothing(store: SavesetStore, data: bytes) -> None:
    up = store.begin("CN=a", "/src", PEER)
    with pytest.raises(InvalidArchive) as error:
        try:
            up.write([data[:700], data[700:]])
            up.commit()
        finally:
            up.abort()  # what the server does when write() raises
    assert error.value.status == 400
    assert "not a valid tar stream" in str(error.value)
    assert "nothing stored" in str(error.value)
    assert files_in(store) == [INCOMING]
    assert store.all() == []


def test_damaged_header_checksum_is_rejected(store: SavesetStore) -> None:
    data = bytearray(tar_bytes({"a.txt": b"hello\n"}))
    index = data.index(b"a.txt")
    data[index] = ord("b")  # the header no longer matches its checksum
    up = store.begin("CN=a", "/src", PEER)
    with pytest.raises(InvalidArchive):
        up.write([bytes(data)])
        up.commit()
    up.abort()
    assert files_in(store) == [INCOMING]


def backdated(store: SavesetStore, meta: SavesetMeta, finished: str) -> None:
    """Rewrite a saveset's metadata as if it had finished at ``finished``."""
    path = store.root / f"{meta.saveset}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "finished": finished}))


def test_a_listing_reads_the_directory_anew_and_parses_only_what_changed(
    store: SavesetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `sbc list` parsed every saveset's metadata, every owner's: with
    30,000 of them 1.4 s each. An unchanged file is parsed once; one
    rewritten (same size) or removed is seen at the next listing."""
    first, second = (upload(store, tar_bytes({"a": b"1"})).commit() for _ in "12")
    parsed: list[str] = []
    real = stpd.store._read_meta

    def counted(path: Path) -> SavesetMeta | None:
        parsed.append(path.name)
        return real(path)

    monkeypatch.setattr(stpd.store, "_read_meta", counted)
    assert sorted(m.saveset for m in store.all()) == sorted([first.saveset, second.saveset])
    assert len(parsed) == 2
    assert len(store.all()) == 2 and len(parsed) == 2  # nothing parsed again
    backdated(store, first, "2026-01-01T00:00:00Z")  # the same length as the time it replaces
    assert {m.saveset: m.finished for m in store.all()}[first.saveset] == "2026-01-01T00:00:00Z"
    assert parsed[2:] == [f"{first.saveset}.json"]
    store.remove(second.saveset)
    assert [m.saveset for m in store.all()] == [first.saveset]


def test_savesets_finished_before_a_moment_are_removed_and_the_rest_kept(
    store: SavesetStore,
) -> None:
    old, unreadable_time, recent, in_the_way, older = (
        upload(store, tar_bytes({"a": b"1"})).commit() for _ in "12345"
    )
    for meta in (old, in_the_way, older):
        backdated(store, meta, "2026-01-01T00:00:00Z")
    backdated(store, unreadable_time, "yesterday")
    # A directory where one's tar goes: its metadata went, the unlink of the
    # tar failed, and the pass stopped there, its removals never logged.
    store.tar_path(in_the_way.saveset).unlink()
    store.tar_path(in_the_way.saveset).mkdir()
    removed, failed = store.remove_finished_before(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    assert sorted(m.saveset for m in removed) == sorted([old.saveset, older.saveset])
    assert [(m.saveset, why.split(":")[0]) for m, why in failed] == [
        (in_the_way.saveset, f"{store.tar_path(in_the_way.saveset)} is in the way")
    ]
    assert sorted(m.saveset for m in store.all()) == sorted(
        [unreadable_time.saveset, recent.saveset, in_the_way.saveset]
    )
    assert not store.tar_path(old.saveset).exists()
    assert store.tar_path(recent.saveset).exists()


def test_retention_keeps_the_newest_saveset_of_each_owner_and_source(
    store: SavesetStore,
) -> None:
    """A clock that jumped ahead, or backups refused for weeks, put every
    saveset past the cutoff: each client lost all its backups."""
    older, newer = (upload(store, tar_bytes({"a": b"1"})).commit() for _ in "12")
    other_source = upload(store, tar_bytes({"a": b"1"}), source="/etc").commit()
    other_owner = upload(store, tar_bytes({"a": b"1"}), owner="CN=b").commit()
    backdated(store, older, "2026-01-01T00:00:00Z")
    for meta in (newer, other_source, other_owner):
        backdated(store, meta, "2026-01-02T00:00:00Z")
    removed, failed = store.remove_finished_before(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    assert [m.saveset for m in removed] == [older.saveset] and failed == []
    assert sorted(m.saveset for m in store.all()) == sorted(
        [newer.saveset, other_source.saveset, other_owner.saveset]
    )
    # Of two that finished in the same second, one is kept (the greater id).
    same = upload(store, tar_bytes({"a": b"1"}), source="/etc").commit()
    backdated(store, same, "2026-01-02T00:00:00Z")
    removed, _ = store.remove_finished_before(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    assert [m.saveset for m in removed] == [min(other_source.saveset, same.saveset)]


def test_a_scan_while_savesets_are_removed_and_published_reports_nothing_wrong(
    store: SavesetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stpd list` beside a running stpd: between its listing of the
    metadata and that of the tars, a removal (metadata first) and a
    publish (tar first) happened, and it said that savesets had lost
    their data, and that a tar had no metadata ("cut short by a crash?")."""
    removed, read_but_removed, kept = (
        upload(store, tar_bytes({"a": b"1"})).commit() for _ in "123"
    )
    publishing = upload(store, tar_bytes({"a": b"1"}))
    real = store._metadata

    def while_stpd_works() -> list[tuple[str, SavesetMeta | None]]:
        (store.root / f"{removed.saveset}.json").unlink()  # listed, then gone before its stat
        found = real()
        store.remove(read_but_removed.saveset)
        store.remove(removed.saveset)
        os.replace(publishing.part, store.tar_path(SS))  # a publish's first step
        (store.incoming / f"{SS}.json.part").write_text("{")
        return [(f"{removed.saveset}.json", None), *found]

    monkeypatch.setattr(store, "_metadata", while_stpd_works)
    scan = store.scan()
    assert sorted(m.saveset for m in scan.savesets) == sorted(
        [read_but_removed.saveset, kept.saveset]
    )  # as they were when listed
    assert scan.warnings() == []


def test_a_scan_at_each_step_of_a_publish_reports_nothing_wrong(
    store: SavesetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tar went into place before its metadata was written: a scan in
    between (an fsync long on a slow disk) said it had no metadata, "an
    upload cut short by a crash?"."""
    up = upload(store, tar_bytes({"a": b"1"}))
    real_replace = os.replace
    seen: list[list[str]] = []

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        seen.append(store.scan().warnings())  # after each step

    monkeypatch.setattr(stpd.store.os, "replace", replace)
    meta = up.commit()
    assert seen == [[], []], seen
    assert [m.saveset for m in store.all()] == [meta.saveset]


def test_prepare_removes_leftovers_of_uploads_and_keeps_every_saveset_file(
    store: SavesetStore,
) -> None:
    kept = upload(store, tar_bytes({"a": b"1"})).commit()
    # An interrupted upload and a half-written metadata file: what a crash
    # leaves in .incoming. A tar without metadata was whole when renamed
    # into place (a crash in the middle of a removal leaves one): kept.
    part = store.begin("CN=a", "/src", PEER)
    part.write([b"partial"])
    os.close(part._fd)  # type: ignore[arg-type]  # the process died here
    (store.incoming / f"{SS}.json.part").write_text("{")
    orphan = store.root / f"{SS}.tar"
    orphan.write_bytes(tar_bytes({"b": b"2"}))

    store.close()  # its lock went with the process

    restarted = SavesetStore(store.root)
    prepared = restarted.prepare()
    assert not prepared.created
    assert sorted(prepared.removed) == sorted([part.part, store.incoming / f"{SS}.json.part"])
    assert files_in(store) == [
        INCOMING, f"{SS}.tar", f"{kept.saveset}.json", f"{kept.saveset}.tar"
    ]  # fmt: skip
    assert orphan.read_bytes() == tar_bytes({"b": b"2"})
    assert [m.saveset for m in store.all()] == [kept.saveset]
    assert restarted.scan().orphans == [orphan]
    restarted.close()
    assert SavesetStore(store.root).prepare().removed == []


def test_prepare_finishes_a_publish_cut_short_between_its_renames(store: SavesetStore) -> None:
    """publish() renames the tar into place, then its metadata: a crash in
    between left a whole saveset that prepare() took the metadata of for a
    leftover, and removed. Metadata that does not fit its tar still goes."""
    whole = upload(store, tar_bytes({"a": b"1"})).commit()
    other = upload(store, tar_bytes({"b": b"22"})).commit()
    for meta in (whole, other):  # as the crash left them
        os.replace(
            store.root / f"{meta.saveset}.json", store.incoming / f"{meta.saveset}.json.part"
        )
    with open(store.tar_path(other.saveset), "ab") as tar:
        tar.write(b"\0" * 512)  # not the tar its metadata describes
    store.close()

    restarted = SavesetStore(store.root)
    prepared = restarted.prepare()
    assert prepared.published == [whole.saveset]
    assert prepared.removed == [store.incoming / f"{other.saveset}.json.part"]
    assert restarted.all() == [whole]
    assert restarted.scan().orphans == [store.tar_path(other.saveset)]  # named, kept
    restarted.close()


def test_metadata_this_user_may_not_read_is_not_called_damaged(tmp_path: Path) -> None:
    """Savesets stored by an stpd run as root, then scanned by stpd as its
    service user: the warning called the metadata damaged and offered
    `stpd delete`, which removed a whole saveset. It says what is wrong
    now. (As root, seteuid makes the scan run as nobody.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root to scan as another user")  # CI runs as root
    root = Path(tempfile.mkdtemp(dir="/tmp"))  # tmp_path's parents are root's 0700
    try:
        root.chmod(0o755)
        store = SavesetStore(root / "data")
        store.prepare()
        (root / "data").chmod(0o755)
        meta = upload(store, tar_bytes({"a": b"1"})).commit()
        store.close()
        os.seteuid(65534)
        try:
            warnings = SavesetStore(root / "data").scan().warnings()
        finally:
            os.seteuid(0)
        assert warnings == [
            f"{root / 'data' / meta.saveset}.json cannot be read by this user (Permission "
            "denied; owned by uid 0, mode 0600), so that saveset is neither listed nor served, "
            "though it may well be whole (stored by an stpd that ran as another user?): give "
            "the user stpd runs as access to it and to its .tar (chown), do not delete it"
        ]
    finally:
        shutil.rmtree(root)


def test_a_second_store_on_the_same_directory_is_refused_and_removes_nothing(
    store: SavesetStore,
) -> None:
    """Two stpd given one data directory: the second would take the first
    one's uploads in progress for a crash's leftovers."""
    running = store.begin("CN=a", "/src", PEER)
    running.write([b"in progress"])
    with pytest.raises(StoreError, match=r"is in use by another stpd: give each stpd its own"):
        SavesetStore(store.root).prepare()
    assert running.part.exists()
    running.abort()
    store.close()
    assert SavesetStore(store.root).prepare().removed == []


def test_prepare_refuses_a_read_only_data_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        root = tmp_path / "data"
        (root / INCOMING).mkdir(parents=True)
        root.chmod(0o500)
        try:
            with pytest.raises(StoreError, match="is not writable"):
                SavesetStore(root).prepare()
        finally:
            root.chmod(0o700)
        return
    # A read-only filesystem: permission bits would not stop root (CI).
    with (
        read_only_directory(tmp_path / "data", lambda p: (p / INCOMING).mkdir()) as root,
        pytest.raises(StoreError, match="is not writable"),
    ):
        SavesetStore(root).prepare()


def test_owned_by_and_find_filter_by_owner(store: SavesetStore) -> None:
    a1 = upload(store, tar_bytes({"1": b"1"}), owner="CN=a").commit()
    b1 = upload(store, tar_bytes({"2": b"2"}), owner="CN=b").commit()
    a2 = upload(store, tar_bytes({"3": b"3"}), owner="CN=a").commit()
    anon = upload(store, tar_bytes({"4": b"4"}), owner=ANONYMOUS).commit()

    assert {m.saveset for m in store.owned_by("CN=a")} == {a1.saveset, a2.saveset}
    assert [m.saveset for m in store.owned_by("CN=b")] == [b1.saveset]
    assert [m.saveset for m in store.owned_by(ANONYMOUS)] == [anon.saveset]
    assert store.owned_by("CN=A") == []  # exact identity, not case-folded
    assert store.owned_by("CN=c") == []
    assert len(store.all()) == 4

    assert store.find("CN=a", a1.saveset) == a1
    assert store.find("CN=b", b1.saveset) == b1
    assert store.find("CN=b", a1.saveset) is None  # another's: like a missing one
    assert store.find(ANONYMOUS, a1.saveset) is None
    assert store.find("CN=a", SS) is None  # missing
    assert store.find("CN=a", a1.saveset + "\n") is None
    assert store.find("CN=a", "../" + a1.saveset) is None


def test_unreadable_metadata_is_neither_listed_nor_found(store: SavesetStore) -> None:
    good = upload(store, tar_bytes({"1": b"1"})).commit()
    bad = upload(store, tar_bytes({"2": b"2"})).commit()
    (store.root / f"{bad.saveset}.json").write_text("{not json")
    assert [m.saveset for m in store.all()] == [good.saveset]
    assert store.find("CN=a", bad.saveset) is None


def test_tar_path_refuses_bad_names(store: SavesetStore) -> None:
    assert store.tar_path(SS) == store.root / f"{SS}.tar"
    for bad in ("..", f"../{SS}", SS + "\n", ""):
        with pytest.raises(ValueError):
            store.tar_path(bad)
