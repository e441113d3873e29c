"""Where a listener listens: a TCP host and port, or a Unix socket path.

A listener setting (`[mta] smtp = "127.0.0.1:2525"`, `"[::1]:25"`,
`"unix:/run/mailroom/lmtp.sock"`) is parsed once into an `Endpoint`;
everything after that asks the value, never the text.  `bind()` makes the
socket and `listen()` opens it, each turning every way it can fail into one
`BindError` whose text names the address and the reason, so a daemon can say
it in one line and stop.

It never accepts a connection: binding happens while a daemon may still be
root; listening and serving only after the switch to the Mailroom user.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

from common.numbers import is_decimal

UNIX_PREFIX = "unix:"


class BindError(Exception):
    """A listener could not be bound; the text is `ADDRESS: reason`."""


@dataclass(frozen=True)
class Endpoint:
    """A TCP `host`:`port`, or (when `path` is set) a Unix stream socket."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str, base: str = "") -> Endpoint:
        """'127.0.0.1:25', '[::1]:25', 'localhost:25' or 'unix:/path'; ValueError says why not.
        With `base` (the config file's folder), 'unix:run/x.sock' is a path relative to it."""
        value = text.strip()
        if value.startswith(UNIX_PREFIX):
            path = value[len(UNIX_PREFIX):]
            if base and path and not path.startswith("/") and "\0" not in path:
                path = os.path.join(base, path)
            if not path.startswith("/"):
                raise ValueError(f"expected unix:/absolute/path or unix:path/in/the/config/folder, got {text!r}")
            return cls(path=path)
        if value.startswith("["):
            host, bracket, rest = value[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ValueError(f"expected [IPv6 address]:port, got {text!r}")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"not an IPv6 address in {text!r}") from None
            port_text = rest[1:]
        elif value.count(":") == 1:
            host, _, port_text = value.partition(":")
        elif ":" in value:
            raise ValueError(f"write an IPv6 address in brackets, as [::1]:25, got {text!r}")
        else:
            raise ValueError(f"expected host:port or unix:/path, got {text!r}")
        if not host:
            raise ValueError(f"missing host in {text!r}")
        if not is_decimal(port_text) or not 0 <= int(port_text) <= 65535:  # ASCII digits: "٢٥" is no port
            raise ValueError(f"bad port in {text!r}")
        return cls(host=host, port=int(port_text))

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def hostport(self) -> tuple[str, int]:
        """(host, port) of a TCP endpoint."""
        assert not self.is_unix, self
        return self.host, self.port

    def is_loopback(self) -> bool:
        """Only this host can reach it: a Unix socket, localhost or a loopback address."""
        if self.is_unix or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.is_unix:
            return UNIX_PREFIX + self.path
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def bind(self, *, v6only: bool = False, reuse_port: bool = False) -> socket.socket:
        """A bound socket, not yet listening: nobody can connect before `listen()`.
        `[::]` serves IPv4 too unless `v6only` (the setting lists IPv4 addresses of
        its own on that port).  `reuse_port` (TCP only) lets several processes of
        this user bind the same address, each its own socket, and the kernel spread
        new connections over them (SO_REUSEPORT).  BindError says why it cannot be bound."""
        try:
            return self._unix() if self.is_unix else self._tcp(v6only, reuse_port)
        except socket.gaierror as exc:
            raise BindError(f"{self}: {exc.strerror or exc}".rstrip()) from None
        except OSError as exc:
            raise self._error(exc) from None

    def listen(self, sock: socket.socket, backlog: int = 1024) -> None:
        """Open the bound socket to clients (after the switch to the Mailroom user)."""
        try:
            sock.listen(backlog)
        except OSError as exc:  # another socket bound the same port without listening yet
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> BindError:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return BindError(f"{self}: {reason[:1].lower()}{reason[1:]}")

    def _tcp(self, v6only: bool, reuse_port: bool) -> socket.socket:
        family, kind, proto, _, address = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # before bind(): the kernel checks it there
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and self.host == "::":
                # [::]:25 serves IPv4 too, whatever the system's bindv6only says;
                # the session sees those clients as plain IPv4 (client_address).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _unix(self) -> socket.socket:
        # A socket file left by an earlier run is ours to replace; anything
        # else at that path is not, and is never removed.
        try:
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise BindError(f"{self}: exists and is not a socket")
            if _accepting(self.path):
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Only the Mailroom user (the owner, after the daemon hands it over) connects.
            os.chmod(self.path, 0o600)
        except BaseException:
            sock.close()
            raise
        return sock


def v6only(endpoint: Endpoint, setting: list[Endpoint]) -> bool:
    """Whether `[::]:port` in a listener setting should serve IPv6 only: when the
    same setting names IPv4 addresses on that port, the operator said which."""
    if endpoint.is_unix or endpoint.host != "::":
        return False
    return any(
        not e.is_unix and e.port == endpoint.port and ":" not in e.host and e.host != "localhost" for e in setting
    )


def overlapping(bound: list[tuple[Endpoint, bool]]) -> tuple[int, int] | None:
    """The positions of two of these TCP endpoints (each with its v6only) that one
    host could not bind at once, or None.  SO_REUSEPORT would let one process bind
    both, and connections meant for one listener (say the public one) would reach
    the other (the internal one, which relays): the kernel's own check, by hand."""
    seen: list[tuple[int, Endpoint, int, str, bool]] = []
    for i, (endpoint, only6) in enumerate(bound):
        if endpoint.is_unix:
            continue
        family, _, _, _, address = socket.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        host = str(address[0])
        for j, other, other_family, other_host, other_only6 in seen:
            if other.port != endpoint.port:
                continue
            if family == other_family:
                clash = host == other_host or _wildcard(host) or _wildcard(other_host)
            else:  # [::] serves IPv4 too unless it is IPv6 only
                v6, v6_only = (host, only6) if family == socket.AF_INET6 else (other_host, other_only6)
                clash = v6 == "::" and not v6_only
            if clash:
                return j, i
        seen.append((i, endpoint, family, host, only6))
    return None


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _accepting(path: str) -> bool:
    """Is a live process listening on the Unix socket at `path` (not a stale file)?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
