"""sm_ssl_cert in-process (main([...])) and once as the installed console script."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from pki.authority import CertificateAuthority, format_serial
from pki.cli import main
from pki.layout import INI_DIR_ENV, Layout
from tests.conftest import read_only_directory, tree


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    return tmp_path / "ini"


@pytest.fixture
def with_ca(ini: Path, capsys: pytest.CaptureFixture[str]) -> Layout:
    assert main(["--ini-dir", str(ini), "ca"]) == 0
    capsys.readouterr()
    return Layout(ini)


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path, message: str) -> None:
    """argv fails with exit status 2 and one error line, and changes no file under root."""
    before = tree(root)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("sm_ssl_cert: error: ")
    assert captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    assert message in captured.err
    assert tree(root) == before


# -- ca ------------------------------------------------------------------------------


def test_ca(ini: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ini-dir", str(ini), "ca"]) == 0
    out = capsys.readouterr().out
    layout = Layout(ini)
    assert f"wrote root CA key:         {layout.ca_key} (mode 0600)" in out
    assert f"wrote root CA certificate: {layout.ca_cert}" in out
    assert "subject:     CN=SEP sesam root CA" in out
    assert "ECDSA P-256" in out
    assert "(7300 days; --days changes it)" in out
    assert f"serial:      {format_serial(load(layout.ca_cert).serial_number)}\n" in out
    assert sorted(tree(ini)) == ["ca/rootCA.key", "ca/rootCA.pem"]
    assert mode(layout.ca_key) == 0o600
    assert mode(layout.ca_dir) == 0o700
    assert out.splitlines()[-1] == (
        f"next: issue certificates with `sm_ssl_cert --ini-dir {ini} server --common-name=...` "
        f"and `sm_ssl_cert --ini-dir {ini} client`; then keep rootCA.key off the server (only "
        "issuing needs it)"
    )


def test_ca_refuses_to_replace_without_force(
    with_ca: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    fails(
        ["--ini-dir", str(with_ca.ini_dir), "ca"],
        capsys,
        with_ca.ini_dir,
        f"a root CA already exists at {with_ca.ca_cert}: replacing it invalidates every "
        f"certificate it issued; to replace it anyway (the old files are moved aside), "
        f"run `sm_ssl_cert --ini-dir {with_ca.ini_dir} ca --force`",
    )


def test_ca_force_rsa_days(with_ca: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    old = with_ca.ca_cert.read_bytes()
    argv = ["--ini-dir", str(with_ca.ini_dir), "ca", "--force", "--key-type", "rsa"]
    assert main([*argv, "--days", "4000"]) == 0
    out = capsys.readouterr().out
    assert out.count("moved aside: ") == 2
    assert "RSA 3072 bit" in out
    assert "(4000 days; --days changes it)" in out
    # What a replaced CA means for the fleet (it said "issue certificates", as for a new one).
    assert out.splitlines()[-1].startswith(
        "next: every certificate of the old CA is now refused, so re-issue them all: "
    )
    assert isinstance(load(with_ca.ca_cert).public_key(), rsa.RSAPublicKey)
    aside = [p for p in with_ca.ca_dir.iterdir() if p.name.startswith("rootCA.pem.old-")]
    assert [p.read_bytes() for p in aside] == [old]


def test_ini_dir_from_environment_and_option_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(INI_DIR_ENV, str(tmp_path / "env"))
    assert main(["ca"]) == 0
    assert (tmp_path / "env" / "ca" / "rootCA.pem").exists()
    # The option wins, before or after the command.
    assert main(["--ini-dir", str(tmp_path / "before"), "ca"]) == 0
    assert main(["ca", "--ini-dir", str(tmp_path / "after")]) == 0
    assert (tmp_path / "before" / "ca" / "rootCA.pem").exists()
    assert (tmp_path / "after" / "ca" / "rootCA.pem").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after", "before", "env"]
    capsys.readouterr()


# -- server --------------------------------------------------------------------------


def test_server(with_ca: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--ini-dir", str(with_ca.ini_dir), "server"]
    assert main([*argv, "--common-name=myserver,192.168.1.10,*.d.example,192.168.1.*"]) == 0
    out = capsys.readouterr().out
    assert f"wrote server key:         {with_ca.server_key} (mode 0600)" in out
    assert f"wrote server certificate: {with_ca.server_cert}" in out
    assert "subject:     CN=myserver" in out
    assert "issuer:      CN=SEP sesam root CA" in out
    assert "names:       myserver, 192.168.1.10, *.d.example, 192.168.1.*" in out
    assert "(825 days; --days changes it)" in out
    assert "note: IP wildcards (192.168.1.*) are honoured by sbc only" in out
    cert = load(with_ca.server_cert)
    assert f"{cert.serial_number:X}" in out
    assert f"valid until: {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" in out
    assert mode(with_ca.server_key) == 0o600
    assert mode(with_ca.server_dir) == 0o700


def test_server_for_an_rds(
    with_ca: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rds = tmp_path / "rds1"
    argv = ["--ini-dir", str(with_ca.ini_dir), "server", "--common-name", "rds1", "--path"]
    assert main([*argv, str(rds), "--days", "30", "--key-type", "rsa"]) == 0
    out = capsys.readouterr().out
    assert "RSA 3072 bit" in out and "(30 days;" in out
    assert "next: copy server.pem and server.key into ssl/ of the RDS" in out
    assert sorted(tree(rds)) == ["server.key", "server.pem"]
    assert mode(rds) == 0o700 and mode(rds / "server.key") == 0o600
    assert not with_ca.server_dir.exists()
    assert "IP wildcards" not in out


def test_reissuing_a_server_moves_the_old_pair_aside(
    with_ca: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--ini-dir", str(with_ca.ini_dir), "server", "--common-name=a"]
    assert main(argv) == 0
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.count("moved aside: ") == 2
    assert err == ""  # the same names: a renewal of this machine's own
    assert len(list(with_ca.server_dir.iterdir())) == 4
    # Other names without --path: an RDS's certificate issued into this
    # machine's ssl/ replaced the backup server's own without a word.
    assert main([*argv[:-1], "--common-name=rds3.example,10.0.0.3"]) == 0
    assert capsys.readouterr().err == (
        "sm_ssl_cert: warning: this replaced the certificate of this machine's stpd (a) in "
        f"{with_ca.server_dir}, moved aside as shown: for another server (an RDS), issue with "
        "--path DIR and move the old files back; else send this stpd SIGHUP\n"
    )


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("foo.*.com", "invalid name 'foo.*.com' in --common-name: a wildcard is either"),
        ("300.1.1.1", "invalid name '300.1.1.1' in --common-name: not a valid IPv4 address"),
        ("a,,b", "--common-name 'a,,b' has an empty item (position 2): remove the extra comma"),
        ("a,", "has an empty item (position 2)"),
        ("my server", "invalid name 'my server' in --common-name: names must not contain spaces"),
        ("", "--common-name is empty"),
        ("*", "invalid name '*'"),
        ("*.com", "invalid name '*.com'"),
        (
            "a\nb",
            "invalid name 'a\\nb' in --common-name: names must not contain control characters",
        ),
        (
            "ab\n",
            "invalid name 'ab\\n' in --common-name: names must not contain control characters",
        ),
    ],
)
def test_server_rejects_bad_names(
    with_ca: Layout, capsys: pytest.CaptureFixture[str], names: str, message: str
) -> None:
    argv = ["--ini-dir", str(with_ca.ini_dir), "server", f"--common-name={names}"]
    fails(argv, capsys, with_ca.ini_dir, message)
    assert not with_ca.server_dir.exists()


# -- client --------------------------------------------------------------------------


def test_client_with_oid(with_ca: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--ini-dir", str(with_ca.ini_dir), "client", "--oid=C:DE,CN:c1,O:Acme AG,OU:Backup"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote client key:         {with_ca.client_key} (mode 0600)" in out
    assert "subject:     C=DE, CN=c1, O=Acme AG, OU=Backup" in out
    assert load(with_ca.client_cert).subject.rfc4514_string() == "OU=Backup,O=Acme AG,CN=c1,C=DE"
    assert mode(with_ca.client_dir) == 0o700 and mode(with_ca.client_key) == 0o600


def test_client_defaults_and_options(
    with_ca: Layout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("pki.authority.socket.gethostname", lambda: "client-host")
    out_dir = tmp_path / "elsewhere"
    argv = ["--ini-dir", str(with_ca.ini_dir), "client", "--path", str(out_dir)]
    assert main([*argv, "--days", "10", "--key-type", "rsa"]) == 0
    out = capsys.readouterr().out
    assert "subject:     CN=client-host" in out
    assert "RSA 3072 bit" in out and "(10 days;" in out
    assert sorted(tree(out_dir)) == ["client.key", "client.pem"]
    assert not with_ca.client_dir.exists()


def test_signing_with_a_ca_key_open_to_others_warns(
    with_ca: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    """stpd and sbc warn of their own keys at a loose mode; sm_ssl_cert
    signed with a rootCA.key anyone on the machine could read, silently."""
    with_ca.ca_key.chmod(0o644)
    assert main(["--ini-dir", str(with_ca.ini_dir), "client", "--oid", "CN:x"]) == 0
    err = capsys.readouterr().err
    assert err == (
        f"sm_ssl_cert: warning: root CA key {with_ca.ca_key} is open to other users (mode "
        f"0644): chmod 600 {with_ca.ca_key}, owned by the user that reads it\n"
    )
    with_ca.ca_key.chmod(0o600)
    assert main(["--ini-dir", str(with_ca.ini_dir), "crl"]) == 0
    assert capsys.readouterr().err == ""


def test_a_certificate_does_not_outlive_its_ca(
    ini: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`client --days 36500` under a CA with 30 days left printed a validity
    centuries past the CA's end (every certificate dies with it, as the
    README says): it ends with the CA now, and the output says why."""
    assert main(["--ini-dir", str(ini), "ca", "--days", "30"]) == 0
    capsys.readouterr()
    assert main(["--ini-dir", str(ini), "client", "--oid", "CN:long", "--days", "36500"]) == 0
    out = capsys.readouterr().out
    layout = Layout(ini)
    cert, ca = load(layout.client_cert), load(layout.ca_cert)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc
    assert (
        f"  valid until: {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (not the 36500 days asked "
        "for: the root CA ends then, and every certificate with it)\n"
    ) in out
    assert main(["--ini-dir", str(ini), "client", "--oid", "CN:short", "--days", "10"]) == 0
    assert "(10 days; --days changes it)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("oid", "message"),
    [
        ("X:1", "unknown --oid key 'X': use one of C, CN, DQ, GN, GQ, I, L, N, O, OU, P, PC, S, T"),
        ("CN:", "--oid key CN has an empty value: write CN:<value>"),
        ("CN:a,O:", "--oid key O has an empty value"),
        ("CN", "--oid item 'CN' has no colon: write KEY:VALUE, for example CN:CN"),
        ("CN=host1,o=Acme", "--oid item 'CN=host1' has no colon: write KEY:VALUE, here CN:host1"),
        ("X=1", "--oid item 'X=1' has no colon: write KEY:VALUE, for example CN:X=1"),
        ("CN:a,,O:b", "--oid 'CN:a,,O:b' has an empty item (position 2): remove the extra comma"),
        ("CN:a,", "has an empty item (position 2)"),
        ("", "--oid is empty"),
        (
            "C:Germany",
            "--oid C:Germany is not a country code: use two letters (ISO 3166), e.g. C:DE",
        ),
        ("CN:a,CN:b", "--oid key CN is given twice: keep one CN:<value>"),
        # A control character in a value was taken, and went raw into the
        # output and every `list` table.
        (
            "CN:nl\nx",
            "--oid CN: value 'nl\\nx' holds the control character '\\n': a subject is "
            "printable text on one line",
        ),
        ("CN:a,O:a\x1b[31m", "--oid O: value 'a\\x1b[31m' holds the control character '\\x1b'"),
        ("CN:a\tb", "--oid CN: value 'a\\tb' holds the control character '\\t'"),
        ("CN:a\x85b", "--oid CN: value 'a\\x85b' holds the control character '\\x85'"),
        ("CN:a\u2028b", "--oid CN: value 'a\\u2028b' holds the control character '\\u2028'"),
    ],
)
def test_client_rejects_bad_oid(
    with_ca: Layout, capsys: pytest.CaptureFixture[str], oid: str, message: str
) -> None:
    fails(
        ["--ini-dir", str(with_ca.ini_dir), "client", f"--oid={oid}"],
        capsys,
        with_ca.ini_dir,
        message,
    )
    assert not with_ca.client_dir.exists()


