"""Fuzzing: hypothesis drives STPD's decision logic (``route``,
``judge_peer``, ``refused_handshake``) and the streaming tar check with
random and mutated inputs, without sockets; then a bounded loopback fuzz
sends mutated requests after a valid handshake.

The documented outcomes: ``route`` always returns an action (a bad request
is a ``Reject``, never an exception); ``judge_peer`` and
``refused_handshake`` always return a decision; ``TarStreamCheck`` raises
only ``InvalidTar``.
"""

from __future__ import annotations

import random
import re
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pki.tls import ClientCertPolicy
from stpd.protocol import (
    MAX_SOURCE_CHARS,
    Download,
    Entries,
    ListSavesets,
    Metadata,
    PeerDecision,
    Reject,
    Status,
    Upload,
    Verify,
    judge_peer,
    refused_handshake,
    route,
)
from stpd.server import _header_text
from stpd.store import SAVESET_ID
from stpd.tarcheck import InvalidTar, TarStreamCheck
from tests.conftest import Pki, make_pki, running_stpd, tar_bytes
from tests.test_hostile_common import (
    DEADLINE,
    assert_no_partial,
    assert_serves,
    hpki,  # noqa: F401  (fixture)
    read_answer,
    small_tar,
    tls_connect,
    tls_context,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# -- route -------------------------------------------------------------------------

VALID_ID = "SS-20240101T000000Z-0123abcd"
VALID_TARGETS = [
    "/status",
    "/savesets",
    "/savesets?source=/home/user",
    "/savesets?source=%2Fhome%2Fuser%20x",
    f"/savesets/{VALID_ID}",
    f"/savesets/{VALID_ID}/meta",
]
HOSTILE_PIECES = [
    "..", "/", "//", "%", "%00", "%2e", "%2E%2e", "%2f", "%5c", "\\", "?", "&", "=", "#",
    "[", "]", "//[", "://", "@", ";", "source=", "source=..%2F..%2Fetc", "%ff", "%u0000",
    "\x00", " ", "\t", "é", "x" * 5000,
]  # fmt: skip
METHODS = st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE", "OPTIONS", "get", "PATCH"])


@st.composite
def mutated_target(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(["", "", "//", "//[", "http://h", "https://[::1]"]))
    target = prefix + draw(st.sampled_from(VALID_TARGETS))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(target)))
        how = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(st.sampled_from(HOSTILE_PIECES) | st.text(max_size=8))
        if how == "insert":
            target = target[:at] + piece + target[at:]
        elif how == "replace":
            target = target[:at] + piece + target[at + len(piece) :]
        else:
            target = target[:at] + target[at + draw(st.integers(1, 6)) :]
    return target


def check_action(method: str, target: str) -> None:
    action = route(method, target)
    assert isinstance(
        action, Status | ListSavesets | Upload | Download | Metadata | Entries | Verify | Reject
    )
    if isinstance(action, Reject):
        assert 400 <= action.status < 500
        assert action.message
    elif isinstance(action, Download | Metadata | Entries | Verify):
        assert SAVESET_ID.match(action.saveset), action  # never a path of the caller's choice
        assert method in ("GET", "HEAD")
    elif isinstance(action, Upload):
        assert method in ("PUT", "POST")
        assert action.source and "\x00" not in action.source
        assert len(action.source) <= MAX_SOURCE_CHARS


@FUZZ
@given(method=METHODS, target=mutated_target())
def test_route_with_mutated_targets(method: str, target: str) -> None:
    check_action(method, target)


@FUZZ
@given(method=METHODS | st.text(max_size=10), target=st.text(max_size=300))
def test_route_with_random_targets(method: str, target: str) -> None:
    check_action(method, target)


@pytest.mark.parametrize(
    "target",
    ["//[/status", "http://[::1/savesets", "//[x]/savesets/" + VALID_ID],
)
def test_route_rejects_targets_that_urlsplit_cannot_parse(target: str) -> None:
    """``urllib.parse.urlsplit`` raises ValueError on an unclosed IPv6
    bracket or a bad port: that must be a 400, not an exception."""
    for method in ("GET", "PUT"):
        action = route(method, target)
        assert isinstance(action, Reject) and action.status in (400, 404), action


# -- judge_peer and refused_handshake ------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> list[x509.Certificate]:
    made = make_pki(tmp_path_factory.mktemp("fuzz-pki"))
    layouts = [
        made.client_ini("fuzz-valid", extra_ini=""),
        made.client_ini("fuzz-other", cert="other-ca"),
    ]
    return [x509.load_pem_x509_certificate(layout.client_cert.read_bytes()) for layout in layouts]


@FUZZ
@given(data=st.data())
def test_judge_peer_always_decides(
    data: st.DataObject, certificates: list[x509.Certificate]
) -> None:
    policy = data.draw(st.sampled_from(list(ClientCertPolicy)))
    cert = data.draw(st.sampled_from([None, *certificates]))
    problems = data.draw(st.lists(st.text(max_size=40), max_size=3))
    allowed = tuple(
        data.draw(
            st.lists(
                st.text(max_size=20) | st.sampled_from(["CN:*", "CN:[", "CN:fuzz-*", "O:", ":x"]),
                max_size=4,
            )
        )
    )
    peer = data.draw(st.text(max_size=40))
    decision = judge_peer(peer, policy, cert, problems, allowed)
    assert isinstance(decision, PeerDecision)
    if policy == ClientCertPolicy.REQUIRE and (cert is None or problems):
        assert not decision.serve
    if decision.owner != "anonymous":
        assert cert is not None and not problems
    if decision.not_accepted:  # told to a client served as anonymous though it presented one
        assert policy == ClientCertPolicy.WARN and cert is not None and decision.serve
        header = _header_text(decision.not_accepted)
        assert header.isascii() and header.isprintable() and header == header.strip()


