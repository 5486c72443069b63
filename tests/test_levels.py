"""The STPD_HTTPS_USE_CLIENT_CERT matrix over loopback: levels 0, 1 and 2
against every kind of client certificate, with sbc and with curl as the
client. Each case checks what the client saw and the line stpd logged."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from pki.authority import CertificateAuthority
from pki.layout import Layout
from pki.tls import client_certificate_problem
from sbc.client import explain_refusal
from tests.conftest import Pki, RunningStpd, run_sbc, running_stpd

LEVELS = [0, 1, 2]
KINDS = ["none", "valid", "other-ca", "expired", "server"]
PEER = r"client 127\.0\.0\.1:\d+"

# stpd's reason for each bad kind (levels 1 and 2 use the same words).
STPD_REASON = {
    "none": r"no client certificate presented",
    "other-ca": r"not signed by our root CA",
    "expired": r"certificate has expired",
    "not-yet-valid": r"certificate is not yet valid",
    "server": r"not a client certificate \(no clientAuth extended key usage\)",
}

# What sbc tells the operator when a level-2 stpd refuses it: what, the
# TLS alert in parentheses (stpd lingers after its alert so that the client
# reads it rather than a reset), and what to do.
SBC_REFUSAL = {
    "none": r"this client presented no certificate \(TLS error: .*alert certificate required\); "
    r"set SBC_CLIENT_SSL_AUTH=1 in sm\.ini",
    "other-ca": r"our client certificate is not signed by the server's root CA "
    r"\(TLS error: .*alert unknown ca\); issue a new one with `sm_ssl_cert client`",
    "expired": r"our client certificate has expired \(TLS error: .*alert certificate expired\); "
    r"issue a new one with `sm_ssl_cert client`",
    "server": r"our certificate is not a client certificate \(no clientAuth usage\) "
    r"\(TLS error: .*alert unsupported certificate\); "
    r"use the certificate made by `sm_ssl_cert client`",
}

# The TLS alert curl reports for each refusal (TLS 1.3, OpenSSL 3).
CURL_ALERT = {
    "none": "alert certificate required",
    "other-ca": "alert unknown ca",
    "expired": "alert certificate expired",
    "server": "alert unsupported certificate",
}


def client_for(pki: Pki, kind: str, name: str) -> Layout:
    """``none`` means SBC_CLIENT_SSL_AUTH=0: the client presents nothing."""
    return pki.client_ini(name, cert=kind, client_auth=0 if kind == "none" else 1)


def assert_one_line_error(err: str, pattern: str) -> None:
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert re.match(r"sbc: error: " + pattern, err), err


def expected_log(level: int, kind: str, name: str) -> str:
    """The regex of stpd's line about this client."""
    if level == 0:
        return rf"^INFO {PEER} connected \(level 0\)$"
    if kind == "valid":
        return rf"^INFO {PEER} authenticated as CN={name}$"
    subject = "" if kind == "none" else rf" \(CN={name}\)"
    reason = STPD_REASON[kind]
    if level == 1:
        return (
            rf"^WARNING {PEER}{subject}: invalid client certificate: {reason}; "
            r"served as anonymous \(STPD_HTTPS_USE_CLIENT_CERT=1\)$"
        )
    return rf"^ERROR refused {PEER}{subject}: {reason} \(STPD_HTTPS_USE_CLIENT_CERT=2\)$"


def expected_owner(level: int, kind: str, name: str) -> str:
    return f"CN={name}" if level > 0 and kind == "valid" else "anonymous"


def stored_files(stpd: RunningStpd) -> list[str]:
    root = stpd.daemon.store.root
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def peer_lines(stpd: RunningStpd) -> list[str]:
    """Every log line after the start-up line (before it: what stpd says
    about its files, such as the CA key beside it)."""
    lines = list(stpd.log.lines)
    start = next(i for i, line in enumerate(lines) if " listening on " in line)
    return lines[start + 1 :]


