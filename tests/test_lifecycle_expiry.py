"""`sm_ssl_cert list` warns about certificates in use that expire soon or
have expired, and not about replaced ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pki.authority import CA_RENEWAL, CertificateAuthority
from pki.cli import main
from pki.layout import Layout


def test_list_warns_about_expiry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = Layout(tmp_path / "ini")
    ca = CertificateAuthority.create(layout)
    ca.issue_server("backup.example.test", days=10)
    ca.issue_client("CN:old", out_dir=tmp_path / "old", days=5)
    ca.issue_client("CN:old", out_dir=tmp_path / "old")  # replaces it: superseded, no warning
    ca.issue_client(
        "CN:gone",
        out_dir=tmp_path / "gone",
        not_before=datetime.now(UTC) - timedelta(days=10),
        days=1,
    )
    ca.issue_client("CN:fine", out_dir=tmp_path / "fine")
    capsys.readouterr()

    assert main(["--ini-dir", str(layout.ini_dir), "list", "--json"]) == 0
    out, err = capsys.readouterr()
    warnings = json.loads(out)["warnings"]
    assert any(
        "server certificate CN=backup.example.test" in w
        and "expires in 9 days" in w
        and "sm_ssl_cert renew server" in w
        for w in warnings
    ), warnings
    # Renewed where it was issued: `renew client` alone renews x.509/.
    gone = tmp_path / "gone"
    assert any(
        "client certificate CN=gone" in w
        and w.endswith(f"has expired: renew it with `sm_ssl_cert renew client --path {gone}`")
        for w in warnings
    ), warnings
    assert not any("CN=fine" in w for w in warnings)
    assert not any("CN=old" in w for w in warnings), warnings
    assert err.count("sm_ssl_cert: warning: ") == len(warnings)


def test_list_says_a_root_ca_near_its_end_is_replaced_not_renewed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = Layout(tmp_path / "ini")
    ca = CertificateAuthority.create(layout, days=20)
    ca.issue_server("backup.example.test")
    capsys.readouterr()
    assert main(["--ini-dir", str(layout.ini_dir), "list", "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any(
        w.startswith("ca certificate CN=SEP sesam root CA")
        and w.endswith(f"expires in 19 days: {CA_RENEWAL}")
        for w in warnings
    ), warnings
