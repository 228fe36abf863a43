"""Network addresses a server is asked to listen on: can it, and is it loopback only.

Light on purpose (standard library only), so that a command can check its address before it
imports a serving stack or starts a server that would find out seconds later.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from .errors import DigitflowError


class AddressUnavailable(DigitflowError):
    """The server cannot listen on the address asked for (another server has the port, a host
    this machine does not have, a port it may not open)."""


def check_address(host: str, port: int) -> None:
    """AddressUnavailable, naming why, when a server could not listen on host:port. The probe
    binds as uvicorn and gunicorn do (SO_REUSEADDR) and lets go at once."""
    where = f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressUnavailable(f"cannot serve on {where}: {exc.strerror}") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                hint = ""
                if exc.errno == errno.EADDRINUSE:
                    hint = " (another server is listening there); choose another with --port"
                raise AddressUnavailable(f"cannot serve on {where}: {exc.strerror}{hint}") from None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.1, ::1, localhost and the rest of the loopback range."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
