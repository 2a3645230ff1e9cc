"""The command line's parser and argument types: every argument is checked before anything runs,
and a bad one is one line on stderr naming it (exit 2, as argparse's usage errors)."""

from __future__ import annotations

import argparse
import os
import ipaddress
import sys
from typing import Callable, NoReturn

from kproxy.errors import KproxyError
from kproxy.lab.nic import parse_mac
from kproxy.lab.topology import lab_name, valid_node_name
# The rules manifests' metadata follows, so -n and names on the command line mean the same.
from kproxy.fields import DNS1123_LABEL, DNS1123_SUBDOMAIN, MAX_GRACE_SECONDS
from kproxy.selectors import label_key_error, label_value_error
from kproxy.proxy.mode import parse_option
from kproxy.store import BACKENDS, etcd_url

USAGE_ERROR = 2


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (the usage is one --help away), as every other error is."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


def need_root() -> None:
    if os.geteuid() != 0:
        raise KproxyError("this command works in network namespaces: run it as root")


def _argument(name: str, check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a check that raises KproxyError with the reason."""
    def convert(text: str) -> object:
        try:
            return check(text)
        except KproxyError as exc:
            raise argparse.ArgumentTypeError(one_line(str(exc))) from None
    convert.__name__ = name
    return convert


_DNS_RULES = {
    "label": (DNS1123_LABEL, 63, "a DNS-1123 label: lowercase letters, digits and '-', "
                                  "starting and ending with a letter or digit, at most 63 characters"),
    "subdomain": (DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', "
                                           "starting and ending with a letter or digit, at most 253 characters"),
}


def _dns(kind: str, what: str) -> Callable[[str], str]:
    pattern, limit, rule = _DNS_RULES[kind]

    def check(text: str) -> str:
        if len(text) > limit or not pattern.match(text):
            raise KproxyError(f"{what} {text!r} is not {rule}")
        return text
    return check


def _ipv4_address(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise KproxyError(f"{text!r} is not an IPv4 address") from None


def _ipv4_network(text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text))
    except ValueError as exc:
        raise KproxyError(f"{text!r} is not an IPv4 CIDR ({exc})") from None


def _node_port_addresses(text: str) -> tuple[str, ...]:
    """kube-proxy's --nodeport-addresses: CIDRs and "primary" (the node IP), comma-separated."""
    return tuple(part if part == "primary" else _ipv4_network(part) for part in text.split(","))


def _whole_number(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise KproxyError(f"{text!r} is not a whole number, 0 or more")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise KproxyError(f"{text!r} is not a number of seconds above 0")
    return value


def _grace_period(text: str) -> int:
    if text == "-1":
        return -1
    if not text.isascii() or not text.isdigit() or int(text) > MAX_GRACE_SECONDS:
        raise KproxyError(f"{text!r} is not -1 or a whole number of seconds 0-{MAX_GRACE_SECONDS}")
    return int(text)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise KproxyError(f"{text!r} is not KEY=VALUE")
    problem = label_key_error(key) or label_value_error(value)
    if problem:
        raise KproxyError(problem)
    return key, value


def _store(text: str) -> str:
    """--store of lab up: a backend, or an etcd another machine runs (etcd://IP:PORT)."""
    if text.startswith("etcd://"):
        etcd_url(text)
    elif text not in BACKENDS:
        raise KproxyError(f"{text!r} is not {', '.join(BACKENDS)} or etcd://IP:PORT (an etcd another machine runs)")
    return text


def _etcd_endpoint(text: str) -> str:
    etcd_url(text)
    return text


def _deployment(text: str) -> str:
    kind, sep, name = text.partition("/")
    if not sep or kind not in ("deploy", "deployment", "deployments", "deployment.apps"):
        raise KproxyError(f"{text!r} is not deploy/NAME")
    return _dns("subdomain", "deployment name")(name)


LAB = _argument("lab name", lab_name)
NODE = _argument("node name", valid_node_name)
NAMESPACE = _argument("namespace", _dns("label", "namespace"))
OBJECT_NAME = _argument("name", _dns("subdomain", "name"))
IPV4_ADDRESS = _argument("IPv4 address", _ipv4_address)
IPV4_NETWORK = _argument("IPv4 CIDR", _ipv4_network)
NODE_PORT_ADDRESSES = _argument("node port addresses", _node_port_addresses)
REPLICAS = _argument("replicas", _whole_number)
COUNT = _argument("count", _whole_number)
SECONDS = _argument("seconds", _seconds)
GRACE_PERIOD = _argument("grace period", _grace_period)
LABEL = _argument("label", _label)
MODE_OPTION = _argument("mode option", parse_option)
MAC = _argument("MAC address", parse_mac)
DEPLOYMENT = _argument("deploy/NAME", _deployment)
STORE = _argument("store", _store)
ETCD_ENDPOINT = _argument("etcd endpoint", _etcd_endpoint)
