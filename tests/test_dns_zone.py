"""Cluster DNS without root: the records the Kubernetes DNS specification asks for, whole answers as dig
would print them, and a server that answers garbage with an error or not at all, never a crash."""

from __future__ import annotations

from typing import Any

import pytest
from dnslib import EDNS0, DNSRecord
from hypothesis import given, settings, strategies as st

from kproxy.dns.metrics import DNSMetrics
from kproxy.dns.responder import Responder
from kproxy.dns.zone import Zone, ZoneConfig


def _svc(name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


SERVICES = [
    _svc("web", {"clusterIP": "10.96.0.11", "ports": [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}]}),
    _svc("db", {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432, "protocol": "TCP", "targetPort": "pg"}]}),
    _svc("empty", {"clusterIP": "None", "selector": {"app": "nothing"}}),
    _svc("search", {"type": "ExternalName", "externalName": "search.example.com"}),
]
SLICES = [{
    "metadata": {"name": "db-x1", "namespace": "default", "labels": {"kubernetes.io/service-name": "db"}},
    "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
    "endpoints": [{"addresses": ["10.244.2.5"], "conditions": {"ready": True}},
                  {"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "hostname": "db-0"},
                  {"addresses": ["10.244.2.6"], "conditions": {"ready": False, "serving": True, "terminating": True}}],
}]


def responder() -> Responder:
    return Responder(Zone.build(SERVICES, SLICES, ZoneConfig(dns_ip="10.96.0.10"), serial=3))


def ask(name: str, qtype: str, proto: str = "udp", edns: int = 0, responder_: Responder | None = None) -> str:
    """The answer as dig-like text, without the random ID."""
    query = DNSRecord.question(name, qtype)
    if edns:
        query.add_ar(EDNS0(udp_len=edns))
    reply = (responder_ or responder()).respond(bytes(query.pack()), proto)
    assert reply is not None and reply[:2] == bytes(query.pack())[:2]
    return "\n".join(line for line in str(DNSRecord.parse(reply)).splitlines()[1:])


def test_a_service_name_is_its_cluster_ip_in_any_case() -> None:
    assert ask("Web.Default.svc.cluster.local", "A") == """\
;; flags: qr aa rd; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 0
;; QUESTION SECTION:
;Web.Default.svc.cluster.local. IN      A
;; ANSWER SECTION:
Web.Default.svc.cluster.local. 5       IN      A       10.96.0.11"""


def test_srv_of_a_named_port_points_at_the_service_with_its_address() -> None:
    assert ask("_dns._udp.web.default.svc.cluster.local", "SRV") == """\
;; flags: qr aa rd; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1
;; QUESTION SECTION:
;_dns._udp.web.default.svc.cluster.local. IN      SRV
;; ANSWER SECTION:
_dns._udp.web.default.svc.cluster.local. 5       IN      SRV     0 100 53 web.default.svc.cluster.local.
;; ADDITIONAL SECTION:
web.default.svc.cluster.local. 5       IN      A       10.96.0.11"""


def test_a_headless_service_is_its_ready_endpoints_each_with_a_name_and_a_ptr() -> None:
    assert ask("db.default.svc.cluster.local", "A").endswith("""\
;; ANSWER SECTION:
db.default.svc.cluster.local. 5       IN      A       10.244.1.5
db.default.svc.cluster.local. 5       IN      A       10.244.2.5""")
    assert ask("_pg._tcp.db.default.svc.cluster.local", "SRV").endswith("""\
;; ANSWER SECTION:
_pg._tcp.db.default.svc.cluster.local. 5       IN      SRV     0 50 15432 db-0.db.default.svc.cluster.local.
_pg._tcp.db.default.svc.cluster.local. 5       IN      SRV     0 50 15432 10-244-2-5.db.default.svc.cluster.local.
;; ADDITIONAL SECTION:
db-0.db.default.svc.cluster.local. 5       IN      A       10.244.1.5
10-244-2-5.db.default.svc.cluster.local. 5       IN      A       10.244.2.5""")
    assert ask("db-0.db.default.svc.cluster.local", "A").endswith(
        "db-0.db.default.svc.cluster.local. 5       IN      A       10.244.1.5")
    assert ask("5.1.244.10.in-addr.arpa", "PTR").endswith(
        "5.1.244.10.in-addr.arpa. 5       IN      PTR     db-0.db.default.svc.cluster.local.")
    assert "status: REFUSED" in _header("6.2.244.10.in-addr.arpa", "PTR")  # not ready: no record


def _header(name: str, qtype: str) -> str:
    query = DNSRecord.question(name, qtype)
    reply = responder().respond(bytes(query.pack()), "udp")
    assert reply is not None
    return str(DNSRecord.parse(reply)).splitlines()[0]


SOA = "cluster.local.          5       IN      SOA     ns.dns.cluster.local. hostmaster.cluster.local. 3 7200 1800 86400 5"


@pytest.mark.parametrize(("name", "qtype", "status"), [
    ("nope.default.svc.cluster.local", "A", "NXDOMAIN"),
    ("empty.default.svc.cluster.local", "A", "NXDOMAIN"),  # headless without ready endpoints
    ("web.default.svc.cluster.local", "AAAA", "NOERROR"),  # the name exists: NODATA
    ("default.svc.cluster.local", "A", "NOERROR"),  # a name above records exists too
])
def test_negative_answers_carry_the_soa(name: str, qtype: str, status: str) -> None:
    assert f"status: {status}" in _header(name, qtype)
    lines = ask(name, qtype).splitlines()
    assert lines[0] == ";; flags: qr aa rd; QUERY: 1, ANSWER: 0, AUTHORITY: 1, ADDITIONAL: 0"
    assert lines[3:] == [";; AUTHORITY SECTION:", SOA]


@pytest.mark.parametrize(("name", "qtype", "answer"), [
    ("search.default.svc.cluster.local", "A", "search.default.svc.cluster.local. 5       IN      CNAME   search.example.com."),
    ("11.0.96.10.in-addr.arpa", "PTR", "11.0.96.10.in-addr.arpa. 5       IN      PTR     web.default.svc.cluster.local."),
    ("dns-version.cluster.local", "TXT", 'dns-version.cluster.local. 5       IN      TXT     "1.1.0"'),
    ("10-244-1-9.default.pod.cluster.local", "A", "10-244-1-9.default.pod.cluster.local. 5       IN      A       10.244.1.9"),
    ("cluster.local", "NS", "cluster.local.          5       IN      NS      ns.dns.cluster.local."),
    ("ns.dns.cluster.local", "A", "ns.dns.cluster.local.   5       IN      A       10.96.0.10"),
])
def test_one_record_answers(name: str, qtype: str, answer: str) -> None:
    text = ask(name, qtype)
    assert "ANSWER: 1," in text and text.endswith(answer), text


def test_names_outside_the_cluster_are_refused_at_once() -> None:
    assert ask("example.com", "A") == """\
;; flags: qr rd; QUERY: 1, ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 0
;; QUESTION SECTION:
;example.com.                   IN      A"""


def test_edns_is_answered_and_a_large_udp_answer_is_truncated_for_tcp() -> None:
    endpoints = [{"addresses": [f"10.244.1.{i}"], "conditions": {"ready": True}} for i in range(1, 101)]
    big = Responder(Zone.build([SERVICES[1]], [SLICES[0] | {"endpoints": endpoints}], ZoneConfig()))
    assert ask("db.default.svc.cluster.local", "A", "udp", responder_=big).startswith(
        ";; flags: qr aa tc rd; QUERY: 1, ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 0")
    assert ask("db.default.svc.cluster.local", "A", "udp", edns=4096, responder_=big).startswith(  # at most 1232
        ";; flags: qr aa tc rd; QUERY: 1, ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 1")
    assert "ANSWER: 100, AUTHORITY: 0, ADDITIONAL: 0" in ask("db.default.svc.cluster.local", "A", "tcp", responder_=big)
    assert "ADDITIONAL: 1" in ask("web.default.svc.cluster.local", "A", edns=1232)  # our OPT


def test_a_new_zone_is_served_at_once() -> None:
    r = responder()
    assert "ANSWER: 1," in ask("web.default.svc.cluster.local", "A", responder_=r)
    r.set_zone(Zone.build([], [], ZoneConfig()))
    assert "status: NXDOMAIN" in str(DNSRecord.parse(r.respond(bytes(DNSRecord.question(
        "web.default.svc.cluster.local").pack()), "udp") or b""))


def test_errors_keep_the_id_and_name_the_problem() -> None:
    r = responder()
    assert r.respond(b"\x12\x34\x01", "udp") is None  # shorter than a header
    answer = DNSRecord.question("web.default.svc.cluster.local")
    answer.header.qr = 1
    assert r.respond(bytes(answer.pack()), "udp") is None  # a response is never answered
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0"  # a name pointing nowhere
    assert r.respond(garbage, "udp") == b"\xab\xcd\x81\x01" + bytes(8)  # FORMERR
    notify = DNSRecord.question("cluster.local")
    notify.header.opcode = 4
    reply = r.respond(bytes(notify.pack()), "udp")
    assert reply is not None and DNSRecord.parse(reply).header.rcode == 4  # NOTIMP


def test_metrics_count_what_was_answered() -> None:
    metrics = DNSMetrics("test")
    r = Responder(Zone.build(SERVICES, SLICES, ZoneConfig()), metrics)
    for name in ("web.default.svc.cluster.local", "web.default.svc.cluster.local", "example.com"):
        r.respond(bytes(DNSRecord.question(name).pack()), "udp")
    sample = metrics.registry.get_sample_value
    labels = {"server": "dns://:53", "view": ""}
    assert sample("coredns_dns_requests_total", labels | {"zone": "cluster.local.", "proto": "udp", "family": "1",
                                                          "type": "A"}) == 2
    assert sample("coredns_dns_responses_total", labels | {"zone": ".", "rcode": "REFUSED", "plugin": ""}) == 1
    assert sample("coredns_dns_request_duration_seconds_count", labels | {"zone": "cluster.local.", "type": "A"}) == 2


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_get_an_error_answer_or_none(data: bytes) -> None:
    reply = responder().respond(data, "udp")
    assert reply is None or (reply[:2] == data[:2] and reply[2] & 0x80)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.sampled_from(["A", "AAAA", "SRV", "PTR", "TXT", "ANY", "MX"]))
def test_mangled_questions_never_crash_it(tail: bytes, qtype: str) -> None:
    query = bytes(DNSRecord.question("web.default.svc.cluster.local", qtype).pack())
    reply = responder().respond(query[:12 + len(tail) % 40] + tail, "udp")
    assert reply is None or reply[2] & 0x80
