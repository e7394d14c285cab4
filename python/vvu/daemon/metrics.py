"""Device statistics as Prometheus / OpenMetrics text, through `prometheus_client`.

Nothing is counted for the metrics: a scrape reads the counters the queue runners and back-ends
keep anyway (`Device.stats`) and turns them into metric families, on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest, make_wsgi_app
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from vvu.daemon.core import Daemon

__all__ = ["DaemonCollector", "MetricsServer", "registry_for", "render"]

#: Per-queue counters: (stats key, metric name without vvu_ and _total, help).
_COUNTERS = (
    ("chains", "queue_chains", "Descriptor chains handled and returned to the driver"),
    ("batches", "queue_batches", "Batches of chains published to the used ring"),
    ("kicks", "queue_kicks", "Kicks (driver notifications) taken"),
    ("notifications", "queue_notifications", "Calls (device notifications) sent"),
    ("call_errors", "queue_call_errors", "Calls that could not be signalled"),
    ("requests", "requests", "Requests completed, whatever their status"),
    ("reads", "reads", "Read requests"),
    ("writes", "writes", "Write requests"),
    ("flushes", "flushes", "Flush requests"),
    ("discards", "discards", "Discard requests"),
    ("write_zeroes", "write_zeroes", "Write-zeroes requests"),
    ("bytes_read", "read_bytes", "Bytes read into guest memory"),
    ("bytes_written", "written_bytes", "Bytes written from guest memory"),
    ("io_errors", "io_errors", "Requests completed with an I/O error"),
    ("unsupported", "unsupported", "Requests of a type the device does not support"),
    ("malformed", "malformed_chains", "Chains that were not a well-formed request"),
)
# Latency buckets: element i of the histogram counts requests under 2**i microseconds.


class DaemonCollector(Collector):
    """Collects a daemon's device and queue statistics at scrape time."""

    def __init__(self, daemon: Daemon, loop: asyncio.AbstractEventLoop) -> None:
        self._daemon = daemon
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread

    def _snapshot(self) -> list[dict[str, object]]:
        return [device.stats() for device in self._daemon.devices.values()]

    def collect(self) -> Iterator[Metric]:
        if threading.get_ident() == self._loop_thread:
            stats = self._snapshot()
        else:  # the HTTP exporter's thread: read on the loop, never beside it
            stats = asyncio.run_coroutine_threadsafe(self._read(), self._loop).result(10)
        yield from _families(stats)

    async def _read(self) -> list[dict[str, object]]:
        return self._snapshot()


def _families(stats: list[dict[str, object]]) -> Iterator[Metric]:
    connected = GaugeMetricFamily(
        "vvu_device_connected", "Whether a front-end is connected", labels=["device", "type"]
    )
    sessions = CounterMetricFamily(
        "vvu_device_sessions", "Front-end sessions that ended", labels=["device", "type"]
    )
    counters = {
        key: CounterMetricFamily(f"vvu_{name}", text, labels=["device", "queue"])
        for key, name, text in _COUNTERS
    }
    in_flight = GaugeMetricFamily(
        "vvu_in_flight", "Requests being served now", labels=["device", "queue"]
    )
    latency = HistogramMetricFamily(
        "vvu_request_latency_seconds",
        "Time from taking a request off the ring to completing it",
        labels=["device", "queue"],
    )
    for device in stats:
        name, kind = str(device["id"]), str(device["type"])
        connected.add_metric([name, kind], 1 if device["connected"] else 0)
        sessions.add_metric([name, kind], int(device["sessions"]))  # type: ignore[call-overload]
        queues = device["queues"]
        assert isinstance(queues, list)
        for queue in queues:
            labels = [name, str(queue["index"])]
            for key, family in counters.items():
                if key in queue:
                    family.add_metric(labels, queue[key])
            if "in_flight" in queue:
                in_flight.add_metric(labels, queue["in_flight"])
            histogram = queue.get("latency_us_buckets")
            if histogram:
                cumulative, buckets = 0, []
                for i, count in enumerate(histogram):
                    cumulative += count
                    bound = "+Inf" if i == len(histogram) - 1 else f"{(1 << i) / 1e6:g}"
                    buckets.append((bound, cumulative))
                latency.add_metric(labels, buckets, queue.get("latency_ns_sum", 0) / 1e9)
    yield connected
    yield sessions
    yield from counters.values()
    yield in_flight
    yield latency


def registry_for(daemon: Daemon, loop: asyncio.AbstractEventLoop) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon, loop))
    return registry


def render(registry: CollectorRegistry, *, openmetrics: bool = False) -> str:
    """The exposition text: Prometheus 0.0.4, or OpenMetrics 1.0 (ends with `# EOF`)."""
    if openmetrics:
        data: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
    else:
        data = generate_latest(registry)
    return data.decode()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """A scrape is not an event worth a log line."""


class MetricsServer(ThreadingWSGIServer):
    """prometheus_client's WSGI app and threaded server (the ones `start_http_server` uses), on
    a listening socket made elsewhere: the AF_UNIX one of `--metrics-http unix:PATH`, or one
    systemd passed. Same answers as the HOST:PORT form: Prometheus text, OpenMetrics when the
    scraper's Accept asks for it, gzip when accepted, `name[]` filters. `start()` serves from
    a thread; `shutdown()` then `server_close()` stop it and close the socket (the caller
    removes a file it made)."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry) -> None:
        # BaseServer, not TCPServer: the socket exists already (nothing to create or bind).
        socketserver.BaseServer.__init__(self, sock.getsockname(), _QuietHandler)
        sock.setblocking(True)
        self.socket = sock
        self.server_name, self.server_port = "localhost", 0  # what HTTPServer's bind would set
        self.setup_environ()
        self.set_app(make_wsgi_app(registry))
        self._thread = threading.Thread(
            target=self.serve_forever, name="vvu-metrics-http", daemon=True
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, address = self.socket.accept()
        # An AF_UNIX peer has no address (""); WSGI's REMOTE_ADDR is client_address[0].
        return conn, address if isinstance(address, tuple) else ("local", 0)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self
