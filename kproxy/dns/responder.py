"""One DNS message in, one out: parsing and packing with dnslib, answers from the Zone, a response cache.

    responder = Responder(zone, metrics)
    reply = responder.respond(datagram, "udp")   # bytes to send back, or None to drop

What comes back for what (RFC 1035, RFC 6891):
- shorter than a header, or a response (QR set): dropped, nothing to answer;
- not parseable: FORMERR echoing the ID; not exactly one question: FORMERR;
- an opcode other than QUERY, a class other than IN: NOTIMP;
- a question: the Zone's answer, authoritative inside the cluster domain,
  never recursion available (the lab has no upstream);
- EDNS (an OPT record) is answered with an OPT of our own; a UDP answer larger
  than the client's buffer (512 without EDNS, at most 1232) is sent truncated
  (TC, no records) so the client asks again over TCP.

The cache maps a query's bytes after its ID to the answer's bytes after its ID:
the same question (same name case, flags and EDNS) has the same answer until
the zone changes, which empties it. It is what makes a Python server fast
enough for a cluster's query rates; a miss costs dnslib's parse and pack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dnslib import CLASS, EDNS0, OPCODE, QTYPE, RCODE, DNSHeader, DNSRecord

from kproxy.dns.metrics import DNSMetrics
from kproxy.dns.zone import Zone

HEADER = 12
QR = 0x80  # in the third byte of the header
MAX_UDP = 1232  # the flag-day-2020 EDNS buffer size
PLAIN_UDP = 512
CACHE_LIMIT = 20_000  # answers kept; the cache starts over when full


@dataclass(frozen=True)
class _Cached:
    body: bytes  # the answer after its ID
    qtype: str
    rcode: str
    zone: str


class Responder:
    def __init__(self, zone: Zone, metrics: DNSMetrics | None = None) -> None:
        self.zone = zone
        self.metrics = metrics
        self._cache: dict[tuple[str, bytes], _Cached] = {}

    def set_zone(self, zone: Zone) -> None:
        self.zone = zone
        self._cache.clear()

    def respond(self, data: bytes, proto: str) -> bytes | None:
        started = time.perf_counter()
        if len(data) < HEADER or data[2] & QR:
            return None
        key = (proto, data[2:])
        hit = self._cache.get(key)
        if hit is None:
            hit = self._answer(data, proto)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = hit
        if self.metrics is not None:
            self.metrics.observe(hit.zone, proto, hit.qtype, hit.rcode, time.perf_counter() - started)
        return data[:2] + hit.body

    def _answer(self, data: bytes, proto: str) -> _Cached:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError, but also struct, index and decode errors on garbage
            return _Cached(_error(data, RCODE.FORMERR), "other", "FORMERR", ".")
        header = request.header
        if header.opcode != OPCODE.QUERY:
            return _Cached(_error(data, RCODE.NOTIMP), "other", "NOTIMP", ".")
        if len(request.questions) != 1:
            return _Cached(_error(data, RCODE.FORMERR), "other", "FORMERR", ".")
        question = request.q
        qtype = QTYPE.get(question.qtype)
        if question.qclass != CLASS.IN:
            return _Cached(_error(data, RCODE.NOTIMP), str(qtype), "NOTIMP", ".")
        lookup = self.zone.lookup(str(question.qname), question.qtype)
        reply = DNSRecord(DNSHeader(id=header.id, qr=1, opcode=OPCODE.QUERY, aa=int(lookup.authoritative),
                                    rd=header.rd, ra=0, rcode=lookup.rcode), q=question)
        reply.rr, reply.auth, reply.ar = list(lookup.answers), list(lookup.authority), list(lookup.additional)
        opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
        if opt is not None:
            reply.add_ar(EDNS0(udp_len=MAX_UDP))
        packed = reply.pack()
        limit = max(PLAIN_UDP, min(int(opt.rclass), MAX_UDP)) if opt is not None else PLAIN_UDP
        if proto == "udp" and len(packed) > limit:
            reply.rr, reply.auth = [], []
            reply.ar = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
            reply.header.tc = 1
            packed = reply.pack()
        return _Cached(bytes(packed[2:]), str(qtype), RCODE.get(lookup.rcode), lookup.zone)


def _error(data: bytes, rcode: int) -> bytes:
    """A header-only error answer after the ID: QR set, the query's opcode and RD kept, no records."""
    flags = (data[2] & 0x79) | QR  # opcode and RD of the query
    return bytes([flags, rcode & 0x0F]) + bytes(8)
