"""Reading the text files a user hands kproxy (manifests, topologies): UTF-8, or a one-line error naming the file."""

from __future__ import annotations

import sys

from kproxy.errors import KproxyError


def read_text(path: str, what: str = "") -> str:
    """The UTF-8 text of path ("-": standard input); what ("topology") names the file's role in errors."""
    shown = "standard input" if path == "-" else path
    named = f"{what} {shown}" if what else shown
    try:
        if path == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        else:
            with open(path, "rb") as file:
                data = file.read()
    except OSError as exc:
        raise KproxyError(f"cannot read {named}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KproxyError(f"{named} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def read_manifest_files(paths: list[str]) -> list[tuple[str, str]]:
    """(text, path) of each manifest file, in order."""
    return [(read_text(path), path) for path in paths]
