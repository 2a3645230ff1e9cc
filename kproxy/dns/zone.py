"""The cluster's DNS records, as the Kubernetes DNS specification defines them: a pure index.

    zone = Zone.build(services, slices, ZoneConfig("cluster.local", dns_ip="10.96.0.10"), serial=7)
    zone.lookup("web.default.svc.cluster.local", QTYPE.A)   # -> Lookup(rcode=NOERROR, answers=[...])

Records (kubernetes/dns docs/specification.md, schema 1.1.0, and CoreDNS's
`kubernetes` plugin where the specification leaves a choice):

- `<svc>.<ns>.svc.<zone>` A: the ClusterIP; for a headless Service one A per
  ready endpoint, NXDOMAIN while it has none (CoreDNS's answer; the
  specification allows an empty NOERROR too);
- `<hostname>.<svc>.<ns>.svc.<zone>` A for each ready endpoint of a headless
  Service: its `hostname`, else its address with dashes (CoreDNS's name);
- `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV for named ports (to the
  Service's name, or to each endpoint's name when headless), targets' A in
  the additional section;
- PTR for ClusterIPs and ready headless endpoint addresses;
- `<svc>.<ns>.svc.<zone>` CNAME for an ExternalName Service (never chased:
  the lab has no upstream);
- `<a-b-c-d>.<ns>.pod.<zone>` A (CoreDNS's `pods insecure`, kubeadm's setting);
- `dns-version.<zone>` TXT "1.1.0", the apex SOA and NS.

A name in the zone that does not exist is NXDOMAIN; one that exists without
the asked type (an AAAA of a Service, `default.svc.cluster.local`) is NODATA:
NOERROR and no answer. Both carry the SOA, whose minimum TTL (5 s) caches the
negative answer. Names outside the zone, and PTRs of unknown addresses, are
REFUSED: the lab has no upstream to forward them to.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from dnslib import CNAME, NS, PTR, QTYPE, RCODE, RR, SOA, SRV, TXT, A, RD

SCHEMA_VERSION = "1.1.0"
TTL = 5  # CoreDNS's default for every record and for negative answers
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_POD_NAME = re.compile(r"^(\d{1,3})-(\d{1,3})-(\d{1,3})-(\d{1,3})\.[a-z0-9-]+\.pod\.")


@dataclass(frozen=True)
class ZoneConfig:
    domain: str = "cluster.local"
    dns_ip: str = ""  # kube-dns's ClusterIP: the A of the apex NS (ns.dns.<zone>)


@dataclass
class Lookup:
    rcode: int
    answers: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    authoritative: bool = True
    zone: str = "."  # the zone that answered (the metrics' label): "<domain>." or "."


def reverse_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


@dataclass(frozen=True, order=True)
class _Endpoint:
    address: ipaddress.IPv4Address
    hostname: str
    ports: tuple[tuple[str, str, int], ...]  # its slice's (name, protocol, port)


def _ready_endpoints(slices: Iterable[dict[str, Any]]) -> list[_Endpoint]:
    """Each ready endpoint once, in address order: its name is its hostname, else its address with dashes."""
    out = set()
    for slice_ in slices:
        ports = tuple((p.get("name") or "", p.get("protocol", "TCP"), int(p["port"])) for p in slice_.get("ports") or [])
        for endpoint in slice_.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready"):
                for address in endpoint["addresses"]:
                    out.add(_Endpoint(ipaddress.IPv4Address(address),
                                      endpoint.get("hostname") or address.replace(".", "-"), ports))
    return sorted(out)


class Zone:
    """Every name of the zone with its records; lookups never change it (a new store version builds a new one)."""

    def __init__(self, config: ZoneConfig, serial: int) -> None:
        self.config = config
        self.domain = config.domain.strip(".").lower()
        self.records: dict[str, dict[int, list[RD]]] = {}
        self.names: set[str] = {self.domain}  # every owner name and every name above one (empty non-terminals)
        self.headless_without_endpoints: set[str] = set()
        soa = SOA(f"ns.dns.{self.domain}", f"hostmaster.{self.domain}", (serial, 7200, 1800, 86400, TTL))
        self.soa = RR(self.domain, QTYPE.SOA, ttl=TTL, rdata=soa)
        self._add(self.domain, QTYPE.SOA, soa)
        self._add(f"dns-version.{self.domain}", QTYPE.TXT, TXT(SCHEMA_VERSION))
        self._add(self.domain, QTYPE.NS, NS(f"ns.dns.{self.domain}"))
        if config.dns_ip:
            self._add(f"ns.dns.{self.domain}", QTYPE.A, A(config.dns_ip))

    @classmethod
    def build(cls, services: Iterable[dict[str, Any]], slices: Iterable[dict[str, Any]],
              config: ZoneConfig, serial: int = 0) -> Zone:
        zone = cls(config, serial)
        by_service: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for slice_ in slices:
            owner = (slice_.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
            if owner:
                by_service.setdefault((slice_["metadata"]["namespace"], owner), []).append(slice_)
        for service in services:
            meta = service["metadata"]
            zone._add_service(service, by_service.get((meta["namespace"], meta["name"]), []))
        return zone

    def _add(self, name: str, qtype: int, rdata: RD) -> None:
        self.records.setdefault(name, {}).setdefault(qtype, []).append(rdata)
        while name not in self.names:
            self.names.add(name)
            if "." not in name:
                break
            name = name.split(".", 1)[1]

    def _add_service(self, service: dict[str, Any], slices: list[dict[str, Any]]) -> None:
        meta, spec = service["metadata"], service["spec"]
        base = f"{meta['name']}.{meta['namespace']}.svc.{self.domain}"
        if spec.get("type") == "ExternalName":
            self._add(base, QTYPE.CNAME, CNAME(spec["externalName"]))
            return
        named = [p for p in spec.get("ports") or [] if p.get("name")]
        if spec.get("clusterIP") != "None":
            self._add(base, QTYPE.A, A(spec["clusterIP"]))
            self._add(reverse_name(spec["clusterIP"]), QTYPE.PTR, PTR(base))
            for port in named:
                self._add(f"_{port['name']}._{port['protocol'].lower()}.{base}", QTYPE.SRV,
                          SRV(0, 100, int(port["port"]), base))
            return
        endpoints = _ready_endpoints(slices)
        if not endpoints:
            self.names.add(base)
            self.headless_without_endpoints.add(base)
            return
        for endpoint in endpoints:
            address, name = str(endpoint.address), f"{endpoint.hostname}.{base}"
            self._add(base, QTYPE.A, A(address))
            self._add(name, QTYPE.A, A(address))
            self._add(reverse_name(address), QTYPE.PTR, PTR(name))
        weight = max(1, 100 // len(endpoints))  # CoreDNS: the weight shared out among the targets
        for port in named:
            srv = f"_{port['name']}._{port['protocol'].lower()}.{base}"
            for endpoint in endpoints:
                number = next((n for pname, proto, n in endpoint.ports
                               if (pname, proto) == (port["name"], port["protocol"])), int(port["port"]))
                self._add(srv, QTYPE.SRV, SRV(0, weight, number, f"{endpoint.hostname}.{base}"))

    def in_zone(self, name: str) -> bool:
        return name == self.domain or name.endswith("." + self.domain)

    def lookup(self, qname: str, qtype: int) -> Lookup:
        """The answer to one question; qname as asked (its case is kept in the answer's names)."""
        name = qname.rstrip(".").lower()
        if not self.in_zone(name):
            records = self.records.get(name) if name.endswith(".in-addr.arpa") else None
            if records is None:
                return Lookup(RCODE.REFUSED, authoritative=False)
            return self._answer(qname, records, qtype, ".")
        zone = self.domain + "."
        records = self.records.get(name)
        if records is None:
            pod = _POD_NAME.match(name + ".")
            if pod and name.endswith(f".pod.{self.domain}") and all(int(octet) < 256 for octet in pod.groups()):
                records = {QTYPE.A: [A(".".join(pod.groups()))]}
            elif name in self.headless_without_endpoints or name not in self.names:
                return Lookup(RCODE.NXDOMAIN, authority=[self.soa], zone=zone)
            else:
                return Lookup(RCODE.NOERROR, authority=[self.soa], zone=zone)
        return self._answer(qname, records, qtype, zone)

    def _answer(self, qname: str, records: dict[int, list[RD]], qtype: int, zone: str) -> Lookup:
        if QTYPE.CNAME in records:  # an alias answers every type with itself
            wanted = [(QTYPE.CNAME, rd) for rd in records[QTYPE.CNAME]]
        elif qtype == QTYPE.ANY:
            wanted = [(t, rd) for t, rds in sorted(records.items()) for rd in rds]
        else:
            wanted = [(qtype, rd) for rd in records.get(qtype, [])]
        if not wanted:
            return Lookup(RCODE.NOERROR, authority=[self.soa] if zone != "." else [], zone=zone)
        lookup = Lookup(RCODE.NOERROR, [RR(qname, t, ttl=TTL, rdata=rd) for t, rd in wanted], zone=zone)
        if qtype == QTYPE.SRV:
            targets = dict.fromkeys(str(rd.target).rstrip(".") for _, rd in wanted)
            lookup.additional = [RR(target, QTYPE.A, ttl=TTL, rdata=rd)
                                 for target in targets for rd in self.records.get(target, {}).get(QTYPE.A, [])]
        return lookup

