"""The commented samples in conf/ and the error messages of bad configuration.

The samples are documentation: they must load, show the defaults, and name
every key the programs declare (stpd.config.KEYS, sbc.config.KEYS), so that
code and docs cannot drift apart. The README's reference must name every key
too. Bad values are one ConfigError naming the file, the key and what is
allowed; for the daemon that is one stderr line and exit status 2.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sbc.config
import stpd.config
from pki.authority import CertificateAuthority
from pki.inifile import ConfigError, Key
from pki.layout import Layout
from pki.tls import ClientCertPolicy
from sbc.cli import main as sbc_main
from tests.conftest import Pki, run_sbc, running_stpd

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SAMPLES = [
    pytest.param("stpd.ini", stpd.config, id="stpd.ini"),
    pytest.param("sm.ini", sbc.config, id="sm.ini"),
]
PROGRAM_TIMEOUT = 30  # seconds; the programs fail at startup, long before this


def sample_text(name: str) -> str:
    return (CONF / name).read_text(encoding="utf-8")


def uncommented(text: str, keys: list[Key]) -> str:
    """The sample with its commented-out example settings (``#KEY=value``) enabled."""
    names = "|".join(re.escape(key.name) for key in keys)
    return re.sub(rf"^#\s*(({names})\s*=)", r"\1", text, flags=re.MULTILINE)


def ini_dir_with(tmp_path: Path, name: str, text: str) -> Layout:
    layout = Layout(tmp_path / "ini")
    layout.ini_dir.mkdir(exist_ok=True)
    (layout.ini_dir / name).write_text(text, encoding="utf-8")
    return layout


def script(name: str) -> str:
    """A console script of this checkout (.venv/bin/NAME beside the interpreter)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"console script {name} is not installed: run `make install`"
    return found


# -- the samples -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "module"), SAMPLES)
def test_sample_loads_and_shows_the_defaults(tmp_path: Path, name: str, module) -> None:
    layout = Layout(tmp_path / "ini")
    layout.ini_dir.mkdir()
    shutil.copy(CONF / name, layout.ini_dir / name)
    loaded = module.load_config(layout)
    # Active lines carry the default values: the sample documents the defaults.
    assert loaded == type(loaded)(layout=layout)


@pytest.mark.parametrize(("name", "module"), SAMPLES)
def test_sample_examples_are_valid_when_enabled(tmp_path: Path, name: str, module) -> None:
    text = uncommented(sample_text(name), module.KEYS)
    layout = ini_dir_with(tmp_path, name, text)
    loaded = module.load_config(layout)
    defaults = type(loaded)(layout=layout)
    enabled = {
        key.field
        for key in module.KEYS
        if re.search(rf"^#\s*{re.escape(key.name)}\s*=", sample_text(name), re.MULTILINE)
    }
    for field in enabled:  # each example sets a value the default does not have
        assert getattr(loaded, field) != getattr(defaults, field), field


@pytest.mark.parametrize(("name", "module"), SAMPLES)
def test_sample_names_every_key_in_its_section(name: str, module) -> None:
    text = uncommented(sample_text(name), module.KEYS)
    parser = configparser.ConfigParser(inline_comment_prefixes=("#",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    for key in module.KEYS:
        assert parser.has_option(key.section, key.name), (
            f"conf/{name} does not document {key.name} in [{key.section}]"
        )


@pytest.mark.parametrize(("name", "module"), SAMPLES)
def test_sample_explains_default_and_allowed_values_of_every_key(name: str, module) -> None:
    text = sample_text(name)
    for key in module.KEYS:
        match = re.search(rf"^#?\s*{re.escape(key.name)}\s*=", text, re.MULTILINE)
        assert match, key.name
        # The comment block right above the key's line.
        above = text[: match.start()].rstrip("\n").split("\n\n")[-1]
        assert "Default:" in above, f"conf/{name}: no 'Default:' above {key.name}"
        assert above.lstrip().startswith("#"), f"conf/{name}: no comment above {key.name}"


@pytest.mark.parametrize(("name", "module"), SAMPLES)
def test_readme_reference_names_every_key(name: str, module) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for key in module.KEYS:
        assert f"`{key.name}`" in readme, f"README.md does not document {key.name}"


# -- values ------------------------------------------------------------------------


def test_values_may_carry_trailing_comments_as_in_the_original(tmp_path: Path) -> None:
    layout = ini_dir_with(
        tmp_path,
        "stpd.ini",
        "[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT=1 #0: do not validate, 1: validate but warn\n"
        "STPD_HTTPS_LISTEN=127.0.0.1:12345   #HOST:PORT\n",
    )
    config = stpd.config.load_config(layout)
    assert config.client_cert_policy == ClientCertPolicy.WARN
    assert config.listen == ("127.0.0.1", 12345)


def test_other_sections_of_a_sesam_file_are_left_alone(tmp_path: Path) -> None:
    layout = ini_dir_with(
        tmp_path,
        "sm.ini",
        "[SM_DB]\nWHATEVER=keeps its value\n[SBC_SSL]\nSBC_CLIENT_SSL_AUTH=0\n"
        "[SBC]\nSBC_SERVER=127.0.0.1\n",
    )
    config = sbc.config.load_config(layout)
    assert config.client_ssl_auth is False
    assert config.server == ("127.0.0.1", stpd.config.STPD_HTTPS_PORT)


def test_other_programs_may_repeat_keys_and_sections_ours_may_not(tmp_path: Path) -> None:
    """A repeated key in our section is a choice made for the administrator
    (configparser keeps the last); one in another program's section is
    that program's business."""
    theirs = "[SM_DB]\nX=1\nX=2\n[SM_DB]\nY=3\n"
    layout = ini_dir_with(tmp_path, "sm.ini", theirs + "[SBC]\nSBC_SERVER=127.0.0.1\n")
    assert sbc.config.load_config(layout).server == ("127.0.0.1", stpd.config.STPD_HTTPS_PORT)

    def refused(stpd_ini: str) -> str:
        (layout.ini_dir / "stpd.ini").write_text(stpd_ini)
        with pytest.raises(ConfigError) as error:
            stpd.config.load_config(layout)
        return str(error.value)

    assert refused(
        "[STPD_Server]\nSTPD_HTTPS_LISTEN=127.0.0.1:1\nSTPD_HTTPS_LISTEN=0.0.0.0:2\n"
    ) == (
        f"{layout.stpd_ini}: STPD_HTTPS_LISTEN is set twice in [STPD_Server] (again on line 3): "
        "keep one"
    )
    # Our section twice: merged, its later key won (a level 2 read as 0).
    assert refused(
        "[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT=2\n[Other]\nX=1\n"
        "[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT=0\n"
    ) == (
        f"{layout.stpd_ini}: section [STPD_Server] appears twice (again on line 5): keep one, "
        "with every key in it"
    )
    # Key names may be written in any case: in two cases, still one key set twice
    # (the later line won without a word).
    assert refused(
        "[STPD_Server]\nstpd_https_use_client_cert=1\nSTPD_HTTPS_USE_CLIENT_CERT=2\n"
    ) == (
        f"{layout.stpd_ini}: STPD_HTTPS_USE_CLIENT_CERT is set twice in [STPD_Server] (as "
        "stpd_https_use_client_cert and as STPD_HTTPS_USE_CLIENT_CERT): keep one"
    )


@pytest.mark.parametrize(
    ("name", "written", "meant"),
    [("stpd.ini", "stpd_server", "STPD_Server"), ("sm.ini", "sbc", "SBC")],
)
def test_our_section_in_another_case_is_not_skipped_unseen(
    tmp_path: Path, name: str, written: str, meant: str
) -> None:
    """[stpd_server] was read as another program's section: stpd then
    started with every default, listening on all addresses."""
    layout = ini_dir_with(tmp_path, name, f"[{written}]\nSTPD_HTTPS_LISTEN=127.0.0.1:1\n")
    module = stpd.config if name == "stpd.ini" else sbc.config
    with pytest.raises(ConfigError) as refused:
        module.load_config(layout)
    assert str(refused.value) == (
        f"{layout.ini_dir / name}: section [{written}] is not read: write it as [{meant}] "
        "(section names are case-sensitive)"
    )


def notepad(text: str) -> bytes:
    """``text`` as Windows Notepad may save it: a byte-order mark, CRLF line
    ends, and a comment in the legacy code page (cp1252)."""
    lines = ["# Sicherung für diesen Rechner"] + text.splitlines()
    return b"\xef\xbb\xbf" + "\r\n".join(lines).encode("cp1252") + b"\r\n"


def test_files_saved_on_windows_load_like_plain_ones(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "ini")
    layout.ini_dir.mkdir()
    layout.stpd_ini.write_bytes(
        notepad("[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT=1 #für alle\nSTPD_MAX_CONNECTIONS=7")
    )
    layout.sm_ini.write_bytes(
        notepad("[SBC_SSL]\nSBC_CLIENT_SSL_AUTH=0\n[SBC]\nSBC_SERVER=127.0.0.2")
    )
    config = stpd.config.load_config(layout)
    assert config.client_cert_policy == ClientCertPolicy.WARN
    assert config.max_connections == 7
    client = sbc.config.load_config(layout)
    assert client.client_ssl_auth is False
    assert client.server == ("127.0.0.2", stpd.config.STPD_HTTPS_PORT)


def test_a_value_in_a_legacy_code_page_keeps_its_bytes(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "ini")
    layout.ini_dir.mkdir()
    layout.stpd_ini.write_bytes(b"[STPD_Server]\nSTPD_DATA_DIR=/srv/sicherung-f\xfcr\n")
    config = stpd.config.load_config(layout)
    assert os.fsencode(str(config.data_dir)) == b"/srv/sicherung-f\xfcr"


def test_sbc_backs_up_with_an_sm_ini_saved_on_windows(pki: Pki, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_bytes(b"saved by notepad\n" * 100)
    with running_stpd(pki.layout, level=2) as server:
        client = pki.client_ini("notepad")
        client.sm_ini.write_bytes(
            notepad(
                "[SBC_SSL]\nSBC_CLIENT_SSL_AUTH=1 #für den Server\nSBC_SSL_SERVER_VERIFY=1\n"
                f"[SBC]\nSBC_SERVER=127.0.0.1:{server.port}"
            )
        )
        code, out, err = run_sbc("--ini-dir", str(client.ini_dir), "backup", str(source), "--json")
        assert code == 0, err
        saveset = json.loads(out)["saveset"]
        # Stored under the certificate's name: the file's flags were read.
        meta = server.daemon.store.find("CN=notepad", saveset)
    assert meta is not None
    assert meta.source == str(source)


def test_a_missing_file_means_the_defaults(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "nothing-here")
    assert stpd.config.load_config(layout) == stpd.config.StpdConfig(layout=layout)
    assert sbc.config.load_config(layout) == sbc.config.SbcConfig(layout=layout)


def test_command_line_overrides_win_over_the_file(tmp_path: Path) -> None:
    layout = ini_dir_with(tmp_path, "stpd.ini", "[STPD_Server]\nSTPD_HTTPS_LISTEN=127.0.0.1:1\n")
    config = stpd.config.load_config(layout, listen=("127.0.0.1", 2), data_dir=None)
    assert config.listen == ("127.0.0.1", 2)
    assert config.data_dir is None


BAD_VALUES = [
    ("stpd.ini", "STPD_Server", "STPD_HTTPS_USE_CLIENT_CERT", "3", "0, 1 or 2"),
    ("stpd.ini", "STPD_Server", "STPD_HTTPS_USE_CLIENT_CERT", "two", "0, 1 or 2"),
    ("stpd.ini", "STPD_Server", "STPD_HTTPS_USE_CLIENT_CERT", "", "0, 1 or 2"),
    ("stpd.ini", "STPD_Server", "STPD_HTTPS_LISTEN", "127.0.0.1:http", "HOST:PORT"),
    ("stpd.ini", "STPD_Server", "STPD_HTTPS_LISTEN", "127.0.0.1:70000", "HOST:PORT"),
    ("stpd.ini", "STPD_Server", "STPD_DATA_DIR", "", "a directory path"),
    ("stpd.ini", "STPD_Server", "STPD_HANDSHAKE_TIMEOUT", "ten", "seconds > 0"),
    ("stpd.ini", "STPD_Server", "STPD_IO_TIMEOUT", "0", "seconds > 0"),
    ("stpd.ini", "STPD_Server", "STPD_IDLE_TIMEOUT", "-5", "seconds > 0"),
    # Past a day, a wait overflowed poll()'s milliseconds: a traceback mid-transfer.
    ("stpd.ini", "STPD_Server", "STPD_IO_TIMEOUT", "3e6", "at most 86400"),
    ("stpd.ini", "STPD_Server", "STPD_SHUTDOWN_GRACE", "inf", "at most 86400"),
    # Past the calendar's start, the cutoff killed stpd (and a reload to it, a running one).
    ("stpd.ini", "STPD_Server", "STPD_RETENTION_DAYS", "1000000", "from 0 to 36500"),
    ("stpd.ini", "STPD_Server", "STPD_RETENTION_DAYS", "-1", "from 0 to 36500"),
    ("stpd.ini", "STPD_Server", "STPD_MAX_CONNECTIONS", "1.5", "a whole number > 0"),
    ("stpd.ini", "STPD_Server", "STPD_MAX_HEADER_BYTES", "16k", "a whole number > 0"),
    ("stpd.ini", "STPD_Server", "STPD_ALLOWED_CLIENTS", "host1", "FIELD:PATTERN"),
    # A typo would match no certificate: every client locked out without a word.
    ("stpd.ini", "STPD_Server", "STPD_ALLOWED_CLIENTS", "X:foo", "FIELD one of C, CN, DQ"),
    ("stpd.ini", "STPD_Server", "STPD_ALLOWED_CLIENTS", "CN:host1,CN:", "FIELD one of C, CN"),
    ("stpd.ini", "STPD_Server", "STPD_ALLOWED_CLIENTS", "CN:a,,O:b", "FIELD:PATTERN"),
    ("sm.ini", "SBC_SSL", "SBC_CLIENT_SSL_AUTH", "2", "0 or 1"),
    ("sm.ini", "SBC_SSL", "SBC_SSL_SERVER_VERIFY", "yes", "0 or 1"),
    ("sm.ini", "SBC_SSL", "SBC_SERVER_FINGERPRINT", "abcd", "64 hex digits"),
    ("sm.ini", "SBC", "SBC_SERVER", "backup:port", "HOST or HOST:PORT"),
    ("sm.ini", "SBC", "SBC_CONNECT_TIMEOUT", "soon", "seconds > 0"),
    ("sm.ini", "SBC", "SBC_IO_TIMEOUT", "nan", "seconds > 0"),
    # Past the platform's time_t: a traceback from the socket's timeout.
    ("sm.ini", "SBC", "SBC_CONNECT_TIMEOUT", "1e300", "at most 86400"),
]


def load(name: str, layout: Layout) -> object:
    module = stpd.config if name == "stpd.ini" else sbc.config
    return module.load_config(layout)


@pytest.mark.parametrize(
    ("name", "section", "key", "value", "allowed"),
    BAD_VALUES,
    ids=[f"{key}={value!r}" for _, _, key, value, _ in BAD_VALUES],
)
def test_bad_value_names_file_key_and_allowed_values(
    tmp_path: Path, name: str, section: str, key: str, value: str, allowed: str
) -> None:
    layout = ini_dir_with(tmp_path, name, f"[{section}]\n{key}={value}   #a comment\n")
    with pytest.raises(ConfigError) as caught:
        load(name, layout)
    message = str(caught.value)
    assert str(layout.ini_dir / name) in message
    assert key in message
    assert f"allowed: {allowed}" in message or allowed in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "section", "key"),
    [
        ("stpd.ini", "STPD_Server", "STPD_HTTPS_PORT"),
        ("sm.ini", "SBC_SSL", "SBC_SERVER"),  # a real key in the wrong section
        ("sm.ini", "SBC", "SBC_TIMEOUT"),
    ],
)
def test_unknown_key_names_file_key_and_the_known_keys(
    tmp_path: Path, name: str, section: str, key: str
) -> None:
    layout = ini_dir_with(tmp_path, name, f"[{section}]\n{key}=1\n")
    with pytest.raises(ConfigError) as caught:
        load(name, layout)
    message = str(caught.value)
    assert str(layout.ini_dir / name) in message
    assert f"unknown key {key}" in message
    module = stpd.config if name == "stpd.ini" else sbc.config
    for known in (k.name for k in module.KEYS if k.section == section):
        assert known in message


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("stpd.ini", 'STPD_DATA_DIR="/srv/savesets"'),
        ("stpd.ini", "STPD_DATA_DIR='/srv/savesets'  # where savesets go"),
        ("stpd.ini", 'STPD_HTTPS_LISTEN="0.0.0.0:11443"'),
        ("sm.ini", 'SBC_SERVER="backup.example.com"'),
    ],
)
def test_quotes_around_a_value_are_refused(tmp_path: Path, name: str, line: str) -> None:
    """An INI value is all that follows "=": STPD_DATA_DIR="/tmp/x" made
    stpd store its savesets in ./"/tmp/x"/ under its working directory."""
    section, module = {"stpd.ini": ("STPD_Server", stpd.config), "sm.ini": ("SBC", sbc.config)}[
        name
    ]
    layout = ini_dir_with(tmp_path, name, f"[{section}]\n{line}\n")
    key, _, value = line.partition("  #")[0].partition("=")
    with pytest.raises(ConfigError) as refused:
        module.load_config(layout)
    assert str(refused.value) == (
        f"{layout.ini_dir / name}: [{section}] {key}={value} has quotes around its value, "
        f"which would be part of it: write it without quotes ({key}={value[1:-1]})"
    )


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        (
            "STPD_HTTPS_USE_CLIENT_CERT=2\n",
            "line 1 comes before any [SECTION] line: 'STPD_HTTPS_USE_CLIENT_CERT=2'",
        ),
        (
            "# stpd\n[STPD_Server]\r\nSTPD_DATA_DIR\r\n",
            "line 3 is neither [SECTION] nor KEY=VALUE: 'STPD_DATA_DIR'",
        ),
        (
            "[STPD_Server]\nSTPD_DATA_DIR\n[Other\nx = 1\n",
            "line 2 is neither [SECTION] nor KEY=VALUE: 'STPD_DATA_DIR' (and 1 more line like it)",
        ),
    ],
)
def test_a_file_that_is_not_ini_is_a_config_error(tmp_path: Path, text: str, bad: str) -> None:
    """Its message named the file only ("Source contains parsing errors:
    'stpd.ini'"): it says the line, by number and text."""
    layout = ini_dir_with(tmp_path, "stpd.ini", text)
    with pytest.raises(ConfigError) as refused:
        stpd.config.load_config(layout)
    assert str(refused.value) == f"{layout.stpd_ini}: cannot be read as an INI file: {bad}"


