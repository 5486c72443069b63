"""The peer of the benchmark: the stock tools an administrator would reach
for, curl talking to nginx over mutual TLS with our certificates.

nginx runs as our child in the foreground (``daemon off``) with its own
configuration (``-c``), prefix (``-p``), pid file, temp paths and error log
(``-e stderr``, read by a thread), so it needs no system nginx, no
/var/log and no /run. It is ready once it logs "start worker process": its
sockets are bound before that.

Two traps (issue 4): nginx throws a request body away unless something
reads it, so ``/upload`` proxies to an internal location with
``proxy_pass_request_body off``, which makes nginx really store the body in
``client_body_temp_path`` (on /dev/shm, like stpd's data directory);
``client_body_in_file_only clean`` deletes it after the request, ``on``
keeps it. The internal request must not carry the client's Content-Length
(it has no body): with it, the internal server answers 413 to anything
over its default 1 MiB limit, after nginx stored the body, and curl still
exits 0. ``/verify`` keeps it, in its own directory, so the bench can
check the sha256 of what nginx stored once per kind of upload.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.common import HOST, BenchError, Server, free_port

START_TIMEOUT = 30.0  # seconds for nginx to start its worker
INSTALL_TIMEOUT = 900.0  # seconds for apt-get update + install
NGINX_PACKAGE = "nginx-light"


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_installed() -> tuple[str, str]:
    """Paths of nginx and curl, installing them with apt-get when absent."""
    missing = []
    if find_nginx() is None:
        missing.append(NGINX_PACKAGE)
    if shutil.which("curl") is None:
        missing.append("curl")
    if missing:
        apt = shutil.which("apt-get")
        if apt is None or os.geteuid() != 0:
            raise BenchError(
                f"{' and '.join(missing)} missing and cannot be installed here "
                "(needs root and apt-get); install them, or run with --no-peer"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            [apt, "update"],
            [apt, "install", "-y", "--no-install-recommends", *missing],
        ):
            print(f"  $ {' '.join(argv)}", flush=True)
            try:
                result = subprocess.run(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=INSTALL_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise BenchError(f"{' '.join(argv)} took over {INSTALL_TIMEOUT:.0f}s") from None
            if result.returncode != 0:
                # The package's own service may fail to start (e.g. port 80
                # taken) while the binary is installed: judged below.
                print(f"    [exit status {result.returncode}] {result.stderr.strip()[-400:]}")
    nginx, curl = find_nginx(), shutil.which("curl")
    if nginx is None or curl is None:
        raise BenchError(f"{' and '.join(missing)} could not be installed; or run with --no-peer")
    return nginx, curl


def version(argv: list[str]) -> str:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0] if lines else "?"


CONFIG = """\
worker_processes 1;
daemon off;
error_log stderr notice;
pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  server {{
    listen {host}:{port} ssl;
    ssl_certificate {server_cert};
    ssl_certificate_key {server_key};
    ssl_client_certificate {ca_cert};
    ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    client_max_body_size 0;
    client_body_in_file_only clean;
    client_body_buffer_size 1m;
    location /upload {{
      proxy_pass http://{host}:{backend}/done;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-File $request_body_file;
    }}
    location /verify {{
      client_body_in_file_only on;
      client_body_temp_path {work}/verify;
      proxy_pass http://{host}:{backend}/done;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-File $request_body_file;
    }}
    location /files/ {{
      alias {files}/;
    }}
  }}
  server {{
    listen {host}:{backend};
    location /done {{ return 201 "stored\\n"; }}
  }}
}}
"""


class Nginx:
    def __init__(self, binary: str, work: Path, server_cert: Path, server_key: Path, ca: Path):
        self.binary = binary
        self.work = work
        self.files = work / "files"  # served as /files/ (the restore case)
        self.verify_dir = work / "verify"  # bodies kept by /verify
        self.server_cert, self.server_key, self.ca = server_cert, server_key, ca
        self.port = 0
        self.server: Server | None = None

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.files.mkdir(exist_ok=True)
        # Workers run as nobody when the master is root: they must reach
        # the served files. nginx creates (and chowns) its temp paths itself.
        for path in (self.work, self.files):
            path.chmod(0o755)
        self.port, backend = free_port(), free_port()
        config = self.work / "nginx.conf"
        config.write_text(
            CONFIG.format(
                work=self.work,
                host=HOST,
                port=self.port,
                backend=backend,
                server_cert=self.server_cert,
                server_key=self.server_key,
                ca_cert=self.ca,
                files=self.files,
            )
        )
        argv = [self.binary, "-p", f"{self.work}/", "-c", str(config), "-e", "stderr"]
        self.server = Server("nginx", argv)
        self.server.wait_for(r"start worker process \d+", START_TIMEOUT)

    def check_alive(self) -> None:
        assert self.server is not None
        if not self.server.alive():
            raise BenchError("nginx exited; its last lines:\n" + self.server.tail())

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def url(self, path: str) -> str:
        return f"https://{HOST}:{self.port}{path}"

    def kept_bodies(self) -> list[Path]:
        if not self.verify_dir.is_dir():
            return []
        return sorted(p for p in self.verify_dir.rglob("*") if p.is_file())


class Curl:
    """curl with our client certificate, verifying nginx with our CA. Each
    command prints ``HTTP_CODE SIZE_UPLOAD SIZE_DOWNLOAD`` on stdout (``fetch``:
    on stderr)."""

    def __init__(self, binary: str, ca: Path, cert: Path, key: Path) -> None:
        self.base = [
            binary,
            "-sS",
            "--http1.1",
            "--cacert",
            str(ca),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "-w",
            "%{http_code} %{size_upload} %{size_download}\\n",
        ]

    def upload(self, source: str, url: str) -> list[str]:
        """``curl -T SOURCE URL`` (``-`` reads stdin, sent chunked)."""
        return [*self.base, "-o", "/dev/null", "-T", source, url]

    def download(self, url: str, target: Path) -> list[str]:
        return [*self.base, "-o", str(target), url]

    def fetch(self, url: str) -> list[str]:
        """The body on stdout (for a pipe); the ``-w`` line goes to stderr."""
        return [*self.base[:-1], "%{stderr}" + self.base[-1], url]

    def ping(self, url: str) -> list[str]:
        return [*self.base, "-o", "/dev/null", url]


def curl_result(stdout: str) -> tuple[int, int, int]:
    """(http code, bytes uploaded, bytes downloaded) from the ``-w`` line."""
    words = stdout.split()
    try:
        code, up, down = (int(float(w)) for w in words[-3:])
    except ValueError:
        raise BenchError(f"unexpected curl output: {stdout!r}") from None
    return code, up, down
