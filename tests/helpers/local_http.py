"""A real HTTP server on 127.0.0.1 for the tests' fake LLM servers (each brings its own handler)."""

from __future__ import annotations

import http.server
import json
import threading


class LocalHTTPServer:
    """Serves `handler` on a free port from daemon threads; `url` is the OpenAI-style /v1 base."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True  # a handler stuck on a slow client never blocks close()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_json(handler: http.server.BaseHTTPRequestHandler, payload: object, status: int = 200) -> None:
    """Answer the handler's request with `payload` as a JSON body."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
