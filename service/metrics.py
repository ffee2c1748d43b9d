"""Prometheus metrics of the gateway, in a registry per app (tests build many apps)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ctrserve.feature_store.cache import register_metrics

# request latency: sub-millisecond to the default 1 s deadline and beyond
_LATENCY = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
            0.5, 1.0, 2.5)
_QUEUE_WAIT = (0.00001, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
STAGES = ("route", "feature_fetch", "assembly", "inference")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctrserve_requests_total", "HTTP requests by route, arm and status code",
                                ["route", "arm", "status"], registry=r)
        self.latency = Histogram("ctrserve_request_seconds", "Request latency by route, arm and status code",
                                 ["route", "arm", "status"], buckets=_LATENCY, registry=r)
        self.stage = Histogram("ctrserve_stage_seconds", "Time per scoring stage (route, feature_fetch, assembly, "
                               "inference) by arm", ["stage", "arm"], buckets=_LATENCY, registry=r)
        self.candidates = Histogram("ctrserve_candidates", "Candidates per scoring request",
                                    buckets=(1, 10, 50, 100, 200, 500, 1000, 2000, 5000), registry=r)
        # cross-request batching (service/backends/batching.py): per scored request, the call it rode in
        self.batch_requests = Histogram("ctrserve_batch_requests", "Requests in the inference call that scored a "
                                        "request (batching backends only), by arm", ["arm"],
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.queue_wait = Histogram("ctrserve_queue_wait_seconds", "A request's wait in the batching queue before "
                                    "its inference call started, by arm", ["arm"], buckets=_QUEUE_WAIT, registry=r)
        self.batch_calls = Counter("ctrserve_batch_calls", "Inference calls of the batching backend, by arm: each "
                                   "request adds 1 / the requests in its call, so calls shared by arms split "
                                   "between them (mean batch = requests / calls)", ["arm"], registry=r)
        self.backend_errors = Counter("ctrserve_backend_errors_total", "Failed inference calls by model, version "
                                      "and kind (timeout, unavailable, error)", ["model", "version", "kind"],
                                      registry=r)
        self.store_errors = Counter("ctrserve_store_errors_total", "Failed feature-store reads by error class",
                                    ["error"], registry=r)
        self.degraded = Counter("ctrserve_degraded_total", "Requests scored with cold-start features because the "
                                "store failed", registry=r)
        self.store_lookups = Counter("ctrserve_store_lookups_total", "Feature-store lookups by kind (user, item) "
                                     "and result (hit, miss)", ["kind", "result"], registry=r)
        self.item_cache = Counter("ctrserve_item_cache_total", "In-process item cache lookups by result (hit, miss); "
                                  "hit rate = hit / (hit + miss)", ["result"], registry=r)
        self.reloads = Counter("ctrserve_routing_reloads_total", "Routing config reloads by source and result",
                               ["source", "result"], registry=r)
        self.routing_info = Gauge("ctrserve_routing_config_info", "The routing config in effect (value 1)",
                                  ["digest"], registry=r)
        self.models_ready = Gauge("ctrserve_models_ready", "Model versions loaded and warmed up", registry=r)
        self.model_provider = Gauge("ctrserve_model_provider_info", "Where each loaded model version computes "
                                    "(value 1): provider cpu or cuda (embedded ONNX Runtime) or triton",
                                    ["model", "version", "provider"], registry=r)
        self.in_flight = Gauge("ctrserve_requests_in_flight", "Scoring requests being processed", registry=r)
        # the closed loop (service/events.py): this process's log writer and events, and the
        # outcomes every replica shares (read from Redis when /metrics is scraped)
        self.impressions_logged = Counter("ctrserve_impressions_logged_total", "Scored requests written to the "
                                          "impression log", registry=r)
        self.impressions_dropped = Counter("ctrserve_impressions_dropped_total", "Scored requests the impression "
                                           "log dropped (queue full or Redis down)", registry=r)
        self.log_flush = Histogram("ctrserve_impression_log_flush_seconds", "One pipelined write of the impression "
                                   "log", buckets=_LATENCY, registry=r)
        self.events = Counter("ctrserve_events_total", "Events received by this process, by result (accepted, "
                              "duplicate, unknown_request, unknown_item)", ["result"], registry=r)
        self.ab_outcome = Gauge("ctrserve_ab_outcome", "Outcomes per arm kept in Redis (all replicas): impressions, "
                                "clicks, ctr, mean_predicted, auc", ["experiment", "arm", "figure"], registry=r)
        self.ab_events = Gauge("ctrserve_ab_events", "Events recorded in Redis (all replicas) by result",
                               ["result"], registry=r)
        # the feature store's process-wide item-cache metrics, so that /metrics shows them too
        register_metrics(r)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels()`` checks and locks on every call, a
        dozen times per scoring request. Only for metrics that are never ``clear()``-ed (not
        ``routing_info``), whose label values come from small sets (routes, arms, codes, stages)."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c