# -- sbc -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", LEVELS)
def test_sbc_matrix(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], level: int, kind: str
) -> None:
    name = f"sbc-{kind}-{level}"
    client = client_for(pki, kind, name)
    source = tmp_path / "payload.txt"
    source.write_text("matrix\n")
    ini = ["--ini-dir", str(client.ini_dir)]
    refused = level == 2 and kind != "valid"
    with running_stpd(pki.layout, level=level) as stpd:
        code, out, err = run_sbc(*ini, "backup", str(source), "--server", stpd.address, "--json")
        logged = stpd.log.wait_for(expected_log(level, kind, name))
        if refused:
            assert code == 1
            assert out == ""
            assert_one_line_error(
                err, rf"refused by stpd at {re.escape(stpd.address)}: {SBC_REFUSAL[kind]}"
            )
            # Refused in the handshake: no request was read, nothing stored.
            assert peer_lines(stpd) == [logged]
            assert stpd.daemon.store.all() == []
            assert stored_files(stpd) == []
            return
        assert code == 0, err
        # At level 1, sbc warns of a certificate it can tell stpd does not accept.
        warned = level == 1 and kind not in ("valid", "none")
        assert err.count("did not accept our client certificate") == err.count("\n") == warned
        backup = json.loads(out)
        saveset = backup["saveset"]
        assert backup["owner"] == expected_owner(level, kind, name)
        meta = stpd.daemon.store.find(expected_owner(level, kind, name), saveset)
        assert meta is not None, f"{saveset} not stored for {expected_owner(level, kind, name)}"
        assert meta.source == str(source)
        assert stored_files(stpd) == [f"{saveset}.json", f"{saveset}.tar"]
        owner = re.escape(expected_owner(level, kind, name))
        stpd.log.wait_for(rf"^INFO stored saveset {saveset} from 127\.0\.0\.1:\d+ \({owner}\)")

        code, out, err = run_sbc(*ini, "list", "--server", stpd.address, "--json")
        assert code == 0, err
        assert [item["saveset"] for item in json.loads(out)] == [saveset]
        # One judgement per connection: backup and list each logged one line.
        stpd.log.wait_for_count(expected_log(level, kind, name), 2)


@pytest.mark.parametrize(
    ("kind", "level"), [("other-ca", 1), ("valid", 1), ("none", 1), ("other-ca", 0)]
)
def test_sbc_says_when_level_1_stored_its_backup_as_anonymous(
    pki: Pki, tmp_path: Path, kind: str, level: int
) -> None:
    """At level 1 a client whose certificate stpd refuses is served as
    anonymous, whose savesets every such client may list and restore:
    only the server log said so. A client that presented no certificate
    (SBC_CLIENT_SSL_AUTH=0) chose that, and at level 0 stpd asks for none:
    both hear nothing."""
    client = client_for(pki, kind, f"anon-{kind}")
    source = tmp_path / "payload.txt"
    source.write_text("level 1\n")
    with running_stpd(pki.layout, level=level) as stpd:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "backup", str(source), "--server", stpd.address
        )
    assert code == 0, err
    assert out.startswith("saveset SS-")
    warning = (
        f"sbc: WARNING: stpd at {stpd.address} did not accept our client certificate: our "
        "client certificate is not signed by the server's root CA "
        f"({client.client_cert} is not signed by {client.ca_cert}); it serves this client as "
        "anonymous (STPD_HTTPS_USE_CLIENT_CERT=1): it lists and restores the savesets of every "
        "client without a valid certificate instead of this client's, and stores its backups "
        "where each of them can restore them; issue a new one with `sm_ssl_cert client` on the "
        "backup server and copy it to x.509/\n"
    )
    assert err == (warning if (kind, level) == ("other-ca", 1) else "")


@pytest.mark.parametrize("level", [1, 2])
def test_sbc_not_yet_valid_certificate(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], level: int
) -> None:
    client = pki.client_ini("early", cert="not-yet-valid")
    with running_stpd(pki.layout, level=level) as stpd:
        code, _, err = run_sbc("--ini-dir", str(client.ini_dir), "status", "--server", stpd.address)
        line = stpd.log.wait_for(STPD_REASON["not-yet-valid"])
    if level == 1:
        assert code == 0, err
        assert line.startswith("WARNING client 127.0.0.1:")
        assert "(CN=early)" in line and "served as anonymous" in line
    else:
        assert code == 1
        assert_one_line_error(
            err,
            r"refused by stpd at .*: our client certificate is not yet valid "
            r"\(.*client\.pem is valid only from .*\); check the clocks",
        )
        assert line.startswith("ERROR refused client 127.0.0.1:")


