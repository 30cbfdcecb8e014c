"""Prometheus metrics of one server, in their own registry (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every instrument the server updates; ``registry`` is what the HTTP endpoint serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "rnnserve_requests", "Calls (and streamed steps) by method, model and status code.",
            ["method", "model", "code"], registry=r,
        )  # fmt: skip
        self.step_latency = Histogram(
            "rnnserve_step_latency_seconds", "Time from a step's arrival to its result.",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_delay = Histogram(
            "rnnserve_queue_delay_seconds",
            "Time the oldest step of each batch waited in its queue (one sample per batch).",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "rnnserve_batch_size", "Sessions run together in one onnxruntime call.",
            ["model", "version"], buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_starts = Counter(
            "rnnserve_batch_starts",
            "Batches started, by why they started when they did: full (max_batch_size), "
            "cohort (every recently active session already had a step queued), delay "
            "(max_queue_delay_us ran out), immediate (no delay configured).",
            ["model", "version", "reason"], registry=r,
        )  # fmt: skip
        self.inference_time = Histogram(
            "rnnserve_inference_seconds",
            "Duration of one onnxruntime run: a batch of steps, or one Predict.",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.active_sessions = Gauge(
            "rnnserve_active_sessions",
            "Open sessions.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions_ended = Counter(
            "rnnserve_sessions_ended",
            "Sessions ended, by how: close, expire (idle timeout, resident or parked in the "
            "state store), evict.",
            ["model", "version", "reason"], registry=r,
        )  # fmt: skip
        # Read from the engine at each scrape (EngineGauges): queue_depth, model_info.
        self.engine_gauges = EngineGauges()
        r.register(self.engine_gauges)
        self.replica_info = Gauge(
            "rnnserve_replica_info",
            "1, labelled with this server's replica id: the id its state store records as the "
            "holder of its sessions (with --state-store).",
            ["replica"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        # Parking in a state store (--state-store): see parking.py.
        self.parked_sessions = Gauge(
            "rnnserve_parked_sessions",
            "Sessions this replica parked in the state store and has not taken back "
            "(nor seen expire there).",
            ["model", "version"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.parks = Counter(
            "rnnserve_parks", "Sessions parked, by trigger (idle, full, drain, release).",
            ["model", "version", "trigger"], registry=r,
        )  # fmt: skip
        self.unparks = Counter(
            "rnnserve_unparks", "Sessions taken back from the state store (parked or handed off).",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.call_backs = Counter(
            "rnnserve_session_call_backs",
            "Sessions asked back from the replica holding them (released, or timeout).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.park_latency = Histogram(
            "rnnserve_park_seconds", "Duration of one write of parked sessions to the store.",
            ["trigger"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.unpark_latency = Histogram(
            "rnnserve_unpark_seconds",
            "Time to bring one session back from the store (room made, taken, restored).",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.records_refused = Counter(
            "rnnserve_session_records_refused",
            "Saved sessions refused on restore, by source (snapshot, state_store) and reason "
            "(signature: missing or wrong; owner: not an identity this server authenticates).",
            ["source", "reason"], registry=r,
        )  # fmt: skip
        self.store_errors = Counter(
            "rnnserve_state_store_errors", "State store operations that failed, by operation.",
            ["operation"], registry=r,
        )  # fmt: skip


#: model_info's labels of one loaded version: model, version, device, provider, recurrent.
InfoLabels = tuple[str, str, str, str, str]
#: One batch queue's depth: model, version, steps queued.
Depth = tuple[str, str, int]


def _none() -> tuple[()]:
    return ()


class EngineGauges(Collector):
    """Gauges read from the engine when /metrics is scraped, instead of set as things change.

    - ``rnnserve_queue_depth{model,version}``: the steps in each version's batch queue now.
      Set at every enqueue and take, it would cost a lock (and, with several frontends, a
      write to a shared file) per call on the step path; read here it costs nothing there
      and is exact between batches.
    - ``rnnserve_model_info{...}`` = 1 per version loaded now: a version retired and
      released leaves at once. With several frontends a gauge lives in prometheus-client's
      multiprocess files, where a series, once written, can only be set to 0, never removed.

    The engine's process is the one that serves /metrics whatever the number of frontends
    (``serve_multiprocess`` registers this beside the multiprocess collector), so these are
    read where the engine is. The engine gives the readers (:meth:`watch`); they run on the
    metrics server's thread, so they read only what the engine replaces whole (its catalogue,
    its list of batchers) and queue lengths.
    """

    def __init__(self) -> None:
        self._versions: Callable[[], Iterable[InfoLabels]] = _none
        self._depths: Callable[[], Iterable[Depth]] = _none

    def watch(
        self, versions: Callable[[], Iterable[InfoLabels]], depths: Callable[[], Iterable[Depth]]
    ) -> None:
        self._versions, self._depths = versions, depths

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return _families()  # the names only: the registry need not read the engine for them

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info, depth = _families()
        for labels in self._versions():
            info.add_metric(labels, 1)
        for model, version, steps in self._depths():
            depth.add_metric((model, version), steps)
        yield depth
        yield info


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "rnnserve_model_info",
            "1 per loaded model version: the device it runs on (cuda or cpu), the session's "
            "first onnxruntime provider, and where its recurrent nodes run (a provider, mixed, "
            "or unknown; a peephole LSTM may run on the CPU in a CUDA session).",
            labels=("model", "version", "device", "provider", "recurrent_provider"),
        ),
        GaugeMetricFamily(
            "rnnserve_queue_depth",
            "Steps waiting in a model version's batch queue.",
            labels=("model", "version"),
        ),
    )
