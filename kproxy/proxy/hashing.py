"""kube-proxy's chain-name hash, shared by the modes that name chains after services:
the first characters of the base32 of a sha256 (iptables: 16, nftables: 8)."""

from __future__ import annotations

import hashlib

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_BASE32_PAIRS = [a + b for a in _BASE32 for b in _BASE32]  # every 10-bit value as two digits


def base32_sha256(text: str, chars: int) -> str:
    """base32(sha256(text))[:chars], for an even chars up to 50, without base64.b32encode, which is
    pure Python and was half of a 10k-service render: the first chars digits are the digest's
    first 5 * chars bits, read 10 bits at a time."""
    pairs = chars // 2
    bits = int.from_bytes(hashlib.sha256(text.encode()).digest()[:(10 * pairs + 7) // 8], "big")
    spare = (10 * pairs + 7) // 8 * 8 - 10 * pairs
    return "".join([_BASE32_PAIRS[(bits >> (spare + 10 * (pairs - 1 - i))) & 1023] for i in range(pairs)])
