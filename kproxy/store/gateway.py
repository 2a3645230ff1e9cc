"""etcd 3.4's JSON gateway (POST /v3/kv/..., /v3/watch), over requests: what the etcd store needs.

Why the gateway over requests (the evaluation is in docs/store.md): etcd3gw's watch blocks
silently on a compacted revision and on an etcd restart; etcd3 (grpc) has had no release since
2020 and does not import with today's protobuf. The gateway's wire format is small: keys and
values in base64, int64s as strings, and fields at their default left out (a PUT event has no
"type", a failed txn no "succeeded").

Errors are one line. Where etcd cannot be reached, EtcdUnavailable says so; a write that failed
that way may still have been applied (etcd answers 503 while it shuts down), so a caller reads
again before it retries.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import requests

from cni.netns import NamespaceMissing, entered
from kproxy.errors import KproxyError

TIMEOUT = 10.0  # seconds for one request; a watch's read timeout is its own


class EtcdError(KproxyError):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached, or went away mid-request."""


class Compacted(EtcdError):
    """A watch asked for history etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd has compacted its history up to revision {compact_revision}")
        self.compact_revision = compact_revision


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The range end of every key that starts with prefix (its last byte plus one), as etcdctl --prefix."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # our prefixes end in "/", never in 0xff
    return raw.decode()


def put(key: str, value: str) -> dict[str, Any]:
    return {"request_put": {"key": b64(key), "value": b64(value)}}


def modified_at(key: str, revision: int) -> dict[str, Any]:
    """A txn comparison: key was last written at revision (0: key absent)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def delete(key: str, end: str | None = None) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key), **({"range_end": b64(end)} if end else {})}}


def range_of(key: str, end: str | None = None) -> dict[str, Any]:
    return {"request_range": {"key": b64(key), **({"range_end": b64(end)} if end else {})}}


@dataclass(frozen=True)
class Entry:
    """One key as etcd holds it (or, in a watch, as an event left it: value None when deleted)."""

    key: str
    value: bytes | None
    mod_revision: int


def entry(kv: dict[str, Any], deleted: bool = False) -> Entry:
    """A key-value as the gateway spells it (base64, revisions as strings, defaults left out)."""
    return Entry(unb64(kv["key"]).decode(), None if deleted else unb64(kv.get("value", "")),
                 int(kv.get("mod_revision", 0)))


def entries(kvs: list[dict[str, Any]]) -> list[Entry]:
    return [entry(kv) for kv in kvs]


class Gateway:
    """One etcd endpoint ("http://IP:PORT"); kept-alive connections, each opened from the network
    namespace at netns (None: this thread's)."""

    def __init__(self, endpoint: str, netns: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.netns = netns
        self.session = requests.Session()

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            with entered(self.netns):
                answer = self.session.post(f"{self.endpoint}/v3/{path}", json=body, timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise EtcdUnavailable(f"etcd at {self.endpoint} is unreachable: {_reason(exc)}") from None
        except NamespaceMissing as exc:
            raise EtcdUnavailable(f"etcd at {self.endpoint} is unreachable: {exc.strerror}") from None
        if answer.status_code != 200:
            raise _error(self.endpoint, answer)
        return answer.json()

    def txn(self, operations: list[dict[str, Any]], compare: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The operations, all at once or none: one revision; with compare, only if every
        comparison holds (the answer's "succeeded" says whether they did)."""
        return self.call("kv/txn", {"compare": compare or [], "success": operations})

    def compact(self, revision: int) -> None:
        self.call("kv/compaction", {"revision": str(revision), "physical": True})

    def watch(self, key: str, range_end: str, start_revision: int, read_timeout: float,
              created: threading.Event | None = None) -> Iterator[tuple[int, list[Entry]]]:
        """Every change of the keys from key to range_end (not included) from start_revision on:
        (revision, entries changed there), all of one revision in one answer. Raises Compacted, or
        EtcdUnavailable when the stream breaks (or is silent for read_timeout): the caller resumes
        from the revision after the last it saw. created is set once etcd has made the watch."""
        body = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                                   "start_revision": str(start_revision), "progress_notify": True}}
        try:
            with entered(self.netns), self.session.post(f"{self.endpoint}/v3/watch", json=body, stream=True,
                                                        timeout=(TIMEOUT, read_timeout)) as answer:
                if answer.status_code != 200:
                    raise _error(self.endpoint, answer)
                for line in _lines(answer):
                    message = json.loads(line)
                    if "error" in message:  # etcd shutting down: the gateway's last line
                        raise EtcdUnavailable(f"etcd at {self.endpoint} ended the watch: "
                                              f"{message['error'].get('message', message['error'])}")
                    result = message.get("result", {})
                    if "compact_revision" in result and int(result["compact_revision"]):
                        raise Compacted(int(result["compact_revision"]))
                    if result.get("created") and created is not None:
                        created.set()
                    events = result.get("events", [])
                    if events:
                        changed = [entry(e["kv"], deleted=e.get("type") == "DELETE") for e in events]
                        yield changed[-1].mod_revision, changed
        except requests.RequestException as exc:
            raise EtcdUnavailable(f"etcd at {self.endpoint}: the watch broke: {_reason(exc)}") from None
        except NamespaceMissing as exc:
            raise EtcdUnavailable(f"etcd at {self.endpoint} is unreachable: {exc.strerror}") from None
        raise EtcdUnavailable(f"etcd at {self.endpoint} closed the watch")


def _lines(answer: requests.Response) -> Iterator[bytes]:
    """The stream's lines as they complete. Not iter_lines: it joins a line's pieces one 512-byte chunk
    at a time, quadratic in a watch answer of one big apply (10k Services: ~4 MB on one line)."""
    buffer = bytearray()
    scanned = 0
    for chunk in answer.iter_content(chunk_size=None):
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", max(start, scanned))) >= 0:
            if end > start:
                yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        scanned = len(buffer)


def _reason(exc: requests.RequestException) -> str:
    """The innermost cause, e.g. "[Errno 111] Connection refused", not urllib3's retry story."""
    cause: BaseException = exc
    while cause.__context__ is not None or cause.__cause__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause)
    return text.split(": ", 1)[-1] if "Connection" in type(cause).__name__ else text


def _error(endpoint: str, answer: requests.Response) -> EtcdError:
    try:
        message = answer.json().get("message") or answer.text
    except ValueError:
        message = answer.text
    message = message.strip() or f"HTTP {answer.status_code}"
    if answer.status_code in (408, 503):  # the gateway's words while etcd shuts down
        return EtcdUnavailable(f"etcd at {endpoint} is going away: {message}")
    return EtcdError(f"etcd at {endpoint} refused: {message}")