@FUZZ
@given(
    policy=st.sampled_from(list(ClientCertPolicy)),
    reason=st.text(max_size=80)
    | st.sampled_from(["http request", "wrong version number", "tlsv1 alert unknown ca", ""]),
)
def test_refused_handshake_always_refuses(policy: ClientCertPolicy, reason: str) -> None:
    decision = refused_handshake("127.0.0.1:1", policy, reason)
    assert isinstance(decision, PeerDecision) and not decision.serve


# -- the streaming tar check -----------------------------------------------------------


MEMBERS = st.lists(
    st.tuples(
        st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            min_size=1,
            max_size=120,
        ),
        st.binary(max_size=2000),
    ),
    min_size=1,
    max_size=5,
)


def feed_in_pieces(data: bytes, cuts: list[int]) -> TarStreamCheck:
    check = TarStreamCheck()
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        check.feed(data[last:cut])
        last = cut
    check.feed(data[last:])
    check.finish()
    return check


@FUZZ
@given(members=MEMBERS, cuts=st.lists(st.integers(0, 1 << 20), max_size=6))
def test_tar_check_accepts_valid_archives_in_any_pieces(
    members: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    check = feed_in_pieces(tar_bytes(members), cuts)
    assert check.members == len(members)


@FUZZ
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 1 << 20), max_size=4))
def test_tar_check_random_bytes_raise_only_invalid_tar(data: bytes, cuts: list[int]) -> None:
    try:
        feed_in_pieces(data, cuts)
    except InvalidTar:
        pass


@FUZZ
@given(
    members=MEMBERS,
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16))),
    truncate=st.none() | st.integers(0, 1 << 20),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=4),
)
def test_tar_check_mutated_archives_raise_only_invalid_tar(
    members: list[tuple[str, bytes]],
    edits: list[tuple[int, bytes]],
    truncate: int | None,
    cuts: list[int],
) -> None:
    data = bytearray(tar_bytes(members))
    for at, piece in edits:
        at %= len(data)
        data[at : at + len(piece)] = piece
    if truncate is not None:
        del data[truncate % (len(data) + 1) :]
    try:
        feed_in_pieces(bytes(data), cuts)
    except InvalidTar:
        pass


# -- loopback: mutated requests after a valid handshake ----------------------------------

LOOPBACK_CASES = 50


def base_requests() -> list[bytes]:
    body = small_tar("fuzz.txt", b"fuzz\n" * 100)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return [
        b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /savesets HTTP/1.1\r\nHost: x\r\n\r\nGET /status HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /savesets/{VALID_ID}/meta HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        b"PUT /savesets?source=/fuzz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
        b"PUT /savesets?source=/fuzz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked,
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 5)):
        at = rng.randrange(len(out) + 1)
        how = rng.choice(["flip", "insert", "delete", "dup", "token", "truncate"])
        if how == "flip" and out:
            out[at % len(out)] ^= 1 << rng.randrange(8)
        elif how == "insert":
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif how == "delete":
            del out[at : at + rng.randint(1, 20)]
        elif how == "dup":
            out[at:at] = out[at : at + rng.randint(1, 200)] * rng.randint(2, 50)
        elif how == "token":
            out[at:at] = rng.choice(
                [b"\r\n", b"\n", b":", b" ", b"\x00", b"%00", b"..", b"ffffffffffff\r\n",
                 b"Content-Length: 99999999999\r\n", b"Transfer-Encoding: chunked\r\n",
                 b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"HTTP/1.0"]
            )  # fmt: skip
        elif how == "truncate":
            del out[at:]
    return bytes(out)


def test_loopback_fuzz_after_a_valid_handshake(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("fuzzer")
    ctx = tls_context(hpki, client)
    rng = random.Random(20240505)
    bases = base_requests()
    cases = [mutate(rng, rng.choice(bases)) for _ in range(LOOPBACK_CASES)]

    def one(payload: bytes) -> str:
        try:
            with tls_connect(stpd, ctx) as sock:
                sock.sendall(payload)
                answer = read_answer(sock)
                if answer is None:
                    return "closed"
                # The connection either stays usable or ends; never hangs.
                sock.settimeout(DEADLINE)
                return str(answer.status)
        except (ssl.SSLError, ConnectionError):
            return "closed"

    with running_stpd(hpki.layout, 2, header_timeout=0.5, idle_timeout=0.5, io_timeout=0.5) as stpd:
        with ThreadPoolExecutor(LOOPBACK_CASES) as pool:
            outcomes = list(pool.map(one, cases))
        for payload, outcome in zip(cases, outcomes, strict=True):
            assert outcome == "closed" or re.fullmatch(r"[1-5]\d\d", outcome), (payload, outcome)
            assert outcome != "500", payload[:200]
        assert not stpd.log.matching(r"internal error"), stpd.log.matching(r"internal error")
        assert_serves(stpd, client, tmp_path)
        assert_no_partial(stpd.daemon.store.root)