def test_sbc_missing_client_certificate_is_one_line(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """SBC_CLIENT_SSL_AUTH=1 without x.509/client.pem: a local error naming
    the file and the command, before any connection."""
    client = pki.client_ini("nofiles", cert="none", client_auth=1)
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = run_sbc("--ini-dir", str(client.ini_dir), "list", "--server", stpd.address)
        assert peer_lines(stpd) == []
    assert code == 1 and out == ""
    assert_one_line_error(
        err,
        rf"certificate {re.escape(str(client.client_cert))} not found: issue one for this "
        r"client with `sm_ssl_cert client --oid CN:<its name> --path DIR` where the CA is, and "
        rf"copy client.pem and client.key into {re.escape(str(client.client_dir))}$",
    )


def test_level_1_invalid_certificate_does_not_get_its_claimed_identity(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At level 1 an invalid certificate is served as ``anonymous``: it does
    not get the identity written in its (untrusted) subject."""
    source = tmp_path / "f.txt"
    source.write_text("x\n")
    valid = pki.client_ini("same-name")
    forged = pki.client_ini("same-name-forged", cert="other-ca")
    # The forged certificate claims the valid client's name.
    forged_ca = pki.root / "other-ca-same-name-forged"
    CertificateAuthority.load(Layout(forged_ca)).issue_client(
        "CN:same-name", out_dir=forged.client_dir
    )
    with running_stpd(pki.layout, level=1) as stpd:
        code, out, err = run_sbc(
            *["--ini-dir", str(valid.ini_dir)],
            *["backup", str(source), "--server", stpd.address, "--json"],
        )
        assert code == 0, err
        mine = json.loads(out)["saveset"]
        code, out, err = run_sbc(
            "--ini-dir", str(forged.ini_dir), "list", "--server", stpd.address, "--json"
        )
        assert code == 0, err
        assert json.loads(out) == []
        stpd.log.wait_for(r"^WARNING .*\(CN=same-name\): invalid client certificate: not signed")
        code, _, err = run_sbc(
            *["--ini-dir", str(forged.ini_dir)],
            *["restore", mine, str(tmp_path / "stolen"), "--server", stpd.address],
        )
        assert code == 1
        warning, error = err.splitlines(keepends=True)  # the warning that we are anonymous
        assert "did not accept our client certificate" in warning, err
        assert_one_line_error(error, rf"restore of {mine} refused by stpd .*: no saveset {mine}")


# -- curl ----------------------------------------------------------------------


def curl(client: Layout, kind: str, *args: str) -> subprocess.CompletedProcess[str]:
    tls = ["--cacert", str(client.ca_cert)]
    if kind != "none":
        tls += ["--cert", str(client.client_cert), "--key", str(client.client_key)]
    return subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--max-time", "20", *tls, *args],
        capture_output=True,
        text=True,
    )


@pytest.fixture
def small_tar(tmp_path: Path) -> Path:
    payload = tmp_path / "payload.txt"
    payload.write_text("from curl\n")
    archive = tmp_path / "small.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, "payload.txt")
    return archive


CURL_CASES = [pytest.param(level, kind, id=f"{level}-{kind}") for level in LEVELS for kind in KINDS]


@pytest.mark.parametrize(("level", "kind"), CURL_CASES)
def test_curl_matrix(pki: Pki, small_tar: Path, level: int, kind: str) -> None:
    name = f"curl-{kind}-{level}"
    client = pki.client_ini(name, cert=kind)
    refused = level == 2 and kind != "valid"
    with running_stpd(pki.layout, level=level) as stpd:
        put = curl(client, kind, "-T", str(small_tar), f"{stpd.url}/savesets?source=/curl/{kind}")
        stpd.log.wait_for(expected_log(level, kind, name))
        status = curl(client, kind, f"{stpd.url}/status")
        stpd.log.wait_for_count(expected_log(level, kind, name), 2)
        if refused:
            for result in (put, status):
                assert result.returncode == 56, result.stderr  # TLS 1.3: refused on first read
                assert CURL_ALERT[kind] in result.stderr
                assert result.stdout == ""
            assert len(peer_lines(stpd)) == 2  # the two refusals, nothing else
            assert stored_files(stpd) == []
            return
        assert put.returncode == 0, put.stderr
        meta = json.loads(put.stdout)
        assert meta["owner"] == expected_owner(level, kind, name)
        assert meta["source"] == f"/curl/{kind}"
        assert stpd.daemon.store.find(meta["owner"], meta["saveset"]) is not None
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["level"] == level


# -- when the alert is lost: sbc's own diagnosis ------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("valid", None),
        ("none", None),  # no file: loading it reports that
        ("expired", "expired"),
        ("not-yet-valid", "not-yet-valid"),
        ("server", "purpose"),
        ("other-ca", "unknown-ca"),
    ],
)
def test_client_certificate_problem(pki: Pki, kind: str, expected: str | None) -> None:
    client = pki.client_ini(f"diag-{kind}", cert=kind)
    problem = client_certificate_problem(client)
    assert (problem[0] if problem else None) == expected
    if problem is not None:
        assert str(client.client_cert) in problem[1]


@pytest.mark.parametrize(
    ("reason", "local", "expected"),
    [
        # The alert says why: it wins over what we found locally.
        (
            "TLS error: tlsv1 alert unknown ca",
            ("expired", "x expired"),
            "refused by stpd at h:1: our client certificate is not signed by the server's "
            "root CA (TLS error: tlsv1 alert unknown ca); issue a new one",
        ),
        # "certificate expired" with our certificate in date: the CRL has expired.
        (
            "TLS error: tls alert certificate expired",
            None,
            "refused by stpd at h:1: stpd says a certificate has expired, but our client "
            "certificate is in date here (TLS error: tls alert certificate expired); its CRL "
            "(ca/crl.pem) is probably past its next update",
        ),
        (
            "TLS error: tls alert certificate expired",
            ("expired", "x expired on 2026-01-01"),
            "refused by stpd at h:1: our client certificate has expired (TLS error: tls alert "
            "certificate expired); issue a new one",
        ),
        # "bad certificate" says little: the local finding is more precise.
        (
            "TLS error: tls alert bad certificate",
            ("not-yet-valid", "x is valid only from tomorrow"),
            "refused by stpd at h:1: our client certificate is not yet valid (TLS error: tls "
            "alert bad certificate; x is valid only from tomorrow); check the clocks",
        ),
        ("TLS error: tls alert bad certificate", None, "refused by stpd at h:1: the server "),
        # No alert (lost to a reset): the local finding explains it.
        (
            "connection lost: connection closed by peer",
            ("purpose", "x has no clientAuth extended key usage"),
            "refused by stpd at h:1: our certificate is not a client certificate (no clientAuth "
            "usage) (connection lost: connection closed by peer; x has no clientAuth",
        ),
        (
            "connection lost: connection closed by peer",
            None,
            "connection to stpd at h:1 failed: connection lost: connection closed by peer",
        ),
    ],
)
def test_explain_refusal(reason: str, local: tuple[str, str] | None, expected: str) -> None:
    assert str(explain_refusal("h:1", reason, local)).startswith(expected)


@pytest.mark.parametrize("level", [1, 2])
def test_valid_certificate_outside_the_allow_list(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], level: int
) -> None:
    """STPD_ALLOWED_CLIENTS: a valid certificate of another identity is
    served as anonymous at level 1 and refused after the handshake at 2."""
    client = pki.client_ini("not-listed")
    with running_stpd(pki.layout, level=level, allowed_clients=("CN:listed*",)) as stpd:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "list", "--server", stpd.address, "--json"
        )
        reason = r"client identity CN=not-listed is not in STPD_ALLOWED_CLIENTS"
        if level == 1:
            stpd.log.wait_for(
                rf"^WARNING {PEER} \(CN=not-listed\): invalid client certificate: "
                rf"{reason}; served as anonymous"
            )
            assert code == 0, err
            assert json.loads(out) == []
        else:
            stpd.log.wait_for(rf"^ERROR refused {PEER} \(CN=not-listed\): {reason} ")
            assert code == 1 and out == ""
            assert_one_line_error(
                err,
                rf"GET /savesets refused by stpd at {re.escape(stpd.address)}: {reason} "
                r"\(STPD_HTTPS_USE_CLIENT_CERT=2\)$",
            )
