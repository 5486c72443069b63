"""``stpd status`` and ``sbc status`` against a running stpd, and the
WARNING stpd logs at startup (and daily) when its server certificate or
the root CA expires within 30 days."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sbc.cli
import stpd.config
import stpd.server
from pki import crl as crl_module
from pki.authority import CertificateAuthority
from pki.console import in_days
from pki.layout import Layout
from stpd import __version__
from tests.conftest import Pki, StpdProcess, make_pki, run_sbc, running_stpd, write_stpd_ini
from tests.test_daemon_signals import RawClient, make_tar, wait_active_transfers

BIN = Path(sys.executable).parent
FINGERPRINT = "[0-9A-F]{2}(?::[0-9A-F]{2}){31}"  # as openssl prints it


def run(tool: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / tool), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Pki, StpdProcess]]:
    """The real stpd at level 2. Its ini directory also holds a client
    certificate, so that `stpd status` on the server can ask it."""
    pki = make_pki(tmp_path)
    pki.ca.issue_client("CN:backup-server-admin")
    write_stpd_ini(pki.layout.ini_dir)
    server = StpdProcess(pki.layout.ini_dir, tmp_path / "data")
    try:
        yield pki, server
    finally:
        server.kill()


def check_status(status: dict, active: int) -> None:
    assert status["version"] == __version__
    assert status["level"] == 2
    assert isinstance(status["uptime_seconds"], (int, float)) and status["uptime_seconds"] >= 0
    assert status["active_transfers"] == active
    cert = status["server_certificate"]
    assert cert["subject"] == "CN=localhost"
    assert cert["days_left"] in (824, 825)  # the default validity
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cert["not_after"])  # as everywhere
    storage = status["storage"]
    assert 0 < storage["free_bytes"] <= storage["total_bytes"]
    assert status["data_directory"] == "ok"
    assert status["crl"] is None  # none written


def test_stpd_status_and_sbc_status(daemon: tuple[Pki, StpdProcess]) -> None:
    pki, server = daemon
    where = f"127.0.0.1:{server.port}"
    on_server = ["--ini-dir", str(pki.layout.ini_dir), "--listen", where, "status"]

    result = run("stpd", *on_server, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_status(json.loads(result.stdout), active=0)

    result = run("stpd", *on_server)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"stpd {re.escape(__version__)} at {where}: level 2, up [\d.]+s, 0 active transfers, "
        r"certificate CN=localhost expires in 82[45] days, [\d.]+ of [\d.]+ GB free for "
        r"savesets\n",
        result.stdout,
    ), result.stdout

    # From a client, during an upload: one active transfer.
    client = pki.client_ini("status-client")
    uploader = RawClient(client, server.port)
    body = make_tar()
    uploader.start_upload(body[:1000])
    wait_active_transfers(server.port, client, 1)
    result = run("sbc", "--ini-dir", str(client.ini_dir), "status", "--server", where, "--json")
    assert result.returncode == 0, result.stderr
    check_status(json.loads(result.stdout), active=1)
    assert uploader.finish_upload(body[1000:])[0] == 201
    uploader.close()
    wait_active_transfers(server.port, client, 0)

    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_stpd_status_without_a_running_daemon_is_one_clear_line(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    pki.ca.issue_client("CN:backup-server-admin")
    result = run("stpd", "--ini-dir", str(pki.layout.ini_dir), "--listen", "127.0.0.1:9", "status")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stpd: error: "), result.stderr
    assert (
        "cannot connect to stpd at 127.0.0.1:9: Connection refused; is stpd running there? "
        in lines[0]
    )
    assert (
        f"(the address comes from STPD_HTTPS_LISTEN in {pki.layout.stpd_ini}, or --listen)"
        in lines[0]
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("listen", "asked"),
    [("[::1]:11443", "[::1]:11443"), ("[::]:9", "[::1]:9"), ("0.0.0.0:9", "127.0.0.1:9")],
)
def test_stpd_status_asks_an_ipv6_listen_address_in_brackets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listen: str, asked: str
) -> None:
    """`stpd status` of a daemon listening on an IPv6 address passed
    "::1:11443" to sbc, which took it for a usage error (exit 2). The
    address is written as sbc reads it (no connection made here: the tests
    use 127.x only)."""
    import sbc.cli
    from stpd.cli import status
    from stpd.config import load_config

    pki = make_pki(tmp_path)
    config = load_config(pki.layout, listen=stpd.config.stpd_address(listen))
    seen: list[list[str]] = []
    monkeypatch.setattr(sbc.cli, "main", lambda argv, **_: seen.append(argv) or 0)
    assert status(pki.layout, config, as_json=False) == 0
    assert seen[0][seen[0].index("--server") + 1] == asked


def status_at_level(pki: Pki, level: int, data: Path) -> dict:
    """`stpd status --json` of a real stpd at ``level``, on the server."""
    (pki.layout.ini_dir / "stpd.ini").write_text(
        f"[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT={level}\n"
    )
    server = StpdProcess(pki.layout.ini_dir, data)
    try:
        where = f"127.0.0.1:{server.port}"
        result = run(
            "stpd", "--ini-dir", str(pki.layout.ini_dir), "--listen", where, "status", "--json"
        )
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))
    finally:
        server.stop()


def test_stpd_status_of_a_server_without_a_client_certificate(tmp_path: Path) -> None:
    """Below level 2 stpd serves a client without a certificate, and a
    server seldom has one in x.509/: `stpd status` then presents none
    (it said "certificate .../x.509/client.pem not found"). At level 2 it
    needs one, and says so."""
    pki = make_pki(tmp_path)
    for level in (0, 1):
        assert status_at_level(pki, level, tmp_path / "data")["level"] == level
    write_stpd_ini(pki.layout.ini_dir)
    server = StpdProcess(pki.layout.ini_dir, tmp_path / "data")
    try:
        where = f"127.0.0.1:{server.port}"
        result = run("stpd", "--ini-dir", str(pki.layout.ini_dir), "--listen", where, "status")
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"stpd: error: certificate {pki.layout.client_cert} not found: "
        ), result.stderr
    finally:
        server.stop()


def test_stpd_status_of_a_server_certificate_with_wildcard_names_only(tmp_path: Path) -> None:
    """`stpd status` pins the certificate in ssl/: its names, for the
    clients' hosts, are not checked against the loopback address it
    connects to. It took the first name for a host name, and a wildcard
    (`*.example.test`, `127.0.1.*`: the README's forms) never matched."""
    pki = make_pki(tmp_path, server_names="*.example.test,127.0.1.*")
    status = status_at_level(pki, 0, tmp_path / "data")
    assert status["server_certificate"]["subject"] == "CN=*.example.test"


def test_short_lived_server_certificate_warned_at_startup(tmp_path: Path) -> None:
    """Made the administrator's way: `sm_ssl_cert server --days 10`."""
    ini = tmp_path / "ini"
    assert run("sm_ssl_cert", "--ini-dir", str(ini), "ca").returncode == 0
    made = run(
        "sm_ssl_cert",
        *["--ini-dir", str(ini), "server", "--common-name=localhost,127.0.0.1", "--days", "10"],
    )
    assert made.returncode == 0, made.stderr
    write_stpd_ini(ini)
    server = StpdProcess(ini, tmp_path / "data")
    try:
        warning = server.wait_for(r"WARNING stpd: server certificate ")
        assert re.search(
            r"WARNING stpd: server certificate CN=localhost expires in (9|10) days \(\d{4}-\d\d-\d\d\): "
            rf"renew it with `sm_ssl_cert --ini-dir {re.escape(str(ini))} renew server` and send "
            r"stpd SIGHUP$",
            warning,
        ), warning
        assert not server.matching(r"root CA .* expires in")  # the CA has years left
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    finally:
        server.kill()


def test_an_rds_is_told_to_renew_its_certificate_where_the_ca_is(tmp_path: Path) -> None:
    """An RDS has no CA key: `sm_ssl_cert renew server` there fails, so
    its warning says where and how."""
    layout = Layout(tmp_path / "ini")
    ca = CertificateAuthority.create(layout, days=3650)
    ca.issue_server("localhost,127.0.0.1", days=10)
    layout.ca_key.unlink()  # kept off the RDS, as README says
    with running_stpd(layout) as daemon:
        daemon.log.wait_for(
            r"^WARNING server certificate CN=localhost expires in (9|10) days \([-\d]+\): "
            r"renew it where the CA key is \(`sm_ssl_cert renew server --path DIR` there\), "
            rf"copy server\.pem and server\.key into {re.escape(str(layout.server_dir))} and "
            r"send stpd SIGHUP$"
        )


def test_long_lived_certificates_give_no_warning(pki: Pki) -> None:
    with running_stpd(pki.layout) as daemon:
        daemon.log.wait_for(r"listening on")
        status = daemon.daemon.status()
    assert not daemon.log.matching(r"expires in")
    assert status["server_certificate"]["days_left"] >= 824


def test_ca_near_expiry_warned_and_checked_daily(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA that dies in 20 days takes every certificate with it: warned too.
    The check repeats (daily; here every 50 ms)."""
    layout = Layout(tmp_path / "ini")
    ca = CertificateAuthority.create(layout, days=20)
    ca.issue_server("localhost,127.0.0.1", days=10)
    monkeypatch.setattr(stpd.server, "EXPIRY_CHECK_INTERVAL", 0.05)
    with running_stpd(layout) as daemon:
        # Renewing the server certificate cannot help: it was said to.
        daemon.log.wait_for(
            r"^WARNING root CA CN=.* expires in (19|20) days \([-\d]+\): a root CA is not "
            r"renewed: before then, create a new one on the CA machine \(`sm_ssl_cert ca "
            r"--force`\), re-issue every server and client certificate from it, and copy its "
            r"rootCA.pem to every server and client$"
        )
        daemon.log.wait_for(
            r"^WARNING server certificate CN=localhost expires in (9|10) days \([-\d]+\): "
            rf"renew it with `sm_ssl_cert --ini-dir {re.escape(str(layout.ini_dir))} renew server` "
            r"and send stpd SIGHUP$"
        )

        def repeated() -> bool:
            return len(daemon.log.matching(r"^WARNING root CA .* expires in")) >= 3

        with daemon.log.changed:
            assert daemon.log.changed.wait_for(repeated, 20), "the expiry check did not repeat"
        assert daemon.daemon.status()["server_certificate"]["days_left"] in (9, 10)


def test_sbc_command_output_that_cannot_be_written_is_one_clear_line(pki: Pki) -> None:
    """The real `sbc` command (it ends with os._exit, see sbc.cli.run): its
    JSON to a full disk is an error line and status 1, not a traceback; to a
    pipe it arrives whole."""
    client = pki.client_ini("status-writer")
    with running_stpd(pki.layout, 2) as stpd:
        argv = [str(BIN / "sbc"), "--ini-dir", str(client.ini_dir), "status", "--json"]
        argv += ["--server", stpd.address]
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60
            )
        assert result.returncode == 1
        assert result.stderr == "sbc: error: cannot write the output: No space left on device\n"
        piped = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert piped.returncode == 0, piped.stderr
        check_status(json.loads(piped.stdout), active=0)


@pytest.mark.parametrize(("days", "left"), [(3, "in 2 days"), (1, "in less than a day")])
def test_a_crl_near_its_next_update_is_warned_about_and_shown_in_status(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, days: int, left: str
) -> None:
    """Past its next update the CRL fails every client certificate (see
    test_lifecycle_stpd): stpd warns within CRL_WARNING_DAYS, daily, and
    status shows the date; a new CRL from `sm_ssl_cert crl` ends it. The
    log and `sbc status` count the days alike (with 24 h left they said
    "within 1 day(s)" and "in 0 days")."""
    client = pki.client_ini("crl-watcher")
    crl_module.write_crl(pki.ca, days=days)
    monkeypatch.setattr(stpd.server, "EXPIRY_CHECK_INTERVAL", 0.05)
    warning = (
        rf"^WARNING CRL {re.escape(str(pki.layout.crl))} must be written again before its next "
        rf"update {left} \(\d{{4}}-\d\d-\d\d \d\d:\d\d UTC\), or every client certificate "
        r"fails validation: run `sm_ssl_cert crl` where the CA key is \(e\.g\. weekly from cron\) "
        r"and copy it here$"
    )
    with running_stpd(pki.layout) as daemon:
        daemon.log.wait_for(warning)
        with daemon.log.changed:  # repeated by the daily check
            assert daemon.log.changed.wait_for(
                lambda: len(daemon.log.matching(warning)) >= 2, timeout=10
            )
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "status", "--server", daemon.address
        )
        assert code == 0, err
        assert f", CRL next update {left}, " in out, out  # 2.99 days: 2, as for certificates
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "status", "--server", daemon.address, "--json"
        )
        crl = json.loads(out)["crl"]
        assert crl["days_left"] == days - 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", crl["next_update"])

        crl_module.write_crl(pki.ca)  # the fix: 30 days more
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "status", "--server", daemon.address, "--json"
        )
        assert code == 0, err
        daemon.log.wait_for(r"^INFO CRL .* changed: reloaded$")
        assert json.loads(out)["crl"]["days_left"] == 29
        # Which CRL is in force: a fleet's servers can be compared.
        assert json.loads(out)["crl"]["number"] == crl["number"] + 1 >= 2


@pytest.mark.parametrize(
    ("days", "said"), [(2.99, "in 2 days"), (1.0, "in 1 day"), (0.99, "in less than a day")]
)
def test_in_days(days: float, said: str) -> None:
    assert in_days(days) == said


@pytest.mark.parametrize(
    ("days_left", "hours", "said"),
    [
        (0, 23, "CRL next update in less than a day"),
        (1, 25, "CRL next update in 1 day"),
        (0, -1, "CRL out of date since "),  # days_left is cut toward zero
        (-2, -49, "CRL out of date since "),
    ],
)
def test_sbc_status_counts_crl_days_as_stpd_logs_them(
    capsys: pytest.CaptureFixture[str], days_left: int, hours: int, said: str
) -> None:
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=hours)
    next_update = f"{when:%Y-%m-%dT%H:%M:%SZ}"

    class Answering:
        where = "127.0.0.1:11443"

        def status(self) -> dict:
            return {"crl": {"next_update": next_update, "days_left": days_left}}

    session, args = Answering(), argparse.Namespace(json=False)
    if "since" in said:  # exit status 1, for monitoring: every client certificate fails there
        with pytest.raises(sbc.cli.SbcError, match="has a CRL out of date since"):
            sbc.cli._status(session, args)  # type: ignore[arg-type]
    else:
        sbc.cli._status(session, args)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert f", {said}" in out, out
    if "since" in said:
        assert f"since {next_update}" in out, out


def test_stpd_status_after_a_renewal_not_yet_reloaded(daemon: tuple[Pki, StpdProcess]) -> None:
    """stpd status pins the running daemon to the local ssl/server.pem.
    Renewed but not yet reloaded, they differ: it blamed a pin, "the
    pinned SBC_SERVER_FINGERPRINT", that the administrator never set."""
    pki, server = daemon
    on_server = ["--ini-dir", str(pki.layout.ini_dir), "--listen", f"127.0.0.1:{server.port}"]
    assert (
        run("sm_ssl_cert", "--ini-dir", str(pki.layout.ini_dir), "renew", "server").returncode == 0
    )
    result = run("stpd", *on_server, "status")
    assert result.returncode == 1
    assert re.fullmatch(
        rf"stpd: error: stpd at 127\.0\.0\.1:{server.port} presented certificate {FINGERPRINT}, "
        rf"not that of {re.escape(str(pki.layout.server_cert))} {FINGERPRINT}: the running stpd "
        r"presents another certificate than the one here \(renewed, and not yet reloaded\?\): "
        r"send it SIGHUP \(systemctl reload stpd\)\n",
        result.stderr,
    ), result.stderr
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"INFO stpd: reloaded ", after=mark)
    assert run("stpd", *on_server, "status").returncode == 0