# -- the programs ------------------------------------------------------------------


def run_program(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("value", ["3", "two"])
def test_stpd_with_a_bad_level_exits_2_with_one_line(tmp_path: Path, value: str) -> None:
    layout = ini_dir_with(
        tmp_path,
        "stpd.ini",
        f"[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT={value} #0, 1 or 2\n"
        "STPD_HTTPS_LISTEN=127.0.0.1:0\n",
    )
    result = run_program([script("stpd"), "--ini-dir", str(layout.ini_dir)])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = lines[0]
    assert line.startswith("stpd: error: ")
    assert str(layout.stpd_ini) in line
    assert "STPD_HTTPS_USE_CLIENT_CERT" in line
    assert "0, 1 or 2" in line
    assert result.stdout == ""


def test_sbc_with_a_bad_flag_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    layout = ini_dir_with(tmp_path, "sm.ini", "[SBC_SSL]\nSBC_CLIENT_SSL_AUTH=2\n")
    result = run_program(
        [script("sbc"), "--ini-dir", str(layout.ini_dir), "list", "--server", "127.0.0.1:9"]
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("sbc: error: ")
    assert str(layout.sm_ini) in lines[0]
    assert "SBC_CLIENT_SSL_AUTH" in lines[0]
    assert "0 or 1" in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["backup", ""], "sbc backup: error: argument path: the path is empty"),
        (["restore", "SS-x", ""], "sbc restore: error: argument target_dir: the path is empty"),
        # ENTRY is optional: not among the missing ones.
        (
            ["restore"],
            "sbc restore: error: the following arguments are required: saveset, target_dir",
        ),
    ],
)
def test_sbc_usage_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    """An empty path is a script's unset variable ("$DIR"), not "back up
    (or restore into) the current directory": a usage error, nothing sent."""
    result = run_program([script("sbc"), "--ini-dir", str(tmp_path / "none"), *argv])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(message), result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        "(write . for the current directory)" if "empty" in message else "target_dir"
    ), result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["sbc", "list", ""],
        ["sbc", "list", "", "--json"],
        ["sbc", "restore", "", "{cwd}/back"],
        ["sbc", "verify", ""],
        ["stpd", "delete", ""],
        ["stpd", "delete", "SS-20260101T000000Z-00000000", ""],
    ],
)
def test_an_empty_saveset_argument_is_refused(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """A SAVESET given as "$ID" with ID unset: `sbc list ""` listed every
    saveset (with --json, the array of savesets where a script expected
    entries), `sbc restore "" DIR` and `sbc verify ""` asked stpd for a
    saveset without a name. A usage error, as an empty path is."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    client = pki.client_ini("scripted")
    with running_stpd(pki.layout, level=2) as stpd:
        ini = str((client if argv[0] == "sbc" else pki.layout).ini_dir)
        given = [arg.replace("{cwd}", str(workdir)) for arg in argv[1:]]
        server = ["--server", stpd.address] if argv[0] == "sbc" else []
        result = run_program([script(argv[0]), "--ini-dir", ini, *given, *server])
    assert result.returncode == 2 and result.stdout == ""
    name = "saveset" if argv[0] == "sbc" else "SAVESET"
    assert result.stderr.splitlines()[-1].endswith(
        f"error: argument {name}: the saveset id is empty"
    ), result.stderr
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["sbc", "--ini-dir", "", "status"],
        ["stpd", "--ini-dir", ""],
        ["sm_ssl_cert", "--ini-dir", "", "ca"],
        ["sm_ssl_cert", "ca", "--ini-dir", ""],
        ["sm_ssl_cert", "--ini-dir", "{ini}", "client", "--path", ""],
        ["sm_ssl_cert", "--ini-dir", "{ini}", "server", "--common-name", "x", "--path", ""],
        ["sm_ssl_cert", "--ini-dir", "{ini}", "crl", "--passphrase-file", ""],
        ["stpd", "--ini-dir", "{ini}", "--data-dir", ""],
        ["stpd", "--ini-dir", "{ini}", "--pid-file", ""],
    ],
)
def test_an_empty_path_argument_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ca: CertificateAuthority,
    layout: Layout,
    argv: list[str],
) -> None:
    """A path argument given as "$DIR" with DIR unset must not mean the
    current directory (Path("") is ".": `sm_ssl_cert client --path ""`
    wrote the key there) nor, for --ini-dir, $SESAM_INI_DIR or the product
    default, where `sm_ssl_cert ca` would meet the production CA. (The
    environment's directory, set here, also keeps a failing run away from
    the default.)"""
    monkeypatch.setenv("SESAM_INI_DIR", str(tmp_path / "from-env"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    argv = [arg.replace("{ini}", str(layout.ini_dir)) for arg in argv]
    result = run_program([script(argv[0]), *argv[1:]])
    assert not (tmp_path / "from-env").exists()
    assert list(workdir.iterdir()) == []
    assert result.returncode == 2 and result.stdout == ""
    option = argv[argv.index("") - 1]
    assert result.stderr.splitlines()[-1].endswith(
        f"error: argument {option}: the path is empty (write . for the current directory)"
    ), result.stderr


@pytest.mark.parametrize(
    "argv", [["sm_ssl_cert", "list"], ["stpd", "list"], ["sbc", "status"]], ids=lambda a: a[0]
)
def test_an_empty_sesam_ini_dir_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """`SESAM_INI_DIR=$DIR sm_ssl_cert ca` with DIR unset worked on the
    product default, /var/opt/sesam/var/ini, as if the variable were not
    set; an empty --ini-dir was refused already. (Commands that read, so
    that a failing check touches nothing there.)"""
    monkeypatch.setenv("SESAM_INI_DIR", "")
    result = run_program([script(argv[0]), *argv[1:]])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"{argv[0]}: error: SESAM_INI_DIR is set but empty (unset it for /var/opt/sesam/var/ini)"
    ), result.stderr


def test_an_empty_revoke_target_is_a_usage_error(layout: Layout, ca: CertificateAuthority) -> None:
    """`sm_ssl_cert revoke "$CERT"` with CERT unset read "" as the current
    directory: ". is a directory: pass a certificate file or a serial"."""
    result = run_program([script("sm_ssl_cert"), "--ini-dir", str(layout.ini_dir), "revoke", ""])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "sm_ssl_cert revoke: error: argument SERIAL|CERT_FILE: empty: give a serial (as `list` "
        "prints it) or a file"
    ), result.stderr


def test_each_program_says_its_version_which_is_the_installed_one() -> None:
    """``--version`` of the three programs, from the one place pyproject.toml
    reads it too (stpd.__version__): what pip installed is what they say."""
    from importlib.metadata import version

    installed = version("sesam-stp")
    assert re.fullmatch(r"\d+\.\d+\.\d+", installed)
    for program in ("sbc", "stpd", "sm_ssl_cert"):
        result = subprocess.run(
            [str(Path(sys.executable).parent / program), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (result.returncode, result.stdout, result.stderr) == (
            0,
            f"{program} {installed}\n",
            "",
        ), program


def test_sbc_takes_its_common_options_before_or_after_the_command(pki: Pki, tmp_path: Path) -> None:
    """`sbc status --ini-dir DIR` was "unrecognized arguments", and `sbc
    --server H:P status` an "invalid choice": each option now goes on
    either side of the command, the same way (over TLS, to a real stpd)."""
    client = pki.client_ini("anywhere")
    with running_stpd(pki.layout, level=2) as stpd:
        ini, server = ["--ini-dir", str(client.ini_dir)], ["--server", stpd.address]
        for argv in (
            [*ini, *server, "--json", "status"],
            ["status", *ini, *server, "--json"],
            [*ini, "status", "--json", *server],
            ["--json", "status", *server, *ini],
        ):
            code, out, err = run_sbc(*argv)
            assert code == 0, (argv, err)
            assert json.loads(out)["level"] == 2, argv


@pytest.mark.parametrize(
    "given",
    [
        "https://127.0.0.1:11443",
        "127.0.0.1,11443",
        "backup/host",
        "a b",
        "[::1]2222",
        "[::1]junk",
        "[::1",
        "[::1]:",
        "127.0.0.1:+22",
    ],
)
def test_a_server_that_is_not_host_port_is_a_usage_error(
    tmp_path: Path, given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL was taken for a host name ("https://h:1" has two colons, like
    an IPv6 address) and failed only at the connection, with the default
    port appended to it."""
    with pytest.raises(SystemExit) as exited:
        sbc_main(["--ini-dir", str(tmp_path), "status", "--server", given])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    url = ", not a URL" if "://" in given else ""
    assert err.endswith(
        f"sbc status: error: argument --server: expected HOST[:PORT]{url}, got {given!r}\n"
    )
    layout = ini_dir_with(tmp_path, "sm.ini", f"[SBC]\nSBC_SERVER={given}\n")
    with pytest.raises(ConfigError, match=r"\[SBC\] SBC_SERVER=.* is not valid; allowed: "):
        sbc.config.load_config(layout)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("backup.example.com", ("backup.example.com", 11443)),
        ("backup.example.com:2222", ("backup.example.com", 2222)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("::1", ("::1", 11443)),
        ("[::1]", ("::1", 11443)),
        ("[fd00::5]:2222", ("fd00::5", 2222)),
        # A bracket not closed, or followed by other than ":PORT", dropped
        # the port: '[::1]2222' meant ::1 port 11443.
        ("[::1]2222", None),
        ("[::1]junk", None),
        ("[::1", None),
        ("[::1]:", None),
        ("[::1]:x", None),
        # int() took these as 22.
        ("host:+22", None),
        ("host: 22", None),
        ("host:2_2", None),
        ("host:\u0662\u0662", None),
        ("host:65536", None),
    ],
)
def test_host_port_forms(text: str, address: tuple[str, int] | None) -> None:
    """What --server, SBC_SERVER, --listen and STPD_HTTPS_LISTEN take."""
    if address is None:
        with pytest.raises(ValueError):
            stpd.config.stpd_address(text)
    else:
        assert stpd.config.stpd_address(text) == address


def test_an_empty_allow_list_allows_every_valid_client(tmp_path: Path) -> None:
    """`STPD_ALLOWED_CLIENTS=` is the documented default (empty: every valid
    client), written out; it was refused as not FIELD:PATTERN."""
    layout = ini_dir_with(tmp_path, "stpd.ini", "[STPD_Server]\nSTPD_ALLOWED_CLIENTS=\n")
    assert stpd.config.load_config(layout).allowed_clients == ()
    layout = ini_dir_with(
        tmp_path, "stpd.ini", "[STPD_Server]\nSTPD_ALLOWED_CLIENTS=cn:host1, O:Ex*\n"
    )
    assert stpd.config.load_config(layout).allowed_clients == ("cn:host1", "O:Ex*")
