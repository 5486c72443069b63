"""`sm_ssl_cert list` warns about certificates in use that expire soon or
have expired, and not about replaced ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pki.authority import CA_RENEWAL, CertificateAuthority
from pki.cli import main
from pki.console import expiry_in_words
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
        and f"sm_ssl_cert --ini-dir {layout.ini_dir} renew server`" in w
        for w in warnings
    ), warnings
    # Renewed where it was issued: `renew client` alone renews x.509/, and
    # without --ini-dir the default ini directory's.
    gone = tmp_path / "gone"
    assert any(
        "client certificate CN=gone" in w
        and w.endswith(
            "expired 9 days ago: renew it with "
            f"`sm_ssl_cert --ini-dir {layout.ini_dir} renew client --path {gone}`"
        )
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


@pytest.mark.parametrize(
    ("days", "said"),
    [
        (2.9, "expires in 2 days"),
        (1.0, "expires in 1 day"),
        (0.5, "expires in less than a day"),
        (-0.5, "expired less than a day ago"),
        (-1.5, "expired 1 day ago"),
        (-2.5, "expired 2 days ago"),
    ],
)
def test_expiry_in_words(days: float, said: str) -> None:
    """Counted with %d, 12 hours left was "expires in 0 days", and past
    ones "expires in -2 days"."""
    assert expiry_in_words(days) == said


def test_list_says_half_a_day_left_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = Layout(tmp_path / "ini")
    ca = CertificateAuthority.create(layout)
    ca.issue_server(
        "backup.example.test", not_before=datetime.now(UTC) - timedelta(hours=12), days=1
    )
    capsys.readouterr()
    assert main(["--ini-dir", str(layout.ini_dir), "list", "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any(
        "CN=backup.example.test" in w and "expires in less than a day: " in w for w in warnings
    ), warnings
