"""Serving an aiohttp app from the command line, as sim serve and the gateway both do.

A port in use or an address not of this machine is one line and exit
status 1, not a traceback; the banner is printed only once the address is
bound; and a request aiohttp's parser refuses is logged in one line (it has
already had its 400), not with a traceback per bad client request.
"""

from __future__ import annotations

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
    sock = None
    if port == 0:
        try:
            if host:  # a name that resolves to several addresses is bound on its first, with one port
                family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
                sock = socket.create_server((host, 0), family=family)
            else:  # every interface, as aiohttp binds an empty host
                dual = socket.has_dualstack_ipv6()
                sock = socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                                            dualstack_ipv6=dual)
        except OSError as exc:
            print(f"{prog}: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        port = sock.getsockname()[1]
    shown = host or "0.0.0.0"
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"

    def bound(_: str) -> None:
        if banner is not None:
            print(banner(url), file=sys.stderr, flush=True)

    server_log = logging.getLogger("aiohttp.server")
    one_line = MalformedRequestsInOneLine()
    server_log.addFilter(one_line)
    where = {"sock": sock} if sock is not None else {"host": host, "port": port}
    try:
        web.run_app(app, **where, handler_cancellation=True, access_log=None, print=bound)
    except OSError as exc:
        print(f"{prog}: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        server_log.removeFilter(one_line)
        if sock is not None:
            sock.close()
    return 0


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
