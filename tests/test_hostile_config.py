"""Broken configuration and keys: ``stpd`` (the real console script) and
``sbc`` refuse to start with one line naming the file or key and the fix,
a non-zero exit status and no traceback."""

from __future__ import annotations

import codecs
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pki.authority import CertificateAuthority
from pki.errors import PkiError
from pki.inifile import ConfigError
from pki.layout import Layout
from pki.tls import client_context
from sbc.config import load_config as load_sbc_config
from tests.conftest import Pki, make_pki, read_only_directory, running_stpd
from tests.test_hostile_common import (
    assert_serves,
    hpki,  # noqa: F401  (fixture)
    run_sbc,
)

STPD = str(Path(sys.executable).parent / "stpd")
START_TIMEOUT = 15  # seconds; a daemon that starts anyway fails the test by this


def run_stpd(ini: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STPD, "--ini-dir", str(ini), "--listen", "127.0.0.1:0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )


def assert_one_line(err: str, prefix: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert err.startswith(prefix), err
    for needle in needles:
        assert needle in err, f"{needle!r} missing from {err!r}"


def _other_key(pki: Pki) -> Path:
    """A valid key that belongs to some other certificate."""
    other = pki.client_ini("someone-else")
    return other.client_key


def break_server(pki: Pki, data: Path, what: str) -> tuple[str, ...]:
    """Break the server side; returns what the error line must contain."""
    layout = pki.layout
    fix = "sm_ssl_cert"
    if what == "missing-cert":  # the CA key is not here (hpki): issued where it is
        layout.server_cert.unlink()
        return (str(layout.server_cert), "not found", "where the CA is", "--path DIR")
    if what == "missing-key":
        layout.server_key.unlink()
        return (str(layout.server_key), "not found", fix)
    if what == "key-not-pem":
        layout.server_key.write_text("not a key\n")
        return (str(layout.server_key), "PEM", fix)
    if what == "key-is-a-directory":
        layout.server_key.unlink()
        layout.server_key.mkdir()
        return (str(layout.server_key), "not a file", fix)
    if what == "cert-not-pem":
        layout.server_cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
        return (str(layout.server_cert), "PEM", fix)
    if what == "key-does-not-match":
        shutil.copy(_other_key(pki), layout.server_key)
        return (str(layout.server_key), "does not match", str(layout.server_cert), fix)
    if what == "ca-not-a-ca":
        shutil.copy(layout.server_cert, layout.ca_cert)
        return (str(layout.ca_cert), "not a CA certificate", fix)
    if what == "ca-not-pem":
        layout.ca_cert.write_text("garbage\n")
        return (str(layout.ca_cert), fix)
    if what == "ca-missing":
        layout.ca_cert.unlink()
        return (str(layout.ca_cert), "not found", fix)
    if what == "data-dir-under-a-file":
        (data.parent / "a-file").write_text("")
        return (str(data.parent / "a-file"), "STPD_DATA_DIR")
    if what in ("level-3", "level-text"):
        value = "3" if what == "level-3" else "two"
        layout.stpd_ini.write_text(f"[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT={value}\n")
        return (str(layout.stpd_ini), "STPD_HTTPS_USE_CLIENT_CERT", "0, 1 or 2")
    if what == "timeout-negative":
        layout.stpd_ini.write_text("[STPD_Server]\nSTPD_IO_TIMEOUT=-1   #seconds\n")
        return (str(layout.stpd_ini), "STPD_IO_TIMEOUT", "seconds > 0")
    raise ValueError(what)


SERVER_CASES = [
    "missing-cert",
    "missing-key",
    "key-not-pem",
    "key-is-a-directory",
    "cert-not-pem",
    "key-does-not-match",
    "ca-not-a-ca",
    "ca-not-pem",
    "ca-missing",
    "data-dir-under-a-file",
    "level-3",
    "level-text",
    "timeout-negative",
]


def test_stpd_without_its_certificate_where_the_ca_is(tmp_path: Path) -> None:
    """The README's example: on the CA's machine the fix is a command to
    paste, with the ini directory stpd was given."""
    pki = make_pki(tmp_path)
    pki.layout.server_cert.unlink()
    result = run_stpd(pki.layout.ini_dir, tmp_path / "data")
    assert result.returncode == 2
    assert result.stderr == (
        f"stpd: error: certificate {pki.layout.server_cert} not found: create it with "
        f"`sm_ssl_cert --ini-dir {pki.layout.ini_dir} server --common-name=<names>`\n"
    )


@pytest.mark.parametrize("what", SERVER_CASES)
def test_stpd_refuses_to_start(hpki: Pki, tmp_path: Path, what: str) -> None:  # noqa: F811
    data = tmp_path / "data"
    needles = break_server(hpki, data, what)
    if what == "data-dir-under-a-file":
        data = tmp_path / "a-file" / "data"
    result = run_stpd(hpki.layout.ini_dir, data)
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, "stpd: error: ", *needles)


def test_stpd_refuses_a_read_only_data_directory(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    with read_only_directory(tmp_path / "ro") as data:
        result = run_stpd(hpki.layout.ini_dir, data)
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, "stpd: error: ", str(data), "STPD_DATA_DIR")


def test_stpd_refuses_a_port_in_use_naming_the_address(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "data").mkdir()  # made by stpd, it would be a warning line too
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [STPD, "--ini-dir", str(hpki.layout.ini_dir), "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=START_TIMEOUT,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert_one_line(
        result.stderr,
        f"stpd: error: cannot listen on 127.0.0.1:{port}: Address already in use; another "
        "process (another stpd?) holds that port",
        "STPD_HTTPS_LISTEN",
    )


def test_a_second_stpd_on_the_same_data_directory_is_refused(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """Its start would have removed the first one's uploads in progress as a
    crash's leftovers."""
    data = tmp_path / "data"
    client = hpki.client_ini("first")
    with running_stpd(hpki.layout, 2, data_dir=data) as stpd:
        in_progress = data / ".incoming" / "SS-20260101T000000Z-0123abcd.tar.part"
        in_progress.write_bytes(b"an upload of the first stpd")
        result = run_stpd(hpki.layout.ini_dir, data)
        assert result.returncode == 2, result.stderr
        assert_one_line(
            result.stderr,
            f"stpd: error: data directory {data} is in use by another stpd",
            "STPD_DATA_DIR",
        )
        assert in_progress.exists()
        in_progress.unlink()
        assert_serves(stpd, client, tmp_path)


def test_stpd_runs_without_the_ca_key(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    assert not hpki.layout.ca_key.exists()
    client = hpki.client_ini("keyless")
    with running_stpd(hpki.layout, 2) as stpd:
        assert_serves(stpd, client, tmp_path)


def test_keys_open_to_other_users_are_warned_about(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """A server or client key that other users may read (copied with the
    wrong umask, say) still works, with a warning that names the fix."""
    client = hpki.client_ini("careless")
    hpki.layout.server_key.chmod(0o644)
    client.client_key.chmod(0o640)
    source = tmp_path / "x.txt"
    source.write_text("x\n")
    with running_stpd(hpki.layout, 2) as stpd:
        stpd.log.wait_for(
            rf"^WARNING private key {re.escape(str(hpki.layout.server_key))} is open to other "
            rf"users \(mode 0644\): chmod 600 {re.escape(str(hpki.layout.server_key))}, owned by the "
            r"user that reads it$"
        )
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "backup", str(source), "--server", stpd.address,
            "--json",
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["saveset"]
        assert err == (
            f"sbc: WARNING: private key {client.client_key} is open to other users (mode 0640): "
            f"chmod 600 {client.client_key}, owned by the user that reads it\n"
        )
    hpki.layout.server_key.chmod(0o600)
    client.client_key.chmod(0o600)
    with running_stpd(hpki.layout, 2) as stpd:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "list", "--server", stpd.address
        )  # fmt: skip
        assert code == 0 and err == "", err
        assert not [line for line in stpd.log.lines if "open to other users" in line]


# -- sbc ---------------------------------------------------------------------------


def break_client(pki: Pki, client: Layout, what: str) -> tuple[str, ...]:
    fix = "sm_ssl_cert"
    if what == "missing-cert":
        client.client_cert.unlink()
        return (str(client.client_cert), "not found", fix)
    if what == "missing-key":
        client.client_key.unlink()
        return (str(client.client_key), "not found", fix)
    if what == "key-not-pem":
        client.client_key.write_text("not a key\n")
        return (str(client.client_key), "PEM", fix)
    if what == "key-does-not-match":
        shutil.copy(_other_key(pki), client.client_key)
        return (str(client.client_key), "does not match", fix)
    if what == "ca-not-a-ca":
        shutil.copy(client.client_cert, client.ca_cert)
        return (str(client.ca_cert), "not a CA certificate", fix)
    if what == "ca-missing":  # (not "create it": that CA would sign nothing stpd has)
        client.ca_cert.unlink()
        return (str(client.ca_cert), "not found", "copy ca/rootCA.pem here from the backup server")
    if what in ("auth-7", "verify-text"):
        key = "SBC_CLIENT_SSL_AUTH" if what == "auth-7" else "SBC_SSL_SERVER_VERIFY"
        value = "7" if what == "auth-7" else "yes"
        client.sm_ini.write_text(f"[SBC_SSL]\n{key}={value}   #comment\n")
        return (str(client.sm_ini), key, "0 or 1")
    raise ValueError(what)


CLIENT_CASES = [
    "missing-cert",
    "missing-key",
    "key-not-pem",
    "key-does-not-match",
    "ca-not-a-ca",
    "ca-missing",
    "auth-7",
    "verify-text",
]


@pytest.mark.parametrize("what", CLIENT_CASES)
def test_sbc_refuses_to_start(hpki: Pki, tmp_path: Path, what: str) -> None:  # noqa: F811
    client = hpki.client_ini("broken")
    needles = break_client(hpki, client, what)
    source = tmp_path / "x.txt"
    source.write_text("x\n")
    for command in (["list"], ["backup", str(source)]):
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), *command, "--server", "127.0.0.1:9"
        )
        assert code == 1 and out == "", err
        assert_one_line(err, "sbc: error: ", *needles)


# -- files there, but closed to the user who runs the program ----------------------------


def as_nobody(action: Callable[[], object]) -> str:
    """``action`` in a child process (forked, so that no interpreter has to
    start as that user) running as the user nobody: the message of the
    PkiError or ConfigError it raised, "" if none."""
    nobody = pwd.getpwnam("nobody")
    # Python's library may lie where that user cannot read (root's pyenv):
    # what the actions load lazily is loaded here first.
    codecs.lookup("utf-8-sig")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        message = ""
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            action()
        except (PkiError, ConfigError) as exc:
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001  (reported to the test)
            message = f"unexpected {exc!r}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_files_closed_to_this_user_are_not_called_missing(tmp_path: Path) -> None:
    """sbc run by a user who may not read the client's key, or sm.ini, or
    the directory they are in, used to say the key "cannot be read as a
    PEM key: create it with sm_ssl_cert client", or to run with sm.ini's
    settings dropped unseen; sm_ssl_cert said "no root CA: create it"."""
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own directories are root's alone
    try:
        shared.chmod(0o755)
        layout = Layout(shared / "ini")
        CertificateAuthority.create(layout).issue_client("CN:closed")
        (layout.ini_dir / "sm.ini").write_text("[SBC]\nSBC_SERVER=127.0.0.1:11443\n")
        for directory in (layout.ini_dir, layout.client_dir):
            directory.chmod(0o755)  # the files alone are closed: keys 0600, owned by root
        fix = "cannot be read by this user (Permission denied): run this as a user who may read it"

        def connect() -> object:
            return client_context(layout, present_cert=True, verify_server=False)

        assert as_nobody(connect).startswith(f"private key {layout.client_key} {fix}")
        layout.client_key.chmod(0o644)
        assert as_nobody(connect) == ""  # readable: no error (the check can pass)
        layout.client_key.chmod(0o600)

        layout.client_dir.chmod(0o700)  # the directory above is closed
        assert as_nobody(connect).startswith(f"certificate {layout.client_cert} {fix}")

        (layout.ini_dir / "sm.ini").chmod(0o600)
        assert as_nobody(lambda: load_sbc_config(layout)).startswith(
            f"configuration file {layout.sm_ini} {fix}"
        )
        (layout.ini_dir / "sm.ini").chmod(0o644)
        assert as_nobody(lambda: load_sbc_config(layout)) == ""

        layout.ca_dir.chmod(0o700)
        assert as_nobody(lambda: CertificateAuthority.load(layout)).startswith(
            f"root CA certificate {layout.ca_cert} {fix}"
        )
    finally:
        shutil.rmtree(shared)


def test_a_root_ca_that_did_not_sign_the_server_certificate_is_an_error_at_start(
    tmp_path: Path,
) -> None:
    """The wrong rootCA.pem copied to an RDS (or a CA made anew without
    re-issuing the server certificate): stpd started as if all were well,
    and each client was refused as "not signed by our root CA", which
    sends its owner to re-issue a certificate that is fine."""
    ours, theirs = make_pki(tmp_path / "ours"), make_pki(tmp_path / "theirs")
    error = (
        rf"^ERROR {re.escape(str(ours.layout.server_cert))} is not signed by "
        rf"{re.escape(str(ours.layout.ca_cert))} \(CN=SEP sesam root CA, a CA of that name made "
        r"anew\?\): this stpd and its clients do not share one CA, .*copy the backup server's "
        r"ca/rootCA\.pem here, or re-issue the server certificate"
    )
    with running_stpd(ours.layout, level=2) as stpd:
        stpd.log.wait_for(r"listening on")
        assert not stpd.log.matching(error)
    # At SIGHUP the pair in force stays: the other CA's server certificate
    # (copied in for the wrong server) was put in force after the ERROR.
    with running_stpd(ours.layout, level=2) as stpd:
        stpd.log.wait_for(r"listening on")
        kept = (ours.layout.server_cert.read_bytes(), ours.layout.server_key.read_bytes())
        shutil.copy(theirs.layout.server_cert, ours.layout.server_cert)
        shutil.copy(theirs.layout.server_key, ours.layout.server_key)
        stpd.reload()
        stpd.log.wait_for(
            r"^ERROR reload refused, the running configuration stays in force: "
            rf"{re.escape(str(ours.layout.server_cert))} is not signed by "
        )
        assert not stpd.log.matching(r"^INFO reloaded ")
        client = ours.client_ini("client1")
        code, _, err = run_sbc("--ini-dir", str(client.ini_dir), "status", "--server", stpd.address)
        assert code == 0, err
    ours.layout.server_cert.write_bytes(kept[0])
    ours.layout.server_key.write_bytes(kept[1])
    shutil.copy(theirs.layout.ca_cert, ours.layout.ca_cert)
    with running_stpd(ours.layout, level=2) as stpd:
        stpd.log.wait_for(error)
    with running_stpd(ours.layout, level=0) as stpd:  # no client is checked against it
        stpd.log.wait_for(r"listening on")
        assert not stpd.log.matching(error)
