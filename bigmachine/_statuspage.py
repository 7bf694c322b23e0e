"""The status page: a small HTTP server of the driver's, on loopback by default.

``bm.start(..., status_addr="127.0.0.1:0")`` serves, under a random token
(so other users of the host cannot read the page or start a profile):

- ``/TOKEN/``: an HTML page that refreshes itself: machines, their health,
  the busiest methods, a sparkline of keepalive round trips;
- ``/TOKEN/status.json``: ``b.status().to_dict()``;
- ``/TOKEN/profile?seconds=N``: a merged CPU profile as folded stacks.

Anything else, a wrong token included, is 404. The token never reaches the
log; a connection silent for IDLE_TIMEOUT seconds is closed, and at most
MAX_CONNECTIONS are served at once (more are closed as they come), so that
nobody on the host can make the driver hold a thread per idle socket.
"""
from __future__ import annotations

import hmac
import http.server
import json
import logging
import secrets
import socket
import threading
import urllib.parse
from typing import Any

from .errors import Error

log = logging.getLogger("bigmachine.statuspage")

MAX_PROFILE_SECONDS = 60.0
REFRESH_MS = 2000
IDLE_TIMEOUT = 5.0     # seconds a connection may stay silent (as a machine's handshake deadline)
MAX_CONNECTIONS = 16   # served at once; a page refreshes over one or two

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>bigmachine status</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { padding: .25em .8em; text-align: left; border-bottom: 1px solid #ddd; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00; font-weight: bold; } .ok { color: #070; }
svg { vertical-align: middle; }
</style></head>
<body>
<h1>bigmachine</h1>
<p id="taken"></p>
<h2>Machines</h2>
<table id="machines"><thead><tr><th>machine</th><th>state</th><th>address</th><th>up</th>
<th>cpus</th><th>rss</th><th>memory used / limit</th><th>load</th><th>health</th>
<th>keepalive</th><th></th><th>error</th></tr></thead><tbody></tbody></table>
<h2>Busiest methods</h2>
<table id="methods"><thead><tr><th>machine</th><th>method</th><th>calls</th><th>errors</th>
<th>in flight</th><th>p50</th><th>p99</th></tr></thead><tbody></tbody></table>
<p><a href="status.json">status.json</a> &middot; <a href="profile?seconds=5">5 s CPU profile</a>
(folded stacks)</p>
<script id="initial" type="application/json">__STATUS__</script>
<script>
"use strict";
function size(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? n.toFixed(1) + " " + units[i] : n + " B";
}
function secs(s) {
  if (s === null || s === undefined) return "-";
  if (s < 1e-3) return (s * 1e6).toFixed(0) + "us";
  if (s < 1) return (s * 1e3).toFixed(1) + "ms";
  return s.toFixed(2) + "s";
}
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function sparkline(values) {
  const ns = "http://www.w3.org/2000/svg", w = 120, h = 20;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  if (values.length > 1) {
    const top = Math.max(...values) || 1;
    const points = values.map((v, i) =>
      (i * w / (values.length - 1)).toFixed(1) + "," + (h - 1 - v / top * (h - 2)).toFixed(1));
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", "#36c");
    svg.appendChild(line);
  }
  return svg;
}
function render(status) {
  document.getElementById("taken").textContent =
    "as of " + new Date(status.taken * 1000).toLocaleString();
  const machines = document.querySelector("#machines tbody");
  machines.replaceChildren();
  const methods = [];
  for (const m of status.machines) {
    const row = machines.insertRow();
    row.className = "machine";
    cell(row, m.name); cell(row, m.state); cell(row, m.addr);
    cell(row, m.uptime === null ? "-" : Math.round(m.uptime) + "s", "n");
    cell(row, m.cpus === null ? "-" : m.cpus, "n");
    cell(row, size(m.rss), "n");
    cell(row, size(m.mem_used) + " / " + size(m.mem_total), "n");
    cell(row, m.load1 === null ? "-" : m.load1.toFixed(2), "n");
    cell(row, m.healthy ? "ok" : "unhealthy", m.healthy ? "ok" : "bad");
    const rtt = m.keepalive_rtt;
    cell(row, rtt.length ? secs(rtt[rtt.length - 1]) : "-", "n");
    cell(row, "").appendChild(sparkline(rtt));
    cell(row, m.err || "");
    for (const [name, c] of Object.entries(m.calls)) methods.push([m.name, name, c]);
  }
  methods.sort((a, b) => b[2].count - a[2].count);
  const body = document.querySelector("#methods tbody");
  body.replaceChildren();
  for (const [machine, name, c] of methods.slice(0, 20)) {
    const row = body.insertRow();
    cell(row, machine); cell(row, name); cell(row, c.count, "n");
    cell(row, c.errors, c.errors ? "n bad" : "n"); cell(row, c.in_flight, "n");
    cell(row, secs(c.p50), "n"); cell(row, secs(c.p99), "n");
  }
}
async function refresh() {
  try {
    const reply = await fetch("status.json", {cache: "no-store"});
    if (reply.ok) render(await reply.json());
  } catch (e) {
    document.getElementById("taken").textContent = "the driver does not answer";
  }
}
render(JSON.parse(document.getElementById("initial").textContent));
setInterval(refresh, __REFRESH__);
</script>
</body></html>
"""


class _Server(http.server.ThreadingHTTPServer):
    """A thread per connection, MAX_CONNECTIONS at most."""

    daemon_threads = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # closed at once: a client may try again
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def split_host_port(addr: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise Error(f"status_addr must be 'host:port' (port 0-65535; 0 for any), not {addr!r}")
    return host.strip("[]"), int(port)


class StatusPage:
    """Serves a session's status on addr until close()."""

    def __init__(self, b: Any, addr: str):
        self.b = b
        self.token = secrets.token_urlsafe(18)
        host, port = split_host_port(addr)
        page = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = IDLE_TIMEOUT

            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                page.serve(self)

            def log_message(self, fmt: str, *args: Any) -> None:
                message = (fmt % args).replace(page.token, "TOKEN")  # request lines hold it
                log.debug("%s: %s", self.client_address[0], message)

        server_class = _Server
        if ":" in host:
            server_class = type("ThreadingHTTPServer6", (server_class,), {"address_family": socket.AF_INET6})
        try:
            self.server = server_class((host, port), Handler)
        except OSError as exc:
            raise Error(f"cannot serve the status page on {addr}: {exc}") from exc
        bound = self.server.server_address[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/{self.token}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="bigmachine-statuspage")
        self.thread.start()
        log.info("status page on port %d (its URL, with the token: b.status_url)", bound)

    def serve(self, request: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        token, _, rest = url.path.lstrip("/").partition("/")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return self._reply(request, 404, "text/plain", b"not found\n")
        try:
            if rest == "":
                status = json.dumps(self.b.status().to_dict()).replace("</", "<\\/")
                html = _PAGE.replace("__STATUS__", status).replace("__REFRESH__", str(REFRESH_MS))
                return self._reply(request, 200, "text/html; charset=utf-8", html.encode())
            if rest == "status.json":
                body = json.dumps(self.b.status().to_dict()).encode()
                return self._reply(request, 200, "application/json", body)
            if rest == "profile":
                query = urllib.parse.parse_qs(url.query)
                seconds = float(query.get("seconds", ["5"])[0])
                if not 0 < seconds <= MAX_PROFILE_SECONDS:
                    return self._reply(request, 400, "text/plain",
                                       f"seconds must be in (0, {MAX_PROFILE_SECONDS:g}]\n".encode())
                body = self.b.profile(seconds=seconds).collapsed().encode()
                return self._reply(request, 200, "text/plain; charset=utf-8", body)
        except (Error, ValueError) as exc:
            return self._reply(request, 500, "text/plain", f"{exc}\n".encode())
        self._reply(request, 404, "text/plain", b"not found\n")

    @staticmethod
    def _reply(request: http.server.BaseHTTPRequestHandler, code: int, kind: str, body: bytes) -> None:
        request.send_response(code)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(body)

    def close(self) -> None:
        """Stop serving; idempotent."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(5)
        self.server.server_close()
