"""GET /metrics of `lorakit serve`: Prometheus' text format through `prometheus_client` (the
`metrics` extra, imported only when a server starts), with vLLM's metric and label names under a
`lorakit:` prefix where the meaning is the same, so that a vLLM dashboard needs a prefix change.

Request metrics are fed by the server: each generation request's engine events pass through a
`Watch` (on the scheduler thread) before they reach the HTTP side. What the engine holds now
(rows, waiting requests, resident adapters and their counters) is read when Prometheus scrapes,
so no state is kept twice.

Labels: `model_name` is the served base model's name on every metric, as in vLLM; `adapter` is
the adapter a request named, "" for the base model, and "<unknown>" for a request that named no
model this server serves (names chosen by clients never become label values).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lorakit.inference.engine import Engine, Event, Snapshot
from lorakit.log import get_logger
from lorakit.lora import BASE_ADAPTER

log = get_logger(__name__)

PREFIX = "lorakit:"
BASE_LABEL = ""
UNKNOWN_LABEL = "<unknown>"
INSTALL_HINT = "pip install 'lorakit[metrics]'"
MISSING = f"GET /metrics needs prometheus_client, which is not installed: {INSTALL_HINT}"

# vLLM's buckets, so that quantiles computed by its dashboards mean the same here
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
TOKEN_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
REQUEST_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def adapter_label(adapter: str) -> str:
    """The `adapter` label of a request for `adapter` (BASE_ADAPTER: the base model)."""
    return BASE_LABEL if adapter == BASE_ADAPTER else adapter


def create(engine: Engine, model_name: str) -> ServerMetrics | None:
    """The metrics of a server, or None (and one log line) when prometheus_client is missing:
    the server then works without them and GET /metrics says what to install."""
    try:
        import prometheus_client  # noqa: F401
    except ModuleNotFoundError:
        log.warning(MISSING)
        return None
    return ServerMetrics(engine, model_name)


@dataclass
class _Series:
    """One adapter's request metrics (the labelled children, looked up once)."""

    prompt_tokens: Any
    generation_tokens: Any
    ttft: Any
    inter_token: tuple[Any, ...]  # inter_token_latency_seconds and its older vLLM name
    request_tpot: Any
    e2e: Any


class ServerMetrics:
    """One server's registry (not prometheus_client's global one, so that servers and tests in
    one process stay apart), the request metrics the server feeds, and the engine's state read
    at each scrape."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name", "adapter"]

        def counter(name: str, doc: str, *extra: str) -> Any:
            return Counter(PREFIX + name, doc, labels + list(extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets)

        self.requests = counter(
            "requests", "Generation requests answered, by HTTP status (a stream: 200).", "status"
        )
        self.success = counter(
            "request_success",
            "Requests finished, by reason: stop, length, abort (the client went away), error.",
            "finished_reason",
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Inter-token latency in seconds.", TOKEN_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Time per output token in seconds: the same observations as "
            "inter_token_latency_seconds (vLLM's name for it before 0.11).",
            TOKEN_BUCKETS,
        )
        self.request_tpot = histogram(
            "request_time_per_output_token_seconds",
            "Mean time per output token after the first, per request, in seconds.",
            TOKEN_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency in seconds.", REQUEST_BUCKETS
        )
        self.registry.register(_EngineState(engine, model_name))
        self._series: dict[str, _Series] = {}

    def watch(self, adapter: str, arrived: float, sink: Callable[[Event], None]) -> Watch:
        """The `on_event` of a request for `adapter`, submitted at `arrived` (monotonic)."""
        return Watch(self, adapter_label(adapter), arrived, sink)

    def answered(self, adapter: str, status: int) -> None:
        """Count a generation request's HTTP answer (`adapter`: its label)."""
        self.requests.labels(self.model_name, adapter, str(status)).inc()

    def finished(self, adapter: str, reason: str) -> None:
        self.success.labels(self.model_name, adapter, reason).inc()

    def series(self, adapter: str) -> _Series:
        found = self._series.get(adapter)
        if found is None:  # two threads may both get here: labels() returns the same child
            key = (self.model_name, adapter)
            found = _Series(
                self.prompt_tokens.labels(*key),
                self.generation_tokens.labels(*key),
                self.ttft.labels(*key),
                (self.itl.labels(*key), self.tpot.labels(*key)),
                self.request_tpot.labels(*key),
                self.e2e.labels(*key),
            )
            self._series[adapter] = found
        return found

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format the scraper's Accept header asks for, and its type."""
        from prometheus_client.exposition import choose_encoder

        encode, content_type = choose_encoder(accept or "")
        return encode(_WithoutCreated(self.registry)), content_type


