"""A kernel for nftables mode in memory: kproxy.proxy.nftables.backend.Backend without root.

It reads the `nft -f` commands the mode writes (add/flush/delete of the table, chains,
sets and maps, add rule, add/delete element), applies each input as one transaction
(all of it or, on the first refusal, nothing) and refuses what the kernel refuses:
a chain or set that does not exist, deleting a chain a rule or a map element still
jumps to, deleting a set a rule still names, adding an element whose key is there
with another value. So a proxier that loses track of the kernel fails here too.

``trace`` follows a packet through a table, as kube-proxy's tracePacket does in its
nftables tests (pkg/proxy/nftables/helpers_test.go), so kube-proxy's packet-flow
expectations can be asserted on what the fake holds.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kproxy.proxy.nftables.backend import TransactionError
from kproxy.proxy.nftables.transaction import Existing

HEAD = "ip kube-proxy"


@dataclass
class Table:
    chains: dict[str, list[str]] = field(default_factory=dict)  # name -> rules
    specs: dict[str, str] = field(default_factory=dict)  # chain -> "{ type ... }" or ""
    sets: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (kind, spec)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)  # set -> key -> whole element text


def _key(element: str) -> str:
    return re.split(r' comment "| : ', element, maxsplit=1)[0]


class FakeNft:
    """The Backend of one fake node. ``runs`` lists every transaction it was given."""

    def __init__(self) -> None:
        self.table: Table | None = None
        self.runs: list[str] = []
        self._refuse = 0

    def refuse_next(self, times: int = 1) -> None:
        """The next `times` transactions fail as the kernel refuses one (and change nothing)."""
        self._refuse = times

    # the Backend

    def run(self, text: str) -> None:
        self.runs.append(text)
        if self._refuse:
            self._refuse -= 1
            raise TransactionError("nft -f refused the transaction: (fake) refused")
        table = copy.deepcopy(self.table)
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                table = self._apply(table, line, number)
        self.table = table

    def existing(self) -> Existing | None:
        if self.table is None:
            return None
        return Existing(set(self.table.chains), dict.fromkeys(self.table.sets))

    def delete_table(self) -> None:
        self.table = None

    def show(self, commands: str) -> str:
        if self.table is None:
            raise TransactionError("nft could not list: (fake) no table")
        return commands

    def close(self) -> None:
        """Nothing to let go of."""

    # what tests read

    def state(self) -> Table | None:
        return self.table

    # one command

    def _apply(self, table: Table | None, line: str, number: int) -> Table | None:
        verb, kind, rest = line.split(" ", 2)
        if not rest.startswith(HEAD):
            raise self._error(number, line, "not our table")
        rest = rest[len(HEAD):].strip()
        if kind == "table":
            if verb == "add":
                return table or Table()
            if verb == "delete":
                if table is None:
                    raise self._error(number, line, "No such file or directory")
                return None
        if table is None:
            raise self._error(number, line, "No such file or directory (no table)")
        name, _, tail = rest.partition(" ")
        if kind == "chain":
            self._chain(table, verb, name, tail, line, number)
        elif kind == "rule":
            if name not in table.chains:
                raise self._error(number, line, "No such file or directory")
            for target in re.findall(r"(?:jump|goto) (\S+)", tail):
                if target not in table.chains:
                    raise self._error(number, line, f"chain {target} does not exist")
            for used in re.findall(r"@(\S+)", tail):
                if used not in table.sets:
                    raise self._error(number, line, f"set {used} does not exist")
            table.chains[name].append(tail)
        elif kind in ("set", "map"):
            self._set(table, verb, kind, name, tail, line, number)
        elif kind == "element":
            self._elements(table, verb, name, tail, line, number)
        else:
            raise self._error(number, line, "unknown command")
        return table

    def _chain(self, table: Table, verb: str, name: str, spec: str, line: str, number: int) -> None:
        if verb == "add":
            table.chains.setdefault(name, [])
            table.specs.setdefault(name, spec)
            return
        if name not in table.chains:
            raise self._error(number, line, "No such file or directory")
        if verb == "flush":
            table.chains[name] = []
        elif verb == "delete":
            pattern = re.compile(rf"(?:jump|goto) {re.escape(name)}(?:\s|$)")
            if any(pattern.search(rule) for rules in table.chains.values() for rule in rules) or any(
                    pattern.search(element) for elements in table.elements.values() for element in elements.values()):
                raise self._error(number, line, "Device or resource busy")
            del table.chains[name], table.specs[name]

    def _set(self, table: Table, verb: str, kind: str, name: str, spec: str, line: str, number: int) -> None:
        if verb == "add":
            if name in table.sets and table.sets[name] != (kind, spec):
                raise self._error(number, line, "File exists")
            table.sets.setdefault(name, (kind, spec))
            table.elements.setdefault(name, {})
            return
        if name not in table.sets or table.sets[name][0] != kind:
            raise self._error(number, line, "No such file or directory")
        if verb == "flush":
            table.elements[name] = {}
        elif verb == "delete":
            used = re.compile(rf"@{re.escape(name)}(?:\s|$)")
            if any(used.search(rule) for rules in table.chains.values() for rule in rules):
                raise self._error(number, line, "Device or resource busy")
            del table.sets[name], table.elements[name]

    def _elements(self, table: Table, verb: str, name: str, tail: str, line: str, number: int) -> None:
        if name not in table.sets:
            raise self._error(number, line, "No such file or directory")
        inside = tail.strip()
        if not (inside.startswith("{") and inside.endswith("}")):
            raise self._error(number, line, "syntax error")
        held = table.elements[name]
        for element in (part.strip() for part in inside[1:-1].split(", ")):
            key = _key(element)
            if verb == "add":
                if key in held and held[key] != element:
                    raise self._error(number, line, "File exists")
                target = re.search(r": (?:goto|jump) (\S+)$", element)
                if target and target.group(1) not in table.chains:
                    raise self._error(number, line, f"chain {target.group(1)} does not exist")
                held[key] = element
            elif verb == "delete":
                if key not in held:
                    raise self._error(number, line, "No such file or directory")
                del held[key]

    @staticmethod
    def _error(number: int, line: str, why: str) -> TransactionError:
        return TransactionError(f"nft -f refused the transaction: /dev/stdin:{number}: Error: {why} | {line}")


# What a rule of ours can say, piece by piece (kube-proxy's tracer recognises the same pieces).
_SET_MATCH = re.compile(r"ip ([sd])addr (!= )?@(\S+)")
_ADDRESS_VMAP = re.compile(r"ip daddr \. meta l4proto \. th dport vmap @(\S+)")
_PORT_VMAP = re.compile(r"meta l4proto \. th dport vmap @(\S+)")
_ADDRESSES = re.compile(r"ip ([sd])addr (!= )?\{ ([^}]*) \}")
_ADDRESS = re.compile(r"ip ([sd])addr (!= )?(\S+)")
_LOCAL = re.compile(r"fib ([sd])addr type local")
_PORT = re.compile(r"(tcp|udp|sctp) dport (\d+)")
_PICK = re.compile(r"numgen random mod \d+ vmap \{ (.*) \}$")
_CASCADE_ARM = re.compile(r"numgen random mod \d+ 0 goto (\S+)$")
_MASQUERADE = re.compile(r"jump mark-for-masquerade")
_JUMP = re.compile(r"(jump|goto) (\S+)$")
_VERDICT = re.compile(r"(drop|reject)$")
_DNAT = re.compile(r"meta l4proto (tcp|udp|sctp) dnat to (\S+)$")
_UPDATE = re.compile(r"update @\S+ \{ ip saddr \}")
_IGNORED = re.compile(r' comment "[^"]*"$|^ct state new |\bcounter ')


def _covers(address: str, ip: str) -> bool:
    return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(address, strict=False)


class _Tracer:
    def __init__(self, table: Table, local_ips: frozenset[str]) -> None:
        self.table, self.local_ips = table, local_ips
        self.outputs: list[str] = []  # endpoints DNATed to (every one a choice could take), or DROP/REJECT
        self.masquerade = False

    def _lookup(self, where: str, key: list[str]) -> str | None:
        """The verdict of key in a map, or, for a set, "" when key is a member; None when absent."""
        for element in self.table.elements[where].values():
            head, _, value = element.partition(" : ")
            if re.split(r' comment "', head)[0].split(" . ") == key:
                return value
        return None

    def run(self, chain: str, packet: dict[str, str]) -> bool:
        """Runs chain; True when the packet met a final verdict (or a DNAT)."""
        for text in self.table.chains[chain]:
            rule = _IGNORED.sub("", text).strip()
            verdict = self._rule(rule, packet)
            if verdict is not None:
                return verdict
        return False

    def _rule(self, rule: str, packet: dict[str, str]) -> bool | None:
        """One rule: None when it lets the packet on to the next rule, else as run()."""
        while rule:
            rule = rule.strip()
            if m := _SET_MATCH.match(rule):
                member = self._lookup(m[3], [packet[m[1]]]) is not None
                if member == bool(m[2]):
                    return None
            elif m := (_ADDRESS_VMAP.match(rule) or _PORT_VMAP.match(rule)):
                key = [packet["d"], packet["proto"], packet["port"]] if m.re is _ADDRESS_VMAP else \
                    [packet["proto"], packet["port"]]
                value = self._lookup(m[1], key)
                if value is None:
                    return None
                rule = value
                continue
            elif m := (_ADDRESSES.match(rule) or _ADDRESS.match(rule)):
                listed = m[3].split(" , ") if m.re is _ADDRESSES else [m[3]]
                if any(_covers(a, packet[m[1]]) for a in listed) == bool(m[2]):
                    return None
            elif m := _LOCAL.match(rule):
                if packet[m[1]] not in self.local_ips:
                    return None
            elif m := _PORT.match(rule):
                if (m[1], m[2]) != (packet["proto"], packet["port"]):
                    return None
            elif m := _PICK.match(rule):  # every endpoint the choice may take
                for arm in m[1].split(" , "):
                    self.run(arm.split(" : goto ")[1], packet)
                return True
            elif m := _CASCADE_ARM.match(rule):  # this endpoint, then the rules after it
                self.run(m[1], packet)
                return None
            elif m := _MASQUERADE.match(rule):
                self.masquerade = True
            elif m := _UPDATE.match(rule):
                pass
            elif m := _JUMP.match(rule):
                if self.run(m[2], packet):
                    return True
                if m[1] == "goto":
                    return False
                return None
            elif m := (_VERDICT.match(rule) or _DNAT.match(rule)):
                self.outputs.append(m[2] if m.re is _DNAT else m[1].upper())
                return True
            else:
                raise AssertionError(f"the tracer does not know this rule: {rule}")
            rule = rule[m.end():]
        return None


def trace(table: Table | None, source: str, dest: str, port: int, *, protocol: str = "tcp",
          local_ips: frozenset[str] = frozenset()) -> tuple[str, bool]:
    """Where a new connection from source to dest:port goes through table, as kube-proxy's
    tracePacket answers: the endpoints (", "-joined; every one a random choice may take),
    "DROP" or "REJECT" (or "" when nothing stops it), and whether it is masqueraded.
    local_ips: the node's addresses (``fib ... type local``).

    As kube-proxy's tracer: filter-prerouting, nat-prerouting, then, with the destination
    DNATed to, filter-forward and filter-input (the output chains would see the same); a
    jump to mark-for-masquerade is the masquerade."""
    assert table is not None
    tracer = _Tracer(table, local_ips)
    packet = {"s": source, "d": dest, "proto": protocol, "port": str(port)}
    if not tracer.run("filter-prerouting", packet):
        tracer.run("nat-prerouting", packet)
        if tracer.outputs:
            packet["d"] = tracer.outputs[0].split(":")[0]
        if not tracer.run("filter-forward", packet):
            tracer.run("filter-input", packet)
    return ", ".join(tracer.outputs), tracer.masquerade


def loaded(text: str) -> Table | None:
    """The table a fresh fake kernel holds after one transaction of text."""
    fake = FakeNft()
    fake.run(text)
    return fake.state()


if TYPE_CHECKING:
    from kproxy.proxy.nftables.backend import Backend

    _backend: type[Backend] = FakeNft
