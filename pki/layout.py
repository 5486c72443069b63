"""Where things live under one ini directory (SPEC.md, "Directory layout").

Every program resolves the ini directory the same way: the ``--ini-dir``
option wins, then ``SESAM_INI_DIR``, then the product default.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

DEFAULT_INI_DIR = Path("/var/opt/sesam/var/ini")
INI_DIR_ENV = "SESAM_INI_DIR"
INI_DIR_HELP = f"ini directory (default: ${INI_DIR_ENV}, else {DEFAULT_INI_DIR})"


def path_argument(raw: str) -> Path:
    """The argparse type of every path argument of the three programs. An
    empty one is a script's unset variable (``--path "$DIR"``), refused:
    Path("") would be the current directory, and an empty ``--ini-dir``
    the product default, which may hold the production CA."""
    if not raw:
        raise argparse.ArgumentTypeError("the path is empty (write . for the current directory)")
    return Path(raw)


def saveset_argument(raw: str) -> str:
    """The argparse type of a SAVESET argument (sbc, ``stpd delete``). An
    empty one is a script's unset variable, refused: `sbc list ""` listed
    every saveset instead of the entries asked for."""
    if not raw:
        raise argparse.ArgumentTypeError("the saveset id is empty")
    return raw


def resolve_ini_dir(option: str | os.PathLike[str] | None, parser: argparse.ArgumentParser) -> Path:
    """--ini-dir, else $SESAM_INI_DIR, else the product default. A variable
    set but empty (``SESAM_INI_DIR=$DIR`` with DIR unset) is a usage error,
    as an empty --ini-dir is (see path_argument), not the default."""
    if option:
        return Path(option)
    env = os.environ.get(INI_DIR_ENV)
    if env == "":
        parser.error(f"{INI_DIR_ENV} is set but empty (unset it for {DEFAULT_INI_DIR})")
    return Path(env) if env else DEFAULT_INI_DIR


@dataclass(frozen=True)
class Layout:
    """The fixed file names of SPEC.md, relative to one ini directory."""

    ini_dir: Path

    def command(self, args: str) -> str:
        """``sm_ssl_cert ARGS`` on this ini directory, as a hint shows it: with
        --ini-dir, since without it the command acts on the default one."""
        return f"`sm_ssl_cert --ini-dir {shlex.quote(str(self.ini_dir))} {args}`"

    @property
    def ca_dir(self) -> Path:
        return self.ini_dir / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "rootCA.pem"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "rootCA.key"

    def has_ca_key(self) -> bool:
        """Whether the CA key is in this ini directory, for a hint's wording.
        False too when this user cannot look into ca/ (0700, made by root for
        root): a service user's stpd, whose CA is not here for it."""
        return os.path.exists(self.ca_key)  # (Path.exists raises PermissionError)

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def inventory(self) -> Path:
        return self.ca_dir / "inventory.json"

    @property
    def client_dir(self) -> Path:
        return self.ini_dir / "x.509"

    @property
    def client_cert(self) -> Path:
        return self.client_dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.client_dir / "client.key"

    @property
    def server_dir(self) -> Path:
        return self.ini_dir / "ssl"

    @property
    def server_cert(self) -> Path:
        return self.server_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.server_dir / "server.key"

    @property
    def sm_ini(self) -> Path:
        return self.ini_dir / "sm.ini"

    @property
    def stpd_ini(self) -> Path:
        return self.ini_dir / "stpd.ini"

    @property
    def default_data_dir(self) -> Path:
        # "data/ beside the ini directory"
        return self.ini_dir.parent / "data"
