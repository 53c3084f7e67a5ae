"""Transport security: TLS (optionally mutual) when certificates are given, and the rule
that a server without API keys may only listen on loopback."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from budget_server.config import ServerConfig
from budget_server.errors import InvalidArgument


def require_loopback(listen: str) -> None:
    """--insecure anywhere but loopback would hand every budget to the network."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise InvalidArgument(
        f"--insecure (no API keys) is refused on {listen}: listen on a loopback address "
        "such as 127.0.0.1, or drop --insecure and use API keys"
    )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path!r}: {exc.strerror}") from exc


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert_file or config.tls_key_file):
        if config.tls_client_ca_file:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert_file and config.tls_key_file):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    chain = _read(config.tls_cert_file, "TLS certificate")
    key = _read(config.tls_key_file, "TLS key")
    client_ca = _read(config.tls_client_ca_file, "client CA") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
