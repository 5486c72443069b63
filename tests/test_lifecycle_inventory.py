"""The inventory ca/inventory.json: what is recorded, `sm_ssl_cert list` and its
warnings, and consistency under concurrent sm_ssl_cert processes."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki import crl as crl_module
from pki.authority import CertificateAuthority, format_fingerprint, format_serial
from pki.cli import main
from pki.errors import PkiError
from pki.inventory import Inventory, parse_serial
from pki.layout import INI_DIR_ENV, Layout

PROCESS_TIMEOUT = 60.0  # only reached when something hangs; never a synchronisation sleep


def run(capsys: pytest.CaptureFixture[str], layout: Layout, *argv: str) -> tuple[str, str]:
    code = main(["--ini-dir", str(layout.ini_dir), *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def fails(capsys: pytest.CaptureFixture[str], layout: Layout, *argv: str) -> str:
    assert main(["--ini-dir", str(layout.ini_dir), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sm_ssl_cert: error: ") and err.count("\n") == 1, err
    return err


def listing(capsys: pytest.CaptureFixture[str], layout: Layout) -> dict:
    out, _err = run(capsys, layout, "list", "--json")
    return json.loads(out)


def by_serial(document: dict) -> dict[str, dict]:
    return {row["serial"]: row for row in document["certificates"]}


# -- what is recorded ----------------------------------------------------------------


def test_every_issued_certificate_is_recorded(ca: CertificateAuthority, layout: Layout) -> None:
    server = ca.issue_server("backup.example.test,127.0.0.1,192.168.1.*")
    client = ca.issue_client("CN:host1,O:Acme")
    rds = ca.issue_server("rds1", out_dir=layout.ini_dir.parent / "rds1")
    inventory = Inventory.read(layout)
    assert [(e.profile, e.serial) for e in inventory.entries] == [
        ("ca", format_serial(ca.cert.serial_number)),
        ("server", format_serial(server.serial)),
        ("client", format_serial(client.serial)),
        ("server", format_serial(rds.serial)),
    ]
    entry = inventory.find(server.serial)
    assert entry is not None
    assert entry.subject == "CN=backup.example.test"
    assert entry.names == ["backup.example.test", "127.0.0.1", "192.168.1.*"]
    assert entry.path == str(layout.server_cert)
    assert entry.not_after_utc == server.cert.not_valid_after_utc
    assert entry.not_before_utc == server.cert.not_valid_before_utc
    assert entry.status == "valid" and entry.revoked_at is None
    assert entry.sha256 == format_fingerprint(server.cert)
    client_entry = inventory.find(client.serial)
    assert client_entry is not None
    assert client_entry.subject == "CN=host1, O=Acme"
    assert client_entry.names == []
    rds_entry = inventory.find(rds.serial)
    assert rds_entry is not None and rds_entry.path == str(rds.cert_path)
    # No secret in it: world-readable like a certificate; the lock file beside it.
    assert stat.S_IMODE(layout.inventory.stat().st_mode) == 0o644
    assert (layout.ca_dir / "inventory.lock").exists()
    assert "PRIVATE" not in layout.inventory.read_text()


def test_reissuing_at_the_same_path_supersedes_the_old_entry(
    ca: CertificateAuthority, layout: Layout
) -> None:
    first = ca.issue_client("CN:host1")
    second = ca.issue_client("CN:host1")
    inventory = Inventory.read(layout)
    old = inventory.find(first.serial)
    assert old is not None
    assert old.status == "superseded"
    assert old.superseded_by == format_serial(second.serial)
    assert old.moved_to is not None and ".old-" in old.moved_to
    assert Path(old.moved_to).read_bytes() == first.cert.public_bytes(serialization.Encoding.PEM)
    assert second.superseded == format_serial(first.serial)


def test_a_failed_write_records_nothing(
    ca: CertificateAuthority, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca.issue_client("CN:host1")
    before = layout.inventory.read_bytes()
    from pki import authority

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(authority, "write_public", disk_full)
    with pytest.raises(OSError):
        ca.issue_client("CN:host2")
    assert layout.inventory.read_bytes() == before


def test_an_inventory_that_cannot_be_written_leaves_no_certificate(
    ca: CertificateAuthority, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = ca.issue_client("CN:host1")
    before = {p.name: p.read_bytes() for p in layout.client_dir.iterdir()}
    from pki import inventory

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(inventory, "write_public", disk_full)
    with pytest.raises(OSError):
        ca.issue_client("CN:host2")
    # The old pair is back in place, and nothing else is there.
    assert {p.name: p.read_bytes() for p in layout.client_dir.iterdir()} == before
    assert Inventory.read(layout).find(old.serial) is not None


def test_a_damaged_inventory_is_a_clear_error_and_nothing_is_issued(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    ca.issue_client("CN:host1")
    layout.inventory.write_text("{not json")
    before = layout.client_cert.read_bytes()
    with pytest.raises(PkiError, match=r"inventory .*inventory\.json is damaged"):
        ca.issue_client("CN:host2")
    assert layout.client_cert.read_bytes() == before
    err = fails(capsys, layout, "list")
    assert "is damaged" in err and "move it aside" in err


def test_ca_force_moves_the_old_inventory_and_crl_aside(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    ca.issue_client("CN:host1")
    crl_module.write_crl(ca)
    out, _ = run(capsys, layout, "ca", "--force")
    assert out.count("moved aside: ") == 4
    assert not layout.inventory.exists() and not layout.crl.exists()
    assert [p for p in layout.ca_dir.iterdir() if p.name.startswith("inventory.json.old-")]
    assert [p for p in layout.ca_dir.iterdir() if p.name.startswith("crl.pem.old-")]
    document = listing(capsys, layout)
    assert [row["profile"] for row in document["certificates"]] == ["ca"]


def test_ca_force_replaces_a_damaged_inventory(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    """The inventory of the CA being replaced is moved aside, never read: a
    damaged one must not stop the replacement."""
    ca.issue_client("CN:host1")
    layout.inventory.write_text("{ not json")
    out, _ = run(capsys, layout, "ca", "--force")
    assert "moved aside: " in out
    assert not layout.inventory.exists()
    assert [p for p in layout.ca_dir.iterdir() if p.name.startswith("inventory.json.old-")]


# -- list ----------------------------------------------------------------------------


def test_list_shows_days_to_expiry_and_marks_expired_and_revoked(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    server = ca.issue_server("localhost", days=100)
    old = ca.issue_client(
        "CN:old", out_dir=layout.ini_dir / "old", not_before=now - timedelta(days=10), days=1
    )
    lost = ca.issue_client("CN:lost", out_dir=layout.ini_dir / "lost")
    run(capsys, layout, "revoke", format_serial(lost.serial), "--reason", "keyCompromise")

    out, err = run(capsys, layout, "list")
    # The expired certificate is still in use (not revoked, not replaced): one warning.
    assert (
        err.count("\n") == 1 and "client certificate CN=old" in err and "expired 9 days ago" in err
    )
    lines = out.splitlines()
    assert lines[0] == (f"4 certificates in {layout.inventory} (1 revoked, 1 expired)")
    assert re.split(r"\s{2,}", lines[1]) == [
        "SERIAL",
        "PROFILE",
        "STATUS",
        "EXPIRES",
        "DAYS",
        "SUBJECT",
        "PATH",
    ]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert re.search(
        r" server +valid +\d{4}-\d\d-\d\d +99 +CN=localhost \[localhost\] ",
        rows[format_serial(server.serial)],
    )
    assert re.search(r" client +EXPIRED +\S+ +-9 +CN=old ", rows[format_serial(old.serial)])
    assert re.search(
        r" client +REVOKED \(keyCompromise\) +\S+ +824 +CN=lost ", rows[format_serial(lost.serial)]
    )
    assert rows[format_serial(ca.cert.serial_number)].split()[1:3] == ["ca", "valid"]

    document = listing(capsys, layout)
    rows_json = by_serial(document)
    assert rows_json[format_serial(old.serial)]["expired"] is True
    assert rows_json[format_serial(old.serial)]["days_left"] == -9
    assert rows_json[format_serial(server.serial)]["days_left"] == 99
    assert rows_json[format_serial(server.serial)]["expired"] is False
    revoked = rows_json[format_serial(lost.serial)]
    assert revoked["status"] == "revoked"
    assert revoked["revocation_reason"] == "keyCompromise"
    assert datetime.fromisoformat(revoked["revoked_at"]) >= now - timedelta(minutes=1)
    # One form of time in every file and answer: UTC to the second, with Z.
    times = [revoked["revoked_at"], revoked["not_after"], document["crl"]["last_update"]]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in times), times
    assert document["crl"]["revoked"] == [format_serial(lost.serial)]
    assert document["crl"]["number"] == 1
    [warning] = document["warnings"]  # the expired certificate still in use; the CRL is fine
    assert warning.startswith(f"client certificate CN=old (serial {format_serial(old.serial)}")


def test_list_follows_certificates_moved_back_by_hand(
    capsys: pytest.CaptureFixture[str], layout: Layout, ca: CertificateAuthority
) -> None:
    """A server certificate issued without --path for an RDS replaces the
    backup server's own; sm_ssl_cert says to move the old files back. The
    inventory then had the certificate in use as superseded (so `list`
    never warned of its expiry) and the one no longer there as valid."""
    live = ca.issue_server("backup.example.test", days=5)
    replacement = ca.issue_server("rds1.example.test")
    for name in ("server.pem", "server.key"):
        (aside,) = layout.server_dir.glob(f"{name}.old-*")
        os.replace(aside, layout.server_dir / name)
    out, err = run(capsys, layout, "list")
    rows = by_serial(listing(capsys, layout))
    back, gone = rows[format_serial(live.serial)], rows[format_serial(replacement.serial)]
    assert (back["status"], back["at_path"]) == ("superseded", "this")
    assert (gone["status"], gone["at_path"]) == ("valid", "other")
    row = next(line for line in out.splitlines() if line.startswith(back["serial"]))
    assert "superseded, but at its path again" in row and row.endswith(str(layout.server_cert))
    row = next(line for line in out.splitlines() if line.startswith(gone["serial"]))
    assert "replaced at its path" in row
    assert (
        f"sm_ssl_cert: warning: server certificate CN=backup.example.test (serial {back['serial']}"
    ) in err
    assert "expires in 4 days" in err or "expires in 5 days" in err, err


def test_list_before_any_certificate_shows_the_ca_and_needs_no_key(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    ca.issue_client("CN:host1")
    layout.ca_key.unlink()  # the administrator moved it off the server
    document = listing(capsys, layout)
    assert [row["profile"] for row in document["certificates"]] == ["ca", "client"]
    assert document["crl"] is None

    fresh = Layout(layout.ini_dir.parent / "fresh")
    CertificateAuthority.create(fresh)
    document = listing(capsys, fresh)
    assert [row["profile"] for row in document["certificates"]] == ["ca"]
    assert not fresh.inventory.exists()  # list only reads


def test_list_without_ca_or_inventory_is_a_clear_error(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(capsys, layout, "list")
    assert f"nothing to list: no inventory at {layout.inventory}" in err
    assert "check --ini-dir" in err


def crl_warning(capsys: pytest.CaptureFixture[str], layout: Layout) -> list[str]:
    """The warnings of `list`, on stderr and in the JSON document alike."""
    code = main(["--ini-dir", str(layout.ini_dir), "list"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith(("1 certificate", "2 certificates", "3 certificates"))
    warnings = [line for line in err.splitlines() if line]
    assert all(line.startswith("sm_ssl_cert: warning: ") for line in warnings)
    document = listing(capsys, layout)
    assert len(document["warnings"]) == len(warnings)
    return warnings


def test_list_warns_when_the_crl_next_update_is_near(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, layout, "crl", "--days", "3")
    [warning] = crl_warning(capsys, layout)
    # Counted as stpd's log and `sbc status` count (pki.console.in_days): it
    # said "within 3 day(s)" with 2.9 left, and "within 1 day(s)" with hours.
    again = f"the CRL {layout.crl} must be written again before its next update"
    assert f"{again} in 2 days (" in warning
    assert f"`sm_ssl_cert --ini-dir {layout.ini_dir} crl`" in warning
    crl_module.write_crl(ca, days=1, now=datetime.now(UTC) - timedelta(hours=20))
    [warning] = crl_warning(capsys, layout)
    assert f"{again} in less than a day (" in warning
    # 8 days is outside the 7-day window: no warning.
    run(capsys, layout, "crl", "--days", "8")
    assert crl_warning(capsys, layout) == []
    assert listing(capsys, layout)["crl"]["days_left"] == 7


def test_list_warns_when_the_crl_next_update_has_passed(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    crl_module.write_crl(ca, days=30, now=datetime.now(UTC) - timedelta(days=31))
    [warning] = crl_warning(capsys, layout)
    assert f"the CRL {layout.crl} is out of date since " in warning
    assert "refuses every client certificate" in warning
    assert listing(capsys, layout)["crl"]["days_left"] < 0


def test_list_warns_about_revoked_certificates_missing_from_the_crl(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    lost = ca.issue_client("CN:lost")
    crl_module.revoke(ca, format_serial(lost.serial))
    layout.crl.unlink()
    [warning] = crl_warning(capsys, layout)
    assert f"1 revoked certificate(s) but no CRL at {layout.crl}" in warning
    # A CRL written by hand (or an old copy) without the revoked serial:
    crl = crl_module.build_crl(ca, [], number=99, now=datetime.now(UTC), days=30)
    layout.crl.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    [warning] = crl_warning(capsys, layout)
    assert f"revoked certificate(s) {format_serial(lost.serial)} are not on the CRL" in warning


# -- concurrency -----------------------------------------------------------------------


def console_script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    assert beside.exists(), f"console script {name} is not installed: run `make install`"
    return str(beside)


ISSUES_PER_PROCESS = 6


def test_two_concurrent_issuing_processes_record_every_serial_once(
    ca: CertificateAuthority, layout: Layout, tmp_path: Path
) -> None:
    """Two shell loops run the console script side by side, each issuing
    several client certificates into --path directories of its own."""
    script = console_script("sm_ssl_cert")
    env = {**os.environ, INI_DIR_ENV: str(layout.ini_dir)}
    loops = []
    for worker in ("a", "b"):
        commands = " && ".join(
            f'"$0" client --oid=CN:{worker}{i} --path "{tmp_path}/out/{worker}{i}" >/dev/null'
            for i in range(ISSUES_PER_PROCESS)
        )
        loops.append(
            subprocess.Popen(
                ["sh", "-c", commands, script],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for loop in loops:
        out, err = loop.communicate(timeout=PROCESS_TIMEOUT)
        assert loop.returncode == 0, err

    inventory = Inventory.read(layout)
    serials = [entry.serial for entry in inventory.entries]
    assert len(serials) == len(set(serials)), "a serial was recorded twice"
    clients = [entry for entry in inventory.entries if entry.profile == "client"]
    assert len(clients) == 2 * ISSUES_PER_PROCESS
    on_disk = {}
    for worker in ("a", "b"):
        for i in range(ISSUES_PER_PROCESS):
            path = tmp_path / "out" / f"{worker}{i}" / "client.pem"
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            on_disk[format_serial(cert.serial_number)] = (str(path), f"CN={worker}{i}")
    assert {e.serial: (e.path, e.subject) for e in clients} == on_disk
    assert all(entry.status == "valid" for entry in clients)
    assert [entry.profile for entry in inventory.entries].count("ca") == 1
    # No temporary file of the atomic writes is left behind.
    assert sorted(p.name for p in layout.ca_dir.iterdir()) == [
        "inventory.json",
        "inventory.lock",
        "rootCA.key",
        "rootCA.pem",
    ]


def test_serials_are_accepted_as_openssl_and_list_print_them() -> None:
    assert parse_serial("0A:1B:FF") == 0x0A1BFF
    assert parse_serial("0x0a1bff") == 0x0A1BFF
    assert parse_serial(" 0A1BFF ") == 0x0A1BFF
    for bad in ["", "xyz", "0x", "12 34"]:
        with pytest.raises(ValueError):
            parse_serial(bad)
