"""etcd's JSON gateway, the parts that need no etcd: keys, ranges, and a watch stream's lines."""

from __future__ import annotations

from typing import Iterator

from kproxy.store.gateway import _lines, b64, entries, prefix_end


class Streamed:
    """A streamed answer that arrives in the given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def iter_content(self, chunk_size: int | None = None) -> Iterator[bytes]:
        return iter(self.pieces)


def test_lines_come_whole_however_the_stream_is_cut() -> None:
    big = b'{"result":{"events":[' + b"x" * 100_000 + b"]}}"
    pieces = [b'{"a":1}\n{"b"', b":2}\n\n", big[:7], big[7:60_000], big[60_000:] + b"\n{\"c\":3}", b"\n"]
    assert list(_lines(Streamed(pieces))) == [b'{"a":1}', b'{"b":2}', big, b'{"c":3}']  # type: ignore[arg-type]


def test_a_prefix_range_ends_where_the_prefix_does() -> None:
    assert prefix_end("/kproxy/lab/") == "/kproxy/lab0"


def test_entries_read_the_gateways_base64_and_string_revisions() -> None:
    kvs = [{"key": b64("/kproxy/lab/version"), "value": b64("2"), "mod_revision": "17"}]
    assert [(e.key, e.value, e.mod_revision) for e in entries(kvs)] == [("/kproxy/lab/version", b"2", 17)]
