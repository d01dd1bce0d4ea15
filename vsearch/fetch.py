"""Fetching images from http(s) URLs without becoming an SSRF proxy.

Every hop (the URL and each redirect) is resolved once, every address it resolves
to must be public unless the policy allows private ones, and the connection goes to
that checked address (so a DNS answer cannot change between check and use). Bodies
are capped while streaming; the whole fetch has one deadline, and the process runs at
most so many fetches at once.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .errors import VsearchError
from .limits import url_fetch_slots

__all__ = ["FetchPolicy", "FetchError", "UrlBlockedError", "TooLargeError", "fetch_url", "check_address"]


class FetchError(VsearchError):
    """The URL could not be fetched (unreachable, timeout, HTTP error)."""


class UrlBlockedError(FetchError):
    """The URL points somewhere the policy forbids (scheme, private address)."""


class TooLargeError(FetchError):
    """The body is larger than allowed."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False  # loopback, private, link-local, metadata, CGNAT, ...
    allowed_networks: tuple[str, ...] = ()  # exceptions, e.g. ("10.1.2.0/24",) for an internal CDN
    timeout_s: float = 10.0
    max_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 5


TRUSTED = FetchPolicy(allow_private=True, timeout_s=15.0, max_bytes=32 * 1024 * 1024)


def check_address(ip: str, policy: FetchPolicy) -> None:
    address = _embedded_ipv4(ipaddress.ip_address(ip.split("%", 1)[0]))
    if policy.allow_private or address.is_global:
        return
    if any(address in ipaddress.ip_network(net, strict=False) for net in policy.allowed_networks):
        return
    raise UrlBlockedError(f"address {address} is not public (loopback, private, link-local or reserved)")


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix (RFC 6052)


def _embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv6 form carries (mapped, NAT64, 6to4), which is where
    the packets go; otherwise the address itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    return address


def fetch_url(url: str, policy: FetchPolicy = TRUSTED) -> bytes:
    """The body of an http(s) URL under ``policy``. ``timeout_s`` bounds the whole fetch
    (connecting, redirects and the body), so a server that drips a byte at a time
    cannot hold a worker longer than that; and at most so many fetches run at once
    (:func:`vsearch.limits.url_fetch_slots`: past that, :class:`~vsearch.limits.Busy`),
    so slow URLs cannot hold every worker thread either."""
    with url_fetch_slots().hold():
        return _fetch(url, policy)


def _fetch(url: str, policy: FetchPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        response, connection = _open(url, policy, _remaining(deadline, url, policy))
        try:
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"{url}: redirect without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchError(f"{url}: HTTP {response.status}")
            return _read_capped(response, policy.max_bytes, url, deadline, policy)
        finally:
            connection.close()
    raise FetchError(f"{url}: more than {policy.max_redirects} redirects")


def _remaining(deadline: float, url: str, policy: FetchPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"{url}: took longer than {policy.timeout_s:g} s")
    return left


def _open(url: str, policy: FetchPolicy, timeout: float) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlBlockedError(f"{url}: only http(s) URLs with a host are allowed")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"{url}: cannot resolve {parts.hostname}: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        check_address(address, policy)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = _PinnedHTTPSConnection(addresses[0], parts.hostname, port, timeout)
    else:
        connection = http.client.HTTPConnection(addresses[0], port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        connection.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "vsearch"})
        return connection.getresponse(), connection
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise FetchError(f"{url}: {exc}") from exc


def _read_capped(
    response: http.client.HTTPResponse,
    max_bytes: int,
    url: str,
    deadline: float,
    policy: FetchPolicy,
) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooLargeError(f"{url}: {declared} bytes is more than the {max_bytes}-byte limit")
    chunks, total = [], 0
    try:
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # the connection lets go of it
        while True:
            left = _remaining(deadline, url, policy)
            if isinstance(sock, socket.socket):  # each wait gets only what is left of the deadline
                sock.settimeout(left)
            chunk = response.read1(65536)  # whatever has arrived: a drip cannot reset a timer
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise TooLargeError(f"{url}: more than the {max_bytes}-byte limit")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"{url}: {exc}") from exc
    return b"".join(chunks)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address, with SNI and certificate checks for the hostname."""

    def __init__(self, address: str, hostname: str, port: int, timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self._hostname = hostname

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._hostname)  # type: ignore[attr-defined]
