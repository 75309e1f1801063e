"""Serving an aiohttp app from the command line, as sim serve and the gateway both do.

A port in use or an address not of this machine is one line and exit
status 1, not a traceback; the banner is printed only once the address is
bound; and a request aiohttp's parser refuses is logged in one line (it has
already had its 400), not with a traceback per bad client request.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from typing import Callable

from aiohttp import web


def run_site(app: web.Application, host: str, port: int, prog: str,
             banner: Callable[[str], str] | None = None) -> int:
    """Serve ``app`` until interrupted; an address that cannot be bound (in use, not
    an address of this machine) is one line and exit status 1.

    ``banner(url)`` goes to stderr once the address is bound (aiohttp's
    ``print`` hook runs after its sites start), so a port in use is not first
    announced as served. Port 0 lets the system choose: the socket is bound
    here to learn which, as a banner saying ``:0`` names no reachable address.
    """
    socks: list[socket.socket] = []
    if port == 0:
        try:
            socks = bind_one_free_port(host)
        except OSError as exc:
            print(f"{prog}: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        port = socks[0].getsockname()[1]
    shown = host or "0.0.0.0"
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"

    def bound(_: str) -> None:
        if banner is not None:
            print(banner(url), file=sys.stderr, flush=True)

    server_log = logging.getLogger("aiohttp.server")
    one_line = MalformedRequestsInOneLine()
    server_log.addFilter(one_line)
    where = {"sock": socks} if socks else {"host": host, "port": port}
    try:
        web.run_app(app, **where, handler_cancellation=True, access_log=None, print=bound)
    except OSError as exc:
        print(f"{prog}: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        server_log.removeFilter(one_line)
        for sock in socks:
            sock.close()
    return 0


def bind_one_free_port(host: str, attempts: int = 20) -> list[socket.socket]:
    """Listening sockets on one port the system chose, on every address ``host`` resolves to,
    as aiohttp binds a named port (``localhost``: 127.0.0.1 and ::1); an empty host is every
    interface. The first address picks the port; if another address has it taken, all are
    closed and another port is tried. The first socket's port is the one to announce."""
    if not host:  # every interface, as aiohttp binds an empty host
        dual = socket.has_dualstack_ipv6()
        return [socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                                     dualstack_ipv6=dual)]
    infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, sockaddr[0]) for family, _, _, _, sockaddr in infos))
    attempt = 0
    while True:
        socks: list[socket.socket] = []
        try:
            for family, address in addresses:  # an IPv6 socket is made v6-only, so ::1 and 127.0.0.1 coexist
                port = socks[0].getsockname()[1] if socks else 0
                socks.append(socket.create_server((address, port), family=family))
            return socks
        except OSError as exc:
            for sock in socks:
                sock.close()
            attempt += 1  # only the port being taken on a later address is worth another port
            if not socks or exc.errno != errno.EADDRINUSE or attempt == attempts:
                raise


class MalformedRequestsInOneLine(logging.Filter):
    """A request aiohttp's parser refuses (a NUL in a header, a bad chunk size) already got its
    400; aiohttp also logged it with a whole traceback, one per bad client request."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused a malformed HTTP request (400): %s", (" ".join(str(exc.message).split()),), None, None)
        return True
