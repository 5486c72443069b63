"""conf/stpd.service: the systemd unit is valid and hardened.

``systemd-analyze verify`` checks it where systemd is installed; the keys
are always checked by parsing the file, so the test asserts something on
every machine.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pki.layout import DEFAULT_INI_DIR, Layout
from stpd.cli import build_parser
from stpd.config import StpdConfig

UNIT = Path(__file__).resolve().parent.parent / "conf" / "stpd.service"
STPD = Path(sys.executable).parent / "stpd"

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "LockPersonality": "yes",
    "UMask": "0077",
    "CapabilityBoundingSet": "",  # empty: no capability at all
}


def parse_unit(path: Path = UNIT) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return unit


def test_unit_keys() -> None:
    unit = parse_unit()
    service = unit["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{key}= should be {value!r}"
    assert service["Type"] in ("simple", "exec")  # foreground, no forking
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    grace = StpdConfig(layout=Layout(DEFAULT_INI_DIR)).shutdown_grace
    assert grace < float(service["TimeoutStopSec"]) <= grace + 30
    # The data directory is the only writable place besides /run/stpd.
    data_dir = Layout(DEFAULT_INI_DIR).default_data_dir
    assert service["ReadWritePaths"].split() == [str(data_dir)]
    assert service["RuntimeDirectory"] == "stpd"
    # An empty bounding set is only right for an unprivileged, dedicated user.
    assert service["User"] == "sesam"
    assert "dedicated unprivileged user" in UNIT.read_text()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_exec_start_is_a_valid_stpd_command_line() -> None:
    argv = shlex.split(parse_unit()["Service"]["ExecStart"])
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "stpd"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.ini_dir == DEFAULT_INI_DIR
    assert args.pid_file == Path("/run/stpd/stpd.pid")  # inside RuntimeDirectory=stpd


def test_memory_deny_write_execute_left_out_with_its_reason() -> None:
    text = UNIT.read_text()
    assert "MemoryDenyWriteExecute" not in parse_unit()["Service"]
    assert "MemoryDenyWriteExecute=yes is deliberately NOT set" in text
    assert "ffi.callback()" in text


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # linux/prctl.h, Linux >= 6.3


def test_the_reason_holds_cffi_callbacks_fail_without_write_execute_memory() -> None:
    """What MemoryDenyWriteExecute=yes enforces (the kernel's PR_SET_MDWE,
    which systemd uses where available) breaks pyOpenSSL's verify callback.
    If this starts passing the other way, the unit can gain the setting."""
    probe = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
        "    sys.exit(77)\n"
        "from OpenSSL import SSL\n"
        "ctx = SSL.Context(SSL.TLS_METHOD)\n"
        "try:\n"
        "    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)\n"
        "except MemoryError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3): cannot try it here")
    assert result.returncode == 3, (
        "pyOpenSSL's verify callback now works without write+execute memory: "
        f"consider MemoryDenyWriteExecute=yes in conf/stpd.service ({result.stderr})"
    )
    assert "write+execute memory" in result.stdout


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Where systemd-analyze exists, it must accept the unit without a
    complaint. ExecStart points at an installed binary that does not exist
    on a test machine, so the copy verified runs this environment's stpd."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # No systemd here: the unit's keys are still checked by test_unit_keys
        # and test_exec_start_is_a_valid_stpd_command_line (parsed, not run).
        unit = parse_unit()
        assert set(HARDENING) <= set(unit["Service"])
        return
    text = UNIT.read_text()
    installed = shlex.split(parse_unit()["Service"]["ExecStart"])[0]
    copy = tmp_path / "stpd.service"
    copy.write_text(text.replace(f"ExecStart={installed} ", f"ExecStart={STPD} "))
    assert copy.read_text() != text
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "stpd.service" in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints == []


def test_systemd_analyze_verify_would_complain(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (test_unit_keys checks the keys)")
    installed = shlex.split(parse_unit()["Service"]["ExecStart"])[0]
    copy = tmp_path / "stpd.service"
    copy.write_text(
        UNIT.read_text()
        .replace(f"ExecStart={installed} ", f"ExecStart={STPD} ")
        .replace("ProtectHome=yes", "ProtectHom=yes")
    )
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'ProtectHom'" in result.stdout + result.stderr