class Watch:
    """One generation request's metrics: the engine calls it with each event (on the scheduler
    thread), and it passes the event on to `sink` after recording it, so that an answer is
    never sent before its request is counted. The server calls `abort` when it drops the
    request (its client went away)."""

    def __init__(
        self, metrics: ServerMetrics, adapter: str, arrived: float, sink: Callable[[Event], None]
    ) -> None:
        self.metrics = metrics
        self.adapter = adapter
        self.arrived = arrived
        self.sink = sink
        self.series = metrics.series(adapter)
        self._prefilled = False
        self._first = self._last = 0.0  # times of the first and the last token
        self._tokens = 0
        self._ended = False
        self._end_lock = threading.Lock()  # the scheduler ends a request, the event loop aborts

    def __call__(self, event: Event) -> None:
        # an error may come before the prefill (an adapter that failed to load): no tokens then
        if event.error is None or self._prefilled:
            self._count_tokens(event)
        if event.error is not None:
            self._end("error")
        elif event.finish_reason is not None:
            self._end(event.finish_reason)
        self.sink(event)

    def abort(self) -> None:
        self._end("abort")

    def _count_tokens(self, event: Event) -> None:
        series, times = self.series, event.token_times
        if not self._prefilled:  # the prompt's prefill ended with this event's first token
            self._prefilled = True
            series.prompt_tokens.inc(event.prompt_tokens)
            # a first token that ended the request (end of text) is not in `times`: now
            self._first = self._last = times[0] if times else time.monotonic()
            series.ttft.observe(self._first - self.arrived)
            times = times[1:]
        for t in times:
            for histogram in series.inter_token:
                histogram.observe(t - self._last)
            self._last = t
        if event.token_times:
            series.generation_tokens.inc(len(event.token_times))
            self._tokens += len(event.token_times)

    def _end(self, reason: str) -> None:
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
        self.metrics.finished(self.adapter, reason)
        self.series.e2e.observe(time.monotonic() - self.arrived)
        if self._tokens > 1:
            self.series.request_tpot.observe((self._last - self._first) / (self._tokens - 1))


class _EngineState:
    """A collector of what the engine holds, read at each scrape."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        snap = self.engine.snapshot()
        pool = self.engine.adapters
        rows = len(snap.running)
        for name, doc, value in [
            ("num_requests_running", "Requests decoding, or prefilled in chunks.", rows),
            ("num_requests_waiting", "Requests waiting to be admitted.", snap.waiting_count),
            ("kv_cache_rows", "KV-cache rows in use: one per running request.", rows),
            (
                "kv_cache_usage_perc",
                "KV-cache usage, 1 = 100%: the running rows over --max-batch (at 1, new "
                "requests wait).",
                rows / snap.max_rows,
            ),
            (
                "num_adapters_resident",
                "Adapters in the model (at most --max-loras).",
                len(pool.resident),
            ),
        ]:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        yield self._lora_info(snap, pool.max_loras)
        yield from self._adapter_counters(pool)

    def _lora_info(self, snap: Snapshot, max_loras: int) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily(
            PREFIX + "lora_requests_info",
            "Running stats on LoRA requests: the adapters of the running and the waiting "
            "requests (comma-separated); the value is the time of the scrape.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        waiting, running = (_adapter_names(names) for names in (snap.waiting, snap.running))
        info.add_metric([str(max_loras), waiting, running], time.time())
        return info

    def _adapter_counters(self, pool: Any) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        for name, doc, counts in [
            ("adapter_loads", "Adapters installed into the model from their files.", pool.loads),
            (
                "adapter_evictions",
                "Adapters evicted (least recently used) to make room.",
                pool.evictions,
            ),
            (
                "adapter_cache_hits",
                "Requests whose adapter was in the model when they were first scheduled.",
                pool.hits,
            ),
            (
                "adapter_cache_misses",
                "Requests that waited for their adapter to be loaded.",
                pool.misses,
            ),
        ]:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", "adapter"])
            for adapter, n in sorted(dict(counts).items()):  # dict(): one copy, taken at once
                family.add_metric([self.model_name, adapter], n)
            yield family


def _adapter_names(adapters: tuple[str, ...]) -> str:
    return ",".join(dict.fromkeys(a for a in adapters if a != BASE_ADAPTER))


class _WithoutCreated:
    """The registry's metrics without their `_created` samples (creation times, which vLLM
    does not export either), without touching prometheus_client's process-wide switch."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
