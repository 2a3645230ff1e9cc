"""CNI errors: the spec's well-known codes and the JSON a plugin prints for them."""

from __future__ import annotations

# Codes from the CNI spec (SPEC.md, "Error").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
# Plugin-specific codes start at 100.
ADDRESS_EXHAUSTED = 100
ALREADY_ALLOCATED = 101
INTERFACE_EXISTS = 102
CHECK_FAILED = 103
NETLINK_FAILURE = 104
DELEGATE_FAILED = 105


class CNIError(Exception):
    """An error a plugin reports to the runtime (stdout JSON, exit status 1)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, object]:
        out: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg
