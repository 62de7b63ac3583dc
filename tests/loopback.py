"""A folder served over HTTP on 127.0.0.1 (a real server, a free port): how the tests and the
real-scale benchmark exercise the URL path (data.url) with no network."""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve(folder: Path) -> ThreadingHTTPServer:
    """Serve ``folder`` until ``shutdown()``; the port is ``server.server_address[1]``. Quiet: no request log."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
