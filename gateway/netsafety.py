"""Outbound URL safety for webhooks: HTTPS only, public addresses only, checked when the URL is
accepted *and again when connecting* (so DNS rebinding cannot reach a private address).

Hosts on the configured allow-list (development, tests) may use http and private addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Awaitable, Callable, Iterable

import anyio
import httpcore
import httpx

Resolver = Callable[[str, int], Awaitable[list[str]]]

# not covered by ipaddress' is_private/is_global checks in every Python version
_EXTRA_BLOCKED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # carrier-grade NAT (and Alibaba's metadata 100.100.100.200)
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved
        "255.255.255.255/32",
        "64:ff9b:1::/48",  # local-use NAT64
        "fc00::/7",  # unique local (AWS metadata fd00:ec2::254)
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeUrl(Exception):
    pass


def is_public_address(address: str) -> bool:
    """Whether a literal IPv4/IPv6 address is a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_private or ip.is_reserved or ip.is_unspecified:
        return False
    if any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version):
        return False
    return ip.is_global


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlPolicy:
    def __init__(self, allow_hosts: Iterable[str] = (), resolver: Resolver = system_resolver) -> None:
        self.allow_hosts = {h.lower() for h in allow_hosts}
        self.resolver = resolver

    def allowed(self, host: str) -> bool:
        return host.lower().strip("[]") in self.allow_hosts

    async def addresses(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and insist that every address is public (unless allow-listed)."""
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare.split("%", 1)[0])
            found = [bare]
        except ValueError:
            try:
                found = await self.resolver(bare, port)
            except OSError:
                raise UnsafeUrl(f"the host {host!r} does not resolve") from None
        if not found:
            raise UnsafeUrl(f"the host {host!r} does not resolve")
        if self.allowed(host):
            return found
        bad = [a for a in found if not is_public_address(a)]
        if bad:
            raise UnsafeUrl(f"the host {host!r} resolves to a non-public address ({bad[0]}); a gateway operator "
                            "can allow it by listing the host in `webhooks.allow_hosts`")
        return found

    async def check(self, url: str) -> None:
        """Raise UnsafeUrl unless ``url`` may receive webhooks."""
        try:
            u = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise UnsafeUrl("not a valid URL") from None
        if not u.host:
            raise UnsafeUrl("the URL has no host")
        if u.scheme != "https" and not (u.scheme == "http" and self.allowed(u.host)):
            raise UnsafeUrl("the URL must use https:// (plain http:// only reaches hosts a gateway operator lists "
                            "in `webhooks.allow_hosts`, as written in the URL: a name, or an IP literal such as "
                            "127.0.0.1; `localhost` does not cover 127.0.0.1)")
        if u.userinfo:
            raise UnsafeUrl("the URL must not contain credentials")
        await self.addresses(u.host, u.port or (443 if u.scheme == "https" else 80))


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks the host at connect time, then connects to a checked address.
    TLS still verifies the certificate for the original host name (SNI)."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # type: ignore[no-untyped-def]
        try:
            addresses = await self.policy.addresses(host, port)
        except UnsafeUrl as e:
            raise httpcore.ConnectError(str(e)) from None
        return await self.inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class CheckedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: UrlPolicy, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        ssl_context = self._pool._ssl_context  # the context httpx built for `verify`
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=50, max_keepalive_connections=10,
            keepalive_expiry=5.0, network_backend=_CheckedBackend(policy),
        )


def webhook_client(policy: UrlPolicy, *, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """A client that never follows redirects and only connects to checked addresses."""
    return httpx.AsyncClient(
        transport=transport or CheckedTransport(policy),
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        follow_redirects=False,
        headers={"user-agent": "lora-gateway-webhooks/1"},
    )
