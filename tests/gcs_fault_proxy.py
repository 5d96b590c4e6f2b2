"""A threaded HTTP proxy in front of the GCS emulator that injects the faults real GCS shows.

Clients reach it through STORAGE_EMULATOR_HOST. It forwards the Host header unchanged, so the
emulator's resumable-upload Location and mediaLink URLs point back at the proxy. Faults:
an HTTP status (503, 429, ...) for the next N requests, a dropped connection (socket closed
with no answer) for the next N requests, 403 for every request on one bucket, a flipped
byte in the next N object downloads, and an outage that starts right after the first request
for a matching object (to catch a client inside one transfer). Status and drop faults may first let `skip` requests
through, which interrupts a batch part-way deterministically.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import re
import socket
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

_LOG = logging.getLogger(__name__)

# Hop-by-hop headers describe one connection and must not be relayed.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
# JSON API paths name the bucket after /b/; XML API paths start with it.
_JSON_BUCKET = re.compile(r"/b/([^/?]+)")
_XML_BUCKET = re.compile(r"^/([^/?]+)/")


@dataclass
class _Fault:
    action: str  # "status" or "drop"
    remaining: float  # math.inf: until cleared
    skip: int = 0
    status: int = 503


def bucket_of(path: str) -> str | None:
    """The bucket a GCS request path addresses, if any."""
    match = _JSON_BUCKET.search(path) or _XML_BUCKET.match(path)
    return match.group(1) if match else None


class FaultProxy:
    """Start with `start()`; `url` is what STORAGE_EMULATOR_HOST should name."""

    def __init__(self, target_url: str) -> None:
        parsed = urlparse(target_url)
        self._target = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._forbidden: set[str] = set()
        self._corrupt = 0
        # fail_after_match: the pattern to wait for, then the status answered to everything after it.
        self._after_pattern: re.Pattern[str] | None = None
        self._after_status: int | None = None
        self._pending_status = 503
        self._log: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll keeps stop() (shutdown waits one poll) from adding 0.5 s to every test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # Controls ---------------------------------------------------------------------------------

    def fail_next(self, n: float, status: int = 503, skip: int = 0) -> None:
        """Answer `status` to the next n requests (after letting `skip` through)."""
        with self._lock:
            self._faults.append(_Fault("status", n, skip, status))

    def drop_next(self, n: float, skip: int = 0) -> None:
        """Close the connection without an answer for the next n requests (math.inf: all)."""
        with self._lock:
            self._faults.append(_Fault("drop", n, skip))

    def forbid_bucket(self, bucket: str) -> None:
        """Answer 403 to every request on `bucket`, as GCS does without IAM permission."""
        with self._lock:
            self._forbidden.add(bucket)

    def fail_after_match(self, pattern: str, status: int = 503) -> None:
        """Forward the first request whose unquoted path and query, or the start of whose body (a
        multipart upload names its object there), match `pattern`; then answer `status` to every
        request until `heal()`: the client is caught mid-way through a transfer."""
        with self._lock:
            self._after_pattern, self._after_status = re.compile(pattern), None
            self._pending_status = status

    def corrupt_next_downloads(self, n: int) -> None:
        """Flip the first byte of the next n object downloads, headers left as they were."""
        with self._lock:
            self._corrupt += n

    def heal(self) -> None:
        """Remove every fault; requests pass through again."""
        with self._lock:
            self._faults.clear()
            self._forbidden.clear()
            self._corrupt = 0
            self._after_pattern = self._after_status = None

    def requests(self, outcome: str | None = None) -> list[tuple[str, str]]:
        """(method, path) of requests seen, optionally only those with `outcome`
        ("forwarded", "dropped", "status", "forbidden", "corrupted")."""
        with self._lock:
            return [(m, p) for m, p, o in self._log if outcome is None or o == outcome]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # Internals --------------------------------------------------------------------------------

    def _maybe_corrupt(self, path: str, payload: bytes) -> bytes:
        with self._lock:
            if not (self._corrupt and path.startswith("/download/") and payload):
                return payload
            self._corrupt -= 1
            self._log.append(("GET", path, "corrupted"))
        return bytes([payload[0] ^ 0xFF]) + payload[1:]

    def _decide(self, method: str, path: str, body: bytes = b"") -> tuple[str, int]:
        """Which outcome this request gets; consumes one unit of the first active fault."""
        with self._lock:
            outcome, status = "forwarded", 0
            if bucket_of(path) in self._forbidden:
                outcome, status = "forbidden", 403
            elif self._after_status is not None:
                outcome, status = "status", self._after_status
            elif self._after_pattern is not None and self._after_pattern.search(
                    unquote(path) + "\n" + body[:4096].decode("latin-1")):
                # This one goes through; from the next request on the outage is on.
                self._after_pattern, self._after_status = None, self._pending_status
            else:
                for fault in self._faults:
                    if fault.skip > 0:
                        fault.skip -= 1
                        break
                    if fault.remaining > 0:
                        fault.remaining -= 1
                        outcome = "dropped" if fault.action == "drop" else "status"
                        status = fault.status
                        break
                self._faults = [f for f in self._faults if f.remaining > 0]
            self._log.append((method, path, outcome))
            return outcome, status

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so a dropped connection is never a reused one.
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: object) -> None:
                _LOG.debug("proxy: " + format, *args)

            def _body(self) -> bytes:
                length = self.headers.get("Content-Length")
                if length is not None:
                    return self.rfile.read(int(length))
                if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().strip() or b"0", 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(parts)
                return b""

            def _handle(self) -> None:
                body = self._body()
                outcome, status = proxy._decide(self.command, self.path, body)
                if outcome == "dropped":
                    # Shut down without a byte of answer: the client sees the server vanish.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if outcome in ("status", "forbidden"):
                    self._answer_error(status)
                    return
                self._forward(body)

            def _answer_error(self, status: int) -> None:
                reason = http.client.responses.get(status, "Error")
                message = (
                    "tljob-test does not have storage.objects.create access to the bucket"
                    if status == 403
                    else f"injected {status} {reason}"
                )
                payload = json.dumps(
                    {
                        "error": {
                            "code": status,
                            "message": message,
                            "errors": [{"message": message}],
                        }
                    }
                ).encode()
                self.send_response(status, reason)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy._target, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = proxy._maybe_corrupt(self.path, response.read())
                except OSError as err:
                    # The emulator is down (a test stopped it): answer as a load balancer would.
                    _LOG.debug("proxy: upstream %s failed: %s", proxy._target, err)
                    upstream.close()
                    self._answer_error(502)
                    return
                try:
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP | {"content-length", "server", "date"}:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        return Handler
