"""A real redis-server that speaks TLS, with certificates made for the test by `openssl`.

Redis listens for TLS on TCP only: the server takes `--tls-port` on 127.0.0.1 (a free port)
and keeps the plain Unix socket of RedisServer, which the readiness check (PING) uses.

    pki = Pki(tmp_path)                          # a CA, a server and a client certificate
    with TlsRedis(pki) as server:                # clients must show a certificate (auth yes)
        Settings(redis_url=server.url, redis_tls_ca_file=str(pki.ca),
                 redis_tls_cert_file=str(pki.client_cert), redis_tls_key_file=str(pki.client_key))
    other = Pki(tmp_path / "other")              # another CA: its certificates are refused
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.redis_server import RedisServer
from tests.support.redis_topology import free_port

# A day: the certificates live as long as one test run.
_DAYS = "1"
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{out.stderr}")


class Pki:
    """A CA of its own and two certificates it signed: the server's (for 127.0.0.1 and
    localhost) and a client's. Two Pki objects are two unrelated CAs."""

    def __init__(self, directory: Path, name: str = "test") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = directory / "ca.crt"
        self.ca_key = directory / "ca.key"
        self.server_cert = directory / "server.crt"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.crt"
        self.client_key = directory / "client.key"
        _openssl("req", "-x509", *_KEY, "-keyout", self.ca_key.name, "-out", self.ca.name,
                 "-days", _DAYS, "-subj", f"/CN={name} CA", cwd=directory)  # fmt: skip
        self._issue("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")  # fmt: skip
        self._issue("client", "extendedKeyUsage=clientAuth\n")

    def _issue(self, who: str, extensions: str) -> None:
        ext = self.dir / f"{who}.ext"
        ext.write_text(extensions)
        _openssl("req", *_KEY, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN=sidecar-test-{who}", cwd=self.dir)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", self.ca.name, "-CAkey",
                 self.ca_key.name, "-CAcreateserial", "-out", f"{who}.crt", "-days", _DAYS,
                 "-extfile", ext.name, cwd=self.dir)  # fmt: skip


class TlsRedis(RedisServer):
    """A RedisServer that also takes TLS on 127.0.0.1:tls_port (plain TCP off).

    auth_clients: Redis's `tls-auth-clients` (yes: a client without a certificate from the CA
    is refused).
    """

    def __init__(
        self,
        pki: Pki,
        *,
        auth_clients: bool = True,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.pki = pki
        self.tls_port = free_port()
        args = (
            "--bind", "127.0.0.1", "--tls-port", str(self.tls_port),
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca),
            "--tls-auth-clients", "yes" if auth_clients else "no",
            *extra_args,
        )  # fmt: skip
        super().__init__(password=password, extra_args=args)

    @property
    def tls_url(self) -> str:
        """The rediss:// URL of the TLS port (certificates not included)."""
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def clients(self) -> list[str]:
        """CLIENT LIST, one line per connection (asked on the plain Unix socket)."""
        args = ["redis-cli", "-s", self.socket_path]
        if self.password is not None:
            args += ["-a", self.password, "--no-auth-warning"]
        out = subprocess.run(
            [*args, "CLIENT", "LIST"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.splitlines()

    def __enter__(self) -> TlsRedis:
        self.start()
        return self


__all__ = ["Pki", "TlsRedis"]
