"""Outbound HTTP to user-supplied URLs (image inputs, webhooks) without server-side request forgery.

A URL is resolved once; every resolved address must pass the `AddressPolicy`; the request then
connects to that exact address (Host header and TLS SNI keep the original name), so a DNS answer
that changes between check and connect (rebinding) cannot redirect us. Redirects are never followed
by the client: callers that follow them re-run the whole check for every hop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from generation.errors import FetchError, UnsafeAddress

__all__ = [
    "METADATA_ADDRESSES",
    "AddressPolicy",
    "IPAddress",
    "Target",
    "guarded_client",
    "resolve_target",
    "send_pinned",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance metadata endpoints: refused even when private addresses are allowed.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class AddressPolicy:
    """Which destinations outbound requests may reach.

    `allow_private` opens loopback, private, link-local, shared and reserved ranges (development).
    `allowed_endpoints` names single `(ip, port)` destinations an operator trusts explicitly, e.g.
    an internal webhook receiver, without opening every private address.
    Multicast, unspecified and metadata addresses are refused unless listed in `allowed_endpoints`.
    """

    allow_private: bool = False
    allowed_endpoints: frozenset[tuple[str, int]] = frozenset()

    def check(self, address: IPAddress, port: int) -> None:
        ip = _embedded_ipv4(address)
        if (str(address), port) in self.allowed_endpoints or (
            str(ip),
            port,
        ) in self.allowed_endpoints:
            return
        if ip in METADATA_ADDRESSES or address in METADATA_ADDRESSES:
            raise UnsafeAddress(f"{address} is a cloud metadata address")
        if ip.is_multicast or ip.is_unspecified:
            raise UnsafeAddress(f"{address} is not a unicast address")
        if self.allow_private:
            return
        if (
            ip.is_loopback
            or ip.is_private
            or ip.is_link_local
            or ip.is_reserved
            or not ip.is_global
        ):
            raise UnsafeAddress(f"{address} is not a public address")


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one tunnels to (mapped, 6to4, Teredo, NAT64), else itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True)
class Target:
    """A checked destination: the URL as given and the address we will connect to."""

    url: httpx.URL
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


async def resolve_target(url: str | httpx.URL, policy: AddressPolicy) -> Target:
    """Parse, resolve once and check every address; raise `UnsafeAddress`/`FetchError`."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise FetchError("bad_url", "not a valid URL") from exc
    if parsed.scheme not in ("http", "https"):
        raise FetchError("bad_url", "only http and https URLs are accepted")
    if parsed.userinfo:
        raise FetchError("bad_url", "credentials in URLs are not accepted")
    host = parsed.host
    if not host:
        raise FetchError("bad_url", "URL has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = await _resolve(host, port)
    for address in addresses:
        policy.check(address, port)
    return Target(url=parsed, host=host, port=port, addresses=tuple(addresses))


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError("unresolvable", f"cannot resolve host {host!r}") from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise FetchError("unresolvable", f"cannot resolve host {host!r}")
    return addresses


def guarded_client(timeout: float = 15.0) -> httpx.AsyncClient:
    """A client fit for `send_pinned`: no environment proxies (they would bypass the pinning),
    no kept-alive connections."""
    return httpx.AsyncClient(
        timeout=timeout,
        trust_env=False,
        follow_redirects=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


async def send_pinned(
    client: httpx.AsyncClient,
    method: str,
    target: Target,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    stream: bool = False,
) -> httpx.Response:
    """Send to the checked address; Host and SNI keep the original name. No redirects."""
    # Connections are keyed by the pinned IP, so a kept-alive one could carry a later request for
    # another name on the same IP over TLS verified for the first: one connection per request.
    all_headers = {
        **(headers or {}),
        "Host": target.url.netloc.decode("ascii"),
        "Connection": "close",
    }
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    # Every address was checked; try them in order (e.g. ::1 then 127.0.0.1) until one connects.
    for index, address in enumerate(target.addresses):
        request = client.build_request(
            method,
            target.url.copy_with(host=str(address)),
            headers=all_headers,
            content=content,
            extensions=extensions,
        )
        try:
            return await client.send(request, stream=stream, follow_redirects=False)
        except httpx.ConnectError:
            if index == len(target.addresses) - 1:
                raise
    raise AssertionError("resolve_target never returns a target without addresses")
