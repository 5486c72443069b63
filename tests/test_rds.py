"""A Remote Device Server: a second stpd on 127.0.0.2 with its own server
certificate (``sm_ssl_cert server --common-name=127.0.0.2 --path=DIR``) from
the same CA. One client backs up to, lists and restores from either."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pki.cli import main as sm_ssl_cert
from pki.layout import Layout
from sbc.cli import main as sbc
from tests.conftest import Pki, run_sbc, running_stpd
from tests.test_transfer_roundtrip import make_tree, snapshot

RDS_HOST = "127.0.0.2"


def make_rds(pki: Pki, root: Path, capsys: pytest.CaptureFixture[str]) -> Layout:
    """What the administrator does: issue on the backup server with --path,
    then copy server.pem/server.key into the RDS's ssl/ and rootCA.pem into
    its ca/ (never rootCA.key)."""
    issued_dir = root / "issued-for-rds"
    main_server_pem = pki.layout.server_cert.read_bytes()
    code = sm_ssl_cert(
        [
            "--ini-dir",
            str(pki.layout.ini_dir),
            "server",
            f"--common-name={RDS_HOST}",
            f"--path={issued_dir}",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "next: copy server.pem and server.key into ssl/ of the RDS" in out
    assert pki.layout.server_cert.read_bytes() == main_server_pem  # ssl/ untouched

    rds = Layout(root / "rds" / "ini")
    rds.server_dir.mkdir(parents=True)
    rds.ca_dir.mkdir()
    shutil.copy(issued_dir / "server.pem", rds.server_cert)
    shutil.copy(issued_dir / "server.key", rds.server_key)
    shutil.copy(pki.layout.ca_cert, rds.ca_cert)
    assert not rds.ca_key.exists()
    return rds


def sbc_json(*argv: str) -> object:
    code, out, err = run_sbc(*argv)
    assert code == 0, err
    assert err == ""
    return json.loads(out)


def test_one_client_two_servers(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rds_layout = make_rds(pki, tmp_path, capsys)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    tree_main = make_tree(tmp_path / "for-main")
    tree_rds = make_tree(tmp_path / "for-rds")
    (tree_rds / "only-on-rds.txt").write_text("rds\n")

    with (
        running_stpd(pki.layout, level=2) as main,
        running_stpd(rds_layout, level=2, host=RDS_HOST) as rds,
    ):
        assert main.daemon.store.root != rds.daemon.store.root
        assert rds.address.startswith(f"{RDS_HOST}:")

        # Each presents its own certificate.
        status = sbc_json(*ini, "status", "--server", rds.address, "--json")
        assert status["server_certificate"]["subject"] == f"CN={RDS_HOST}"  # type: ignore[index]
        status = sbc_json(*ini, "status", "--server", main.address, "--json")
        assert status["server_certificate"]["subject"] == "CN=localhost"  # type: ignore[index]

        on_main = sbc_json(*ini, "backup", str(tree_main), "--server", main.address, "--json")
        on_rds = sbc_json(*ini, "backup", str(tree_rds), "--server", rds.address, "--json")
        assert isinstance(on_main, dict) and isinstance(on_rds, dict)
        rds.log.wait_for(r"^INFO client 127\.0\.0\.1:\d+ authenticated as CN=client1$")
        rds.log.wait_for(rf"^INFO stored saveset {on_rds['saveset']} from .*\(CN=client1\)")
        main.log.wait_for(rf"^INFO stored saveset {on_main['saveset']} from .*\(CN=client1\)")

        # Each lists only its own savesets.
        listed_main = sbc_json(*ini, "list", "--server", main.address, "--json")
        listed_rds = sbc_json(*ini, "list", "--server", rds.address, "--json")
        assert [m["saveset"] for m in listed_main] == [on_main["saveset"]]  # type: ignore[union-attr,index]
        assert [m["saveset"] for m in listed_rds] == [on_rds["saveset"]]  # type: ignore[union-attr,index]
        assert listed_rds[0]["source"] == str(tree_rds)  # type: ignore[index]
        assert not (main.daemon.store.root / f"{on_rds['saveset']}.tar").exists()
        assert not (rds.daemon.store.root / f"{on_main['saveset']}.tar").exists()

        # Restore from either.
        for server, meta, tree in ((main, on_main, tree_main), (rds, on_rds, tree_rds)):
            target = tmp_path / f"restored-{server.host}"
            restored = sbc_json(
                *ini,
                *["restore", meta["saveset"], str(target), "--server", server.address, "--json"],
            )
            assert restored["sha256"] == meta["sha256"]  # type: ignore[index]
            assert snapshot(target / "tree") == snapshot(tree)

        # A saveset lives on the server that stored it only.
        code = sbc(
            [
                *ini,
                *["restore", on_rds["saveset"], str(tmp_path / "x"), "--server", main.address],
            ]
        )
        err = capsys.readouterr().err
        assert code == 1
        assert f"no saveset {on_rds['saveset']} for this client" in err


def test_rds_certificate_is_not_valid_for_the_backup_server_name(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The RDS certificate names 127.0.0.2 only; used on 127.0.0.1 the
    client refuses it (and the backup server's is not valid on the RDS)."""
    rds_layout = make_rds(pki, tmp_path, capsys)
    client = pki.client_ini("client1")
    with running_stpd(rds_layout, level=2, host="127.0.0.1") as misplaced:
        code = sbc(["--ini-dir", str(client.ini_dir), "list", "--server", misplaced.address])
        err = capsys.readouterr().err
    assert code == 1
    assert f"server certificate names {RDS_HOST} do not match host 127.0.0.1" in err
    with running_stpd(pki.layout, level=2, host=RDS_HOST) as misplaced:
        code = sbc(["--ini-dir", str(client.ini_dir), "list", "--server", misplaced.address])
        err = capsys.readouterr().err
    assert code == 1
    assert f"server certificate names localhost, 127.0.0.1 do not match host {RDS_HOST}" in err


def test_rds_runs_without_the_ca_key(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The RDS has ca/rootCA.pem but not rootCA.key, and validates clients
    at level 2 all the same: one of another CA is refused."""
    rds_layout = make_rds(pki, tmp_path, capsys)
    stranger = pki.client_ini("stranger", cert="other-ca")
    with running_stpd(rds_layout, level=2, host=RDS_HOST) as rds:
        code = sbc(["--ini-dir", str(stranger.ini_dir), "list", "--server", rds.address])
        err = capsys.readouterr().err
        rds.log.wait_for(
            r"^ERROR refused client 127\.0\.0\.1:\d+ \(CN=[^)]+\): not signed by our root CA "
            r"\(STPD_HTTPS_USE_CLIENT_CERT=2\)$"
        )
    assert code == 1
    assert "our client certificate is not signed by the server's root CA" in err
