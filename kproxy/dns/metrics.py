"""The DNS server's Prometheus metrics, named and labelled as CoreDNS's (its `prometheus` plugin, :9153).

- coredns_dns_requests_total{server, zone, view, proto, family, type}
- coredns_dns_responses_total{server, zone, view, rcode, plugin}
- coredns_dns_request_duration_seconds{server, zone, view, type} (CoreDNS's buckets)
- coredns_build_info{version, revision, goversion} stands for the server's version.

`type` is the query type for the types CoreDNS counts by name, "other" for the
rest; `zone` is the zone that answered ("cluster.local." or "."). Label
children are kept per label tuple: a counted query costs a dict lookup and an
increment, not a label resolution.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SERVER = "dns://:53"
COUNTED_TYPES = frozenset({"A", "AAAA", "NS", "PTR", "SOA", "CNAME", "MX", "TXT", "SRV", "NAPTR", "DS",
                           "DNSKEY", "RRSIG", "NSEC", "NSEC3", "HINFO", "IXFR", "AXFR", "ANY"})
# CoreDNS's plugin.TimeBuckets: from 0.25 ms, doubling, 16 buckets
BUCKETS = tuple(0.00025 * 2 ** i for i in range(16))


class DNSMetrics:
    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter("coredns_dns_requests_total", "Counter of DNS requests made per zone, protocol and family.",
                                 ["server", "zone", "view", "proto", "family", "type"], registry=self.registry)
        self._responses = Counter("coredns_dns_responses_total", "Counter of response status codes.",
                                  ["server", "zone", "view", "rcode", "plugin"], registry=self.registry)
        self._duration = Histogram("coredns_dns_request_duration_seconds",
                                   "Histogram of the time (in seconds) each request took per zone.",
                                   ["server", "zone", "view", "type"], buckets=BUCKETS, registry=self.registry)
        Gauge("coredns_build_info", "A metric with a constant '1' value labeled by version, revision, and goversion "
              "from which CoreDNS was built.", ["version", "revision", "goversion"],
              registry=self.registry).labels(version, "kproxy", "python").set(1)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, zone: str, proto: str, qtype: str, rcode: str, seconds: float) -> None:
        qtype = qtype if qtype in COUNTED_TYPES else "other"
        self._child(self._requests, SERVER, zone, "", proto, "1", qtype).inc()
        self._child(self._responses, SERVER, zone, "", rcode, "kubernetes" if zone != "." else "").inc()
        self._child(self._duration, SERVER, zone, "", qtype).observe(seconds)
