"""The RDS fleet: a backup server on 127.0.0.1 and two RDS on 127.0.0.2 and
127.0.0.3, each with its own server certificate from one CA, made the
administrator's way (``sm_ssl_cert server --common-name=127.0.0.X --path=DIR``,
then copied with rootCA.pem, never rootCA.key, into that server's ini
directory). One client backs up to, lists on and restores from each; a
client certificate of another CA is refused by all three at level 2."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest

from pki.cli import main as sm_ssl_cert
from pki.layout import Layout
from sbc.cli import main as sbc
from tests.conftest import RunningStpd, run_sbc, running_stpd
from tests.test_transfer_roundtrip import make_tree, snapshot

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")  # the backup server, RDS 1, RDS 2


def admin(capsys: pytest.CaptureFixture[str], admin_ini: Path, *argv: str) -> str:
    code = sm_ssl_cert(["--ini-dir", str(admin_ini), *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def server_ini(root: Path, admin_ini: Path, issued: Path) -> Layout:
    """What the administrator copies to a server: server.pem and server.key
    into ssl/, rootCA.pem into ca/."""
    layout = Layout(root)
    layout.server_dir.mkdir(parents=True)
    layout.ca_dir.mkdir()
    shutil.copy(issued / "server.pem", layout.server_cert)
    shutil.copy(issued / "server.key", layout.server_key)
    shutil.copy(Layout(admin_ini).ca_cert, layout.ca_cert)
    return layout


def client_ini(root: Path, cert_dir: Path, ca_cert: Path) -> Layout:
    layout = Layout(root)
    layout.ca_dir.mkdir(parents=True)
    shutil.copy(ca_cert, layout.ca_cert)
    shutil.copytree(cert_dir, layout.client_dir)
    layout.sm_ini.write_text("[SBC_SSL]\nSBC_CLIENT_SSL_AUTH=1\nSBC_SSL_SERVER_VERIFY=1\n")
    return layout


def sbc_json(*argv: str) -> object:
    code, out, err = run_sbc(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_backup_server_and_two_rds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin_ini = tmp_path / "admin" / "ini"
    admin(capsys, admin_ini, "ca")
    servers: list[Layout] = []
    for host in HOSTS:
        issued = tmp_path / "issued" / host
        out = admin(capsys, admin_ini, "server", f"--common-name={host}", f"--path={issued}")
        assert str(issued) in out
        servers.append(server_ini(tmp_path / f"server-{host}" / "ini", admin_ini, issued))
    assert not any(layout.ca_key.exists() for layout in servers)
    assert len({layout.server_cert.read_bytes() for layout in servers}) == 3

    admin(capsys, admin_ini, "client", "--oid=CN:fleet-client", f"--path={tmp_path / 'c'}")
    client = client_ini(tmp_path / "client" / "ini", tmp_path / "c", Layout(admin_ini).ca_cert)
    ini = ["--ini-dir", str(client.ini_dir)]

    other_ini = tmp_path / "other-admin" / "ini"
    admin(capsys, other_ini, "ca")
    admin(capsys, other_ini, "client", "--oid=CN:fleet-client", f"--path={tmp_path / 'x'}")
    stranger = client_ini(tmp_path / "stranger" / "ini", tmp_path / "x", Layout(admin_ini).ca_cert)

    with ExitStack() as stack:
        fleet: list[RunningStpd] = [
            stack.enter_context(running_stpd(layout, level=2, host=host))
            for layout, host in zip(servers, HOSTS, strict=True)
        ]
        backups = {}
        for server in fleet:
            tree = make_tree(tmp_path / f"source-{server.host}")
            (tree / "which-server.txt").write_text(f"{server.host}\n")
            meta = sbc_json(*ini, "backup", str(tree), "--server", server.address)
            assert isinstance(meta, dict)
            assert meta["server"].startswith(server.host)  # type: ignore[union-attr]
            server.log.wait_for(rf"^INFO stored saveset {meta['saveset']} .*\(CN=fleet-client\)")
            backups[server.host] = (meta, tree)

        for server in fleet:
            meta, tree = backups[server.host]
            # Each lists only what it stores.
            listed = sbc_json(*ini, "list", "--server", server.address)
            assert [item["saveset"] for item in listed] == [meta["saveset"]]  # type: ignore[union-attr,index]
            assert listed[0]["source"] == str(tree)  # type: ignore[index]
            # Restored from the server that holds it, equal to the original.
            target = tmp_path / f"restored-{server.host}"
            restored = sbc_json(
                *ini, "restore", meta["saveset"], str(target), "--server", server.address
            )
            assert restored["sha256"] == meta["sha256"]  # type: ignore[index]
            assert snapshot(target / "tree") == snapshot(tree)
            assert (target / "tree" / "which-server.txt").read_text() == f"{server.host}\n"
            # And the status names its own certificate.
            status = sbc_json(*ini, "status", "--server", server.address)
            assert status["server_certificate"]["subject"] == f"CN={server.host}"  # type: ignore[index]

        # A client certificate from another CA: refused by every one of them.
        served = [len(server.log.matching(r"authenticated as")) for server in fleet]
        for server in fleet:
            code = sbc(["--ini-dir", str(stranger.ini_dir), "list", "--server", server.address])
            err = capsys.readouterr().err
            assert code == 1
            assert err.count("\n") == 1 and err.startswith("sbc: error: refused by stpd"), err
            assert "our client certificate is not signed by the server's root CA" in err
            server.log.wait_for(
                r"^ERROR refused client 127\.0\.0\.\d+:\d+ \(CN=[^)]+\): not signed by our root CA "
                r"\(STPD_HTTPS_USE_CLIENT_CERT=2\)$"
            )
        assert [len(server.log.matching(r"authenticated as")) for server in fleet] == served
