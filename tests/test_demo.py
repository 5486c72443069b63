"""The README's first command, ``make demo``: ``python -m bench.demo`` end to end
with the real console scripts (sm_ssl_cert, stpd, sbc) as subprocesses."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT = 120  # seconds; the demo takes a few


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=DEMO_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def demo_dir(output: str) -> Path:
    match = re.search(r"^demo directory: (.+)$", output, re.MULTILINE)
    assert match, output
    return Path(match.group(1))


def test_demo_runs_the_main_job_end_to_end_and_cleans_up() -> None:
    result = run_demo()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "DEMO OK" in result.stdout
    assert "Traceback" not in output

    # The PKI came from the real sm_ssl_cert, and stpd ran at level 2.
    for command in ("sm_ssl_cert --ini-dir", " ca\n", " server --common-name=", " client "):
        assert command in result.stdout, command
    assert re.search(r"INFO stpd: stpd \S+ listening on 127\.0\.0\.1:\d+, .*level 2", output)
    # The CA key went off the server first, so stpd had nothing to warn about.
    assert re.search(r"\$ mv \S+/ini/ca/rootCA\.key \S+/offline-ca\n", result.stdout)
    assert "WARNING" not in output

    # The backup: sbc printed the saveset, and stpd stored it.
    assert re.search(r"\$ \S*sbc --ini-dir \S+ backup ", result.stdout)
    saveset = re.search(r'"saveset": "(SS-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8})"', result.stdout)
    assert saveset, result.stdout
    assert f"INFO stpd: stored saveset {saveset.group(1)} " in result.stdout
    assert "sha256 matches" in result.stdout

    # The list and the restore.
    assert re.search(rf"\$ \S*sbc --ini-dir \S+ list\n\s+{saveset.group(1)} ", result.stdout)
    assert re.search(rf"restored saveset {saveset.group(1)} into .*sha256 verified", result.stdout)

    # The comparison covered every kind of entry and found them equal.
    for kind, name in [
        ("symlink", "latest"),
        ("file", "empty.log"),
        ("file", "Grüße/naïve 文件.txt"),
        ("dir", "docs/deep/nested"),
    ]:
        assert re.search(rf"same\s+{kind}\s+{re.escape(name)}\s", result.stdout), name
    assert "DIFFERENT" not in result.stdout
    assert "equals" in result.stdout
    assert re.search(
        r"only \S+/docs/report\.txt was restored, equal to the original; stpd found the "
        "saveset intact",
        result.stdout,
    )
    assert f"INFO stpd: verified saveset {saveset.group(1)} for " in result.stdout

    # The refused client: one clear sbc line, and the server's ERROR line.
    assert "SBC_CLIENT_SSL_AUTH=0" in result.stdout
    assert re.search(r"\(stderr\) sbc: error: refused by stpd at 127\.0\.0\.1:\d+: ", result.stdout)
    assert re.search(r"ERROR stpd: refused client 127\.0\.0\.1:\d+: ", result.stdout)

    # The server stopped on SIGTERM with status 0, and the directory is gone.
    assert "received SIGTERM" in result.stdout
    assert "[stpd exit status 0]" in result.stdout
    assert not demo_dir(result.stdout).exists()


def test_demo_keep_leaves_the_directory() -> None:
    result = run_demo("--keep")
    assert result.returncode == 0, result.stdout + result.stderr
    work = demo_dir(result.stdout)
    try:
        assert (work / "ini" / "ca" / "rootCA.pem").is_file()
        assert not (work / "ini" / "ca" / "rootCA.key").exists()
        assert (work / "offline-ca" / "rootCA.key").stat().st_mode & 0o777 == 0o600
        assert (work / "ini" / "stpd.ini").is_file()
        assert list((work / "data").glob("SS-*.tar"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
