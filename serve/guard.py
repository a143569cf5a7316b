"""Who is asking, for the ingress: the client a quota counts under, and whether a request's
Host header names this service. Pure functions of strings (no Ray, no FastAPI), so the
config can validate ``allowed_hosts`` with them.

The Host check stops DNS rebinding: a web page on ``evil.example`` that re-points its own
name at 127.0.0.1 makes the browser send its requests, JSON included (same origin, no CORS
preflight), to a service on localhost, with ``Host: evil.example``. A name the user chose,
a loopback name or an address literal cannot be re-pointed by a page, so only those pass.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

# always accepted: loopback names a page cannot re-point
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# a Host header: a name or IPv4 address, or an IPv6 address in brackets; an optional port
_HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::\d{1,5})?")


def client_key(address: str) -> str:
    """The client a per-client quota counts ``address`` (a peer's IP) under: every loopback
    address (127.0.0.0/8, ::1, ::ffff:127.x) is the one client ``"loopback"`` (any local
    process can use any of them); an IPv4-mapped IPv6 address counts as its IPv4 address;
    what is not an address (``"?"``) counts as itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return "loopback" if ip.is_loopback else str(ip)


def _address(text: str) -> str | None:
    """``text`` as a normalised IP address ("FD00:0::7" -> "fd00::7"), or None."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def check_host_name(entry: str) -> str:
    """An ``allowed_hosts`` entry, normalised (lower case; an IPv6 address without brackets);
    raises ValueError naming the entry when it is not a host name or an IP address."""
    text = entry.strip().lower()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if (addr := _address(bare)) is not None:
        return addr
    if len(text) <= 253 and _NAME.fullmatch(text):
        return text
    raise ValueError(
        f"allowed_hosts: {entry!r} is not a host name or IP address; give the name alone, "
        "without scheme, port or path (e.g. 'gpu-box.lan', '10.0.0.4', '[fd00::7]')"
    )


def host_name(header: str) -> str | None:
    """The host a Host header names, normalised as :func:`check_host_name` does, without its
    port (``"[::1]:8000"`` -> ``"::1"``); None when the header is not a valid Host."""
    m = _HOST_HEADER.fullmatch(header.strip().lower())
    if m is None:
        return None
    if m["v6"] is not None:
        return _address(m["v6"]) if ":" in m["v6"] else None
    try:
        return check_host_name(m["name"])
    except ValueError:
        return None


def host_refusal(header: str | None, server: str | None, allowed: Iterable[str]) -> str | None:
    """None when the Host ``header`` names this service: a loopback name (:data:`LOCAL_HOSTS`),
    ``server`` (the address the request reached the service at), or one of ``allowed``
    (normalised entries); else the one-line reason to refuse the request with."""
    name = host_name(header or "")
    if name is not None:
        if name in LOCAL_HOSTS or name in allowed:
            return None
        if server is not None and name == _address(server.strip("[]")):
            return None
    return (
        f"Host {header or ''!r} is not a name this service answers to (localhost, 127.0.0.1, "
        "[::1], its own address, or allowed_hosts): to reach it by that name, add the name "
        "to allowed_hosts in the service config"
    )
