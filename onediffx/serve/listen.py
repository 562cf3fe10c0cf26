"""The server's listening socket, bound before anything loads.

A port another process holds, or a ``serve.host`` that is not an address of this machine, is known
the moment the socket is bound. Binding first makes that one line and exit 2 within seconds, not a
"listening" line, a whole model load and warm-up, and then uvicorn's own exit code 3. uvicorn then
serves on this socket (``Server.run(sockets=[...])``) instead of binding its own.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket

from ..errors import ConfigError

_DOTTED = re.compile(r"^[0-9.]+$")
HOSTS = "127.0.0.1 (this machine only), 0.0.0.0 (every interface) or an address `ip addr` lists"


def _address(host: str, port: int) -> tuple[int, tuple]:
    """(family, socket address) of ``host``; a dotted quad out of range is refused without a DNS lookup."""
    if _DOTTED.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"serve.host: {host!r} is not a valid IPv4 address; use {HOSTS}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"serve.host: {host!r} does not resolve to an address of this machine ({reason}); "
                          f"use {HOSTS}") from None
    family, _, _, _, address = infos[0]
    return family, address


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (``0``: a free port; read it with ``getsockname``).

    Every failure is one ``ConfigError`` naming the key to change.
    """
    family, address = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn binds: a restart need not wait for the old connections' TIME_WAIT. A port another
    # process listens on still fails (Linux shares ports only with SO_REUSEPORT on both sides).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"serve.port: {port} on {host} is in use by another process; stop that process or "
                              "choose another port (serve.port=0 takes a free one)") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"serve.host: {host!r} is not an address of this machine; use {HOSTS}") from None
        if err.errno == errno.EACCES:
            raise ConfigError(f"serve.port: {port} needs privileges this process does not have; "
                              "use a port from 1024 up") from None
        raise ConfigError(f"serve.host, serve.port: cannot listen on {host}:{port} ({err.strerror or err}); "
                          f"use {HOSTS} and a free port") from None
    return sock
