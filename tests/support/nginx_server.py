"""A private nginx on loopback running the shipped ``deploy/nginx.conf``, for the proxy tests.

The shipped file stays the source of truth: the generated config is that file with only the
upstream addresses and the listen address replaced (the compose hostnames do not resolve
here), plus what a test run needs and production does not: temporary-file directories under
the test's own directory (so nothing is written to /var/lib/nginx), and the extra
``locations`` a test adds (a ``return 403`` rule a tunnel must not get past, for example).
nginx runs in the foreground as this process's child; :meth:`NginxServer.stop` ends it.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .ports import free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
SHIPPED_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
START_TIMEOUT = 10.0
SKIP_REASON = (
    "nginx is not installed (Debian: apt-get install -y nginx; .ci/run installs it): the "
    "shipped deploy/nginx.conf cannot be run in front of a gateway"
)


def render_config(directory: Path, upstream_port: int, listen_port: int, locations: str) -> str:
    """``deploy/nginx.conf`` pointed at ``127.0.0.1:upstream_port``, listening on loopback."""
    conf = SHIPPED_CONF.read_text()
    # The replicas are found through Docker's DNS at request time (a variable in proxy_pass);
    # an address literal needs no resolver.
    conf, upstreams = re.subn(
        r"set \$gateway_replicas gateway-replicas:8000;",
        f"set $gateway_replicas 127.0.0.1:{upstream_port};",
        conf,
    )
    conf, listens = re.subn(r"listen\s+8080;", f"listen 127.0.0.1:{listen_port};", conf)
    assert upstreams == 1 and listens == 1, "deploy/nginx.conf changed shape: update this helper"
    temp = "".join(
        f"    {kind}_temp_path {directory / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    if locations:
        conf, added = re.subn(r"(\n\s*location / \{)", "\n" + locations + r"\1", conf, count=1)
        assert added == 1
    return conf


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class NginxServer:
    """One nginx master process (and its workers) in front of ``127.0.0.1:upstream_port``."""

    def __init__(self, directory: Path, upstream_port: int, locations: str = "") -> None:
        if NGINX is None:
            raise RuntimeError(SKIP_REASON)
        self.directory = directory
        self.port = free_port()
        self.conf = directory / "nginx.conf"
        self.conf.write_text(render_config(directory, upstream_port, self.port, locations))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start nginx (foreground, this process's child) and wait until it accepts."""
        assert NGINX is not None and self.process is None
        log = (self.directory / "nginx.out").open("ab")
        self.process = subprocess.Popen(
            [
                NGINX,
                "-p", str(self.directory),
                "-c", str(self.conf),
                "-e", str(self.directory / "error.log"),
                "-g", f"daemon off; pid {self.directory / 'nginx.pid'};",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {self.errors()}")
            time.sleep(0.02)

    def errors(self) -> str:
        """nginx's error log and output so far (for a failure message)."""
        parts = []
        for name in ("error.log", "nginx.out"):
            path = self.directory / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGQUIT would wait for open upgraded connections: SIGTERM (fast shutdown)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=START_TIMEOUT)
