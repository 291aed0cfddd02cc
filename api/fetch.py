"""Image URLs, only when config.json has `"api_enable_requests": true` (off by default; the API
cannot turn it on). The host must resolve to public addresses only (never loopback, private,
link-local or cloud-metadata ones, A1111's `api_forbid_local_requests` made unconditional), and
the connection goes to the address that was checked, so DNS cannot swap in another one.
No redirects, a size cap and a timeout."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from typing import Callable
from urllib.parse import urlsplit

TIMEOUT_S = 10
Resolve = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%", 1)[0]).is_global


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str) -> None:
        super().__init__(host, port, timeout=TIMEOUT_S)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str) -> None:
        super().__init__(host, port, timeout=TIMEOUT_S, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # certificate of the name


def fetch(url: str, max_bytes: int, resolve: Resolve = resolve_host,
          allowed: Callable[[str], bool] = is_public) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("only http(s) image URLs can be fetched")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(parts.hostname, port)
    except OSError:
        raise ValueError(f"cannot resolve {parts.hostname}") from None
    if not addresses or not all(allowed(a) for a in addresses):
        raise ValueError(f"{parts.hostname} is not a public address; local and private addresses are never fetched")
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(parts.hostname, port, addresses[0])
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path, headers={"User-Agent": "Easel", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status != 200:
            raise ValueError(f"the image URL answered HTTP {response.status} (redirects are not followed)")
        data = response.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise ValueError(f"cannot fetch the image URL: {exc}") from None
    finally:
        connection.close()
    if len(data) > max_bytes:
        raise ValueError(f"the image at the URL is larger than {max_bytes >> 20} MB")
    return data