# -- missing CA, clean-ssl, usage and system errors ------------------------------------


@pytest.mark.parametrize(
    "command", [["server", "--common-name=myserver"], ["client"], ["client", "--oid=CN:a"]]
)
def test_issuing_without_a_ca(
    ini: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    fails(
        ["--ini-dir", str(ini), *command],
        capsys,
        ini,
        f"no root CA at {ini}/ca/rootCA.pem: create it with `sm_ssl_cert --ini-dir {ini} ca`",
    )
    assert not ini.exists()


def test_issuing_without_the_ca_key(with_ca: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    with_ca.ca_key.unlink()
    fails(
        ["--ini-dir", str(with_ca.ini_dir), "client"],
        capsys,
        with_ca.ini_dir,
        f"no root CA key at {with_ca.ca_key}",
    )


# -- an encrypted root CA key --------------------------------------------------------

PASSPHRASE = "correct horse battery staple"


def passphrase_file(directory: Path, text: str = PASSPHRASE, file_mode: int = 0o600) -> Path:
    path = directory / "ca.pass"
    path.write_text(text + "\n")
    path.chmod(file_mode)
    return path


def test_root_ca_key_encrypted_with_a_passphrase(
    ini: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ca --passphrase-file` writes rootCA.key encrypted, which OpenSSL
    reads with that file and not without; every command that signs then
    needs the file, and what it signs verifies."""
    secret = passphrase_file(tmp_path)
    assert main(["--ini-dir", str(ini), "ca", "--passphrase-file", str(secret)]) == 0
    layout = Layout(ini)
    assert "(mode 0600, encrypted with the passphrase)" in capsys.readouterr().out
    assert mode(layout.ca_key) == 0o600
    assert layout.ca_key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    read_key = ["openssl", "pkey", "-in", str(layout.ca_key), "-noout", "-passin"]
    assert subprocess.run([*read_key, f"file:{secret}"], capture_output=True).returncode == 0
    assert subprocess.run([*read_key, "pass:wrong"], capture_output=True).returncode != 0
    given = ["--passphrase-file", str(secret)]
    for command in (
        ["server", "--common-name=localhost"],
        ["client"],
        ["renew", "server"],
        ["revoke", str(layout.client_cert)],
        ["crl"],
    ):
        fails(
            ["--ini-dir", str(ini), *command],
            capsys,
            ini,
            f"the root CA key {layout.ca_key} is encrypted: pass --passphrase-file FILE",
        )
        assert main(["--ini-dir", str(ini), *command, *given]) == 0
        assert capsys.readouterr().err == ""
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(layout.ca_cert), "-CRLfile", str(layout.crl),
         "-crl_check", str(layout.server_cert)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr

    # A CA made anew over it without the file: its key is not encrypted, and said so.
    assert main(["--ini-dir", str(ini), "ca", "--force"]) == 0
    assert capsys.readouterr().err == (
        f"sm_ssl_cert: warning: the new {layout.ca_key} is NOT encrypted, unlike the one moved "
        "aside: to encrypt it, run `ca --force --passphrase-file FILE` again, or "
        "`openssl pkey -aes256` (README, encrypted rootCA.key)\n"
    )
    assert layout.ca_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_key_encrypted_with_openssl_is_read_with_its_passphrase(
    with_ca: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """How README says to encrypt an existing root CA key."""
    secret = passphrase_file(tmp_path)
    encrypted = tmp_path / "rootCA.key.enc"
    subprocess.run(
        ["openssl", "pkey", "-in", str(with_ca.ca_key), "-aes256", "-passout", f"file:{secret}",
         "-out", str(encrypted)],
        check=True,
    )  # fmt: skip
    encrypted.replace(with_ca.ca_key)
    argv = ["--ini-dir", str(with_ca.ini_dir), "client", "--passphrase-file", str(secret)]
    assert main(argv) == 0, capsys.readouterr().err


def kdf_iterations(key: Path) -> int:
    """The PBKDF2 iteration count of an encrypted PKCS#8 key, as
    ``openssl asn1parse`` shows it: the first INTEGER (after the salt)."""
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-in", str(key)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"prim: INTEGER\s+:([0-9A-F]+)", parsed)
    assert match, parsed
    return int(match[1], 16)


def test_the_kdf_iterations_raised_as_readme_says(
    ini: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cryptography writes 2,048 PBKDF2 iterations and cannot be told more
    for PKCS#8; README's openssl command raises them to 600,000, and
    OpenSSL and every command that signs still read the key."""
    secret = passphrase_file(tmp_path)
    assert main(["--ini-dir", str(ini), "ca", "--passphrase-file", str(secret)]) == 0
    layout = Layout(ini)
    assert kdf_iterations(layout.ca_key) == 2048
    with pytest.raises(ValueError, match="only supported with PrivateFormat.OpenSSH"):
        serialization.PrivateFormat.PKCS8.encryption_builder()  # if this passes: use it
    new = tmp_path / "rootCA.key.new"
    with secret.open() as stdin:
        subprocess.run(
            ["openssl", "pkcs8", "-topk8", "-in", str(layout.ca_key), "-passin", f"file:{secret}",
             "-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA256", "-iter", "600000",
             "-passout", "stdin", "-out", str(new)],
            stdin=stdin, check=True,
        )  # fmt: skip
    assert mode(new) == 0o600
    new.replace(layout.ca_key)
    assert kdf_iterations(layout.ca_key) == 600_000
    read_key = ["openssl", "pkey", "-in", str(layout.ca_key), "-noout", "-passin"]
    assert subprocess.run([*read_key, f"file:{secret}"], capture_output=True).returncode == 0
    assert subprocess.run([*read_key, "pass:wrong"], capture_output=True).returncode != 0
    capsys.readouterr()
    argv = ["--ini-dir", str(ini), "client", "--passphrase-file", str(secret)]
    assert main(argv) == 0, capsys.readouterr().err


def test_a_passphrase_file_with_crlf_needs_the_cr_removed_for_openssl_as_readme_says(
    ini: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sm_ssl_cert drops the \\r of a FILE saved on Windows (keys written so
    depend on it), OpenSSL keeps it in the passphrase: README's openssl
    commands fail with such a FILE, and work with its `tr -d '\\r'` copy."""
    secret = tmp_path / "crlf.pass"
    secret.write_bytes(PASSPHRASE.encode() + b"\r\n")
    secret.chmod(0o600)
    assert main(["--ini-dir", str(ini), "ca", "--passphrase-file", str(secret)]) == 0
    capsys.readouterr()
    read_key = ["openssl", "pkey", "-in", str(Layout(ini).ca_key), "-noout", "-passin"]
    assert subprocess.run([*read_key, f"file:{secret}"], capture_output=True).returncode != 0
    copy = tmp_path / "FILE2"
    subprocess.run(
        ["sh", "-c", '(umask 077; tr -d \'\\r\' < "$0" > "$1")', str(secret), str(copy)],
        check=True,
    )
    assert mode(copy) == 0o600
    assert subprocess.run([*read_key, f"file:{copy}"], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "case", ["wrong", "open to others", "missing", "empty", "key not encrypted", "too short"]
)
def test_passphrase_mistakes_are_one_line(
    ini: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    layout = Layout(ini)
    secret = passphrase_file(tmp_path)
    encrypt = [] if case == "key not encrypted" else ["--passphrase-file", str(secret)]
    assert main(["--ini-dir", str(ini), "ca", *encrypt]) == 0
    capsys.readouterr()
    command = ["--ini-dir", str(ini), "client", "--passphrase-file", str(secret)]
    if case == "wrong":
        passphrase_file(tmp_path, "wrong horse battery staple")
        message = f"the passphrase does not decrypt the root CA key {layout.ca_key}"
    elif case == "open to others":
        secret.chmod(0o640)
        message = (
            f"passphrase file {secret} is open to other users (mode 0640): chmod 600 {secret}, "
            "owned by the user that reads it"
        )
    elif case == "missing":
        secret.unlink()
        message = f"passphrase file {secret} not found"
    elif case == "empty":
        passphrase_file(tmp_path, "")
        message = f"passphrase file {secret} is empty"
    elif case == "key not encrypted":
        message = f"the root CA key {layout.ca_key} is not encrypted: leave out --passphrase-file"
    else:
        passphrase_file(tmp_path, "short")
        command = ["--ini-dir", str(tmp_path / "other"), "ca", "--passphrase-file", str(secret)]
        message = "a passphrase of 5 characters is too short to protect the root CA key"
    fails(command, capsys, tmp_path, message)


def test_clean_ssl(with_ca: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--ini-dir", str(with_ca.ini_dir), "clean-ssl"]
    assert main(argv) == 0
    assert (
        capsys.readouterr().out == f"nothing to move: no *.key or *.pem in {with_ca.server_dir}\n"
    )
    with_ca.server_dir.mkdir()
    (with_ca.server_dir / "old.key").write_text("old key")
    (with_ca.server_dir / "old.pem").write_text("old cert")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("moved aside: ") == 2
    assert {p.read_text() for p in with_ca.server_dir.iterdir()} == {"old key", "old cert"}
    assert all(".old-" in p.name for p in with_ca.server_dir.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["server"], "the following arguments are required: --common-name"),
        (["ca", "--days", "0"], "argument --days: 0 days: give at least 1"),
        (["ca", "--days", "3000000"], "argument --days: 3000000 days: give at most 36500"),
        (["crl", "--days", "3000000"], "argument --days: 3000000 days: give at most 36500"),
        (["ca", "--days", "ten"], "argument --days: 'ten' is not a whole number of days"),
        (["client", "--key-type", "dsa"], "argument --key-type: invalid choice: 'dsa'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors(
    ini: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["--ini-dir", str(ini), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not ini.exists()


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "clean-ssl" in capsys.readouterr().out


def test_system_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    fails(
        ["--ini-dir", str(not_a_directory), "ca"],
        capsys,
        tmp_path,
        "(check --ini-dir / SESAM_INI_DIR and the permissions of that directory)",
    )


def test_permission_denied_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            fails(["--ini-dir", str(locked / "ini"), "ca"], capsys, tmp_path, "Permission denied")
        finally:
            locked.chmod(0o700)
        return
    # Root ignores permission bits; a read-only filesystem stops it too.
    with read_only_directory(tmp_path / "ro") as locked:
        fails(["--ini-dir", str(locked / "ini"), "ca"], capsys, tmp_path, "Read-only file system")


# -- the installed console script ------------------------------------------------------


def test_installed_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "sm_ssl_cert"
    assert script.exists(), "run `make install` first"
    env = {**os.environ, INI_DIR_ENV: str(tmp_path / "ini")}
    done = subprocess.run(
        [str(script), "ca"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "wrote root CA certificate" in done.stdout
    again = subprocess.run(
        [str(script), "ca"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 2
    assert again.stderr.startswith("sm_ssl_cert: error: a root CA already exists")
    assert "Traceback" not in again.stderr


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``sm_ssl_cert client | head -1``: the certificate is issued, and once
    the reader is gone sm_ssl_cert ends with the status of a process ended by
    SIGPIPE and says nothing (it reported a failure: 'Broken pipe (check
    --ini-dir ...)')."""
    script = Path(sys.executable).parent / "sm_ssl_cert"
    env = {**os.environ, INI_DIR_ENV: str(tmp_path / "ini")}
    subprocess.run([str(script), "ca"], env=env, capture_output=True, check=True, timeout=60)
    issuing = subprocess.Popen(
        [str(script), "client"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert issuing.stdout is not None and issuing.stderr is not None
    issuing.stdout.close()  # before it prints: its output goes out at the end
    err = issuing.stderr.read()
    assert issuing.wait(60) == 128 + signal.SIGPIPE, err
    assert err == b""
    assert Layout(tmp_path / "ini").client_cert.exists()


def test_list_writes_a_subject_the_locale_cannot_show_escaped(tmp_path: Path) -> None:
    """`sm_ssl_cert list` under a latin-1 locale (its encoding, here as
    PYTHONIOENCODING sets it) stopped at a subject CN=Łódź with a
    UnicodeEncodeError traceback: what latin-1 lacks is written \\u0141."""
    script = Path(sys.executable).parent / "sm_ssl_cert"
    env = {**os.environ, INI_DIR_ENV: str(tmp_path / "ini"), "PYTHONIOENCODING": "latin-1"}
    subprocess.run([str(script), "ca"], env=env, capture_output=True, check=True, timeout=60)
    subprocess.run(
        [str(script), "client", "--oid", "CN:Łódź", "--path", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    listing = subprocess.run(
        [str(script), "list"], env=env, capture_output=True, timeout=60, check=False
    )
    assert (listing.returncode, listing.stderr) == (0, b"")
    assert " CN=\\u0141ód\\u017a " in listing.stdout.decode("latin-1")


def test_a_closed_stdout_is_no_failure(tmp_path: Path) -> None:
    """`sm_ssl_cert client ... >&-` wrote the certificate, then ended with
    an AttributeError traceback and exit status 2: a stream the caller
    closed is /dev/null, the work is done, exit status 0."""
    script = Path(sys.executable).parent / "sm_ssl_cert"
    env = {**os.environ, INI_DIR_ENV: str(tmp_path / "ini")}
    subprocess.run([str(script), "ca"], env=env, capture_output=True, check=True, timeout=60)
    issuing = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", str(script), "client", "--oid", "CN:x"]
        + ["--path", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert (issuing.returncode, issuing.stderr) == (0, b"")
    assert (tmp_path / "out" / "client.pem").exists()


def test_closed_standard_streams_are_dev_null_and_no_file_takes_their_place() -> None:
    """With stdin and stdout closed, the next files opened got descriptors 0
    and 1, and whatever wrote to stdout wrote into them."""
    code = (
        "import os, sys\n"
        "from pki.console import standard_streams\n"
        "standard_streams()\n"
        "opened = os.open(sys.executable, os.O_RDONLY)\n"
        "print(opened, *(os.readlink(f'/proc/self/fd/{fd}') for fd in (0, 1)), file=sys.stderr)\n"
        "print('to stdout')\n"
    )
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" <&- >&-', "sh", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    opened, stdin, stdout = done.stderr.split()
    assert int(opened) > 2 and (stdin, stdout) == (os.devnull, os.devnull)


def test_list_shows_a_subject_with_a_newline_on_one_line(
    with_ca: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subject recorded with a newline (issued before sm_ssl_cert refused
    one) split its row of the `list` table in two."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nl\nx")])
    CertificateAuthority.load(with_ca).issue_client(subject)
    assert main(["--ini-dir", str(with_ca.ini_dir), "list"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 2 and " CN=nl\\nx " in rows[1], rows


def test_output_that_cannot_be_written_is_not_blamed_on_the_ini_directory(tmp_path: Path) -> None:
    """`sm_ssl_cert list > /dev/full` said "No space left on device (check
    --ini-dir / SESAM_INI_DIR and the permissions of that directory)"."""
    script = Path(sys.executable).parent / "sm_ssl_cert"
    env = {**os.environ, INI_DIR_ENV: str(tmp_path / "ini")}
    subprocess.run([str(script), "ca"], env=env, capture_output=True, check=True, timeout=60)
    with open("/dev/full", "w") as full:
        listing = subprocess.run(
            [str(script), "list"], env=env, stdout=full, stderr=subprocess.PIPE, timeout=60
        )
    assert (listing.returncode, listing.stderr) == (
        2,
        b"sm_ssl_cert: error: cannot write the output: No space left on device\n",
    )
