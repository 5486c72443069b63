"""``python -m bench.run --quick``: the benchmark runs end to end with tiny
sizes, checks its transfers, writes its results JSON and cleans up. No speed
is asserted: the figures of a quick run mean nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import BenchError, run, wait_all
from bench.common import start as start_command
from bench.peer import find_nginx

ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT = 300  # seconds; a quick run takes a few
CASES = ("single_file", "small_files", "restore", "small_restore", "concurrent")


def run_bench(output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(output), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=BENCH_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def check_cleaned_up(stdout: str) -> None:
    work = re.search(r"^work directory: (.+)$", stdout, re.MULTILINE)
    assert work, stdout
    assert not Path(work.group(1)).exists(), "the work directory was left behind"
    for name in ("stpd", "nginx"):
        started = re.search(rf"^{name} pid (\d+) ", stdout, re.MULTILINE)
        if started:
            assert not Path(f"/proc/{started.group(1)}").exists(), f"{name} still runs"


def test_quick_run_of_ours_only_writes_the_results(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    result = run_bench(output, "--no-peer")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Traceback" not in text
    results = json.loads(output.read_text())
    for case in CASES:
        assert {"ours", "peer", "ratio"} <= results[case].keys(), case
        assert results[case]["ours"] > 0, case
        assert results[case]["peer"] is None and results[case]["ratio"] is None, case
        # CPU seconds of the run's commands (sbc: at least its start) and of stpd
        [(clients, server)] = results["runs"][case]["cpu_s_ours"]
        assert clients > 0.01 and server >= 0, case
    assert set(results["rss_mib"]) == {"stpd", "sbc"}
    assert results["rss_mib"]["stpd"] > 0 and results["rss_mib"]["sbc"] > 0
    assert results["parameters"]["runs"] == 1
    assert re.search(r"^single_file\s+[\d,.]+(\s+-){4}\s+MB/s$", result.stdout, re.MULTILINE)
    assert results["peer_sha256"]["single_file"] == {"peer": None, "ratio": None}
    check_cleaned_up(result.stdout)


@pytest.mark.skipif(
    find_nginx() is None or shutil.which("curl") is None,
    reason="nginx or curl not installed (make bench installs them)",
)
def test_quick_run_against_nginx_and_curl(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    result = run_bench(output)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    results = json.loads(output.read_text())
    for case in CASES:
        entry = results[case]
        assert entry["ours"] > 0 and entry["peer"] > 0, case
        assert entry["ratio"] == pytest.approx(entry["ours"] / entry["peer"], rel=0.01), case
        # the peer again with openssl dgst -sha256 of the same bytes beside it
        hashed = results["peer_sha256"][case]
        assert hashed["peer"] > 0, case
        assert hashed["ratio"] == pytest.approx(entry["ours"] / hashed["peer"], rel=0.01), case
        assert len(results["runs"][case]["cpu_s_peer+sha256"]) == 1, case
    assert re.search(r"^restore(\s+[\d,.]+x?){5}\s+MB/s$", result.stdout, re.MULTILINE)
    assert text.count("peer check: nginx stored") == 3  # single file, tar stream, one client
    check_cleaned_up(result.stdout)


def test_measured_rss_is_the_commands_own_not_the_benchmarks() -> None:
    """A child's ru_maxrss includes the peak RSS of the process it was forked
    from; the launcher keeps this (big) test process out of the figure."""
    ballast = bytearray(300 << 20)
    ballast[::4096] = b"x" * len(range(0, len(ballast), 4096))  # touch every page
    small = [sys.executable, "-S", "-c", "pass"]
    measured = run(small, 30, measure_rss=True)
    assert measured.returncode == 0 and measured.maxrss_kib is not None
    assert measured.maxrss_kib < 64 * 1024  # a bare interpreter, not our 300 MiB
    grown = run(
        [sys.executable, "-S", "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * 51200"],
        30,
        measure_rss=True,
    )
    assert grown.maxrss_kib is not None and grown.maxrss_kib > 200 * 1024
    del ballast
    failing = run([sys.executable, "-S", "-c", "raise SystemExit(3)"], 30, measure_rss=True)
    assert failing.returncode == 3


def test_a_measured_command_past_its_deadline_is_killed_with_its_launcher() -> None:
    proc = start_command(
        [sys.executable, "-S", "-c", "import time; time.sleep(600)"], measure_rss=True
    )
    with pytest.raises(BenchError, match="still running"):
        wait_all([proc], 0.5)
    assert proc.returncode is not None
    # The command itself (the launcher's child) was killed too: nothing in
    # their process group runs (a zombie waits for init to reap it).
    assert [state for state in group_states(proc.popen.pid) if state != "Z"] == []


def group_states(pgid: int) -> list[str]:
    """The states (R, S, Z, ...) of the processes in a process group."""
    states = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid:
            states.append(fields[0])
    return states
