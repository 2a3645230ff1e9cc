"""The mode seam: the registry knows every mode, each mode is one package behind one Mode
object, options are the mode's own, and nothing outside kproxy/proxy asks a mode's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kproxy import cli
from kproxy.errors import KproxyError
from kproxy.proxy import DEFAULT_MODE, MODES, PACKAGES, mode
from kproxy.proxy.mode import parse_option_pairs
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

REPO = Path(__file__).resolve().parents[1]
NODE = NodeInfo("node1", "172.18.0.2", "10.244.0.0/16")


def test_the_registry_names_each_mode_by_its_own_name() -> None:
    assert MODES == ("iptables", "userspace", "ipvs", "nftables") and DEFAULT_MODE == "iptables"
    assert [mode(name).name for name in MODES] == list(MODES)


def test_an_unknown_mode_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(KproxyError, match=r"^unknown proxy mode 'nft' \(known: iptables, userspace, ipvs, nftables\)$"):
        mode("nft")


def test_options_get_their_defaults_and_bad_ones_are_refused() -> None:
    assert mode("ipvs").options_of({}) == {"scheduler": "rr"}
    assert mode("ipvs").options_of({"scheduler": "sh"}) == {"scheduler": "sh"}
    assert mode("userspace").options_of({}) == {"copy": "splice"}
    assert mode("iptables").options_of({}) == {"localhost-nodeports": "true"}
    assert mode("nftables").options_of({}) == {"endpoint-choice": "auto", "counters": "false"}
    with pytest.raises(KproxyError, match=r"^mode ipvs has no option 'copy' \(its options: scheduler\)$"):
        mode("ipvs").options_of({"copy": "splice"})
    with pytest.raises(KproxyError, match=r"^mode ipvs: option scheduler: 'fast' is not one of rr, wrr, "):
        mode("ipvs").options_of({"scheduler": "fast"})


def test_kproxy_modes_lists_every_mode_with_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["modes"]) == 0
    assert capsys.readouterr().out == """\
iptables (default): kube-proxy's iptables mode: KUBE-SVC/SEP chains, one iptables-nft-restore per sync
  --mode-opt localhost-nodeports=true|false  (default true)
      NodePorts answer on 127.0.0.1 too (kube-proxy's --iptables-localhost-nodeports)
userspace: kube-proxy's first mode: iptables portals REDIRECT to a proxy process that copies bytes
  --mode-opt copy=splice|copy  (default splice)
      how the proxy moves bytes: splice(2) through a pipe, or recv/send (docs/userspace.md)
ipvs: kube-proxy's IPVS mode: virtual servers, kube-ipvs0 and ipsets
  --mode-opt scheduler=rr|wrr|lc|wlc|lblc|lblcr|dh|sh|sed|nq|fo|ovf|mh  (default rr)
      the lab's IPVS scheduler; a Service's kproxy.io/ipvs-scheduler annotation overrides it
nftables: kube-proxy's nftables mode: table ip kube-proxy, verdict maps, one nft -f transaction per sync
  --mode-opt endpoint-choice=auto|vmap|cascade  (default auto)
      how a service picks an endpoint: vmap (kube-proxy's numgen vmap), cascade (a rule per endpoint; scales), auto (vmap up to 1000 service ports)
  --mode-opt counters=false|true  (default false)
      a counter in every rule of a service's chains, for 'kproxy rules' (kube-proxy writes none)
"""


def test_option_pairs() -> None:
    assert parse_option_pairs(["scheduler=sh", "a=b=c", "scheduler=lc"]) == {"scheduler": "lc", "a": "b=c"}
    for bad in ("scheduler", "=sh"):
        with pytest.raises(KproxyError, match=rf"^mode option '{bad}': expected NAME=VALUE$"):
            parse_option_pairs([bad])


def test_ipvs_reads_its_scheduler_annotation_and_the_others_read_nothing_more() -> None:
    service = {"metadata": {"name": "web", "annotations": {"kproxy.io/ipvs-scheduler": "sh"}}}
    assert mode("ipvs").service_info is not None and mode("ipvs").service_info(service) == "sh"
    assert mode("ipvs").service_info({"metadata": {"name": "web"}}) == ""
    assert mode("iptables").service_info is None and mode("userspace").service_info is None


def test_a_mode_option_changes_the_render() -> None:
    svc = ServicePort("default", "web", "", "TCP", "10.96.0.10", 80, node_port=30080)
    state = ProxyState([svc], {svc.key: [Endpoint("10.244.1.2", 8080, "node1")]})
    ipvs = mode("ipvs")
    assert "-A -t 10.96.0.10:80 -s sh" in ipvs.render_text(state, NODE, ipvs.options_of({"scheduler": "sh"}))
    iptables = mode("iptables")
    on = iptables.render_text(state, NODE, iptables.options_of({}))
    off = iptables.render_text(state, NODE, iptables.options_of({"localhost-nodeports": "false"}))
    assert "KUBE-FIREWALL" in on and "KUBE-FIREWALL" not in off


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _sources(package: str) -> list[Path]:
    base = REPO / package.replace(".", "/")
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


@pytest.mark.parametrize("name", MODES)
def test_no_mode_imports_another(name: str) -> None:
    others = [PACKAGES[other] for other in MODES if other != name]
    for path in _sources(PACKAGES[name]):
        wrong = {i for i in _imports(path) for other in others if i == other or i.startswith(other + ".")}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_nothing_outside_the_modes_compares_a_mode_name() -> None:
    found = []
    for path in sorted((REPO / "kproxy").rglob("*.py")) + sorted((REPO / "cni").rglob("*.py")):
        if path.is_relative_to(REPO / "kproxy" / "proxy"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            compared = node.comparators + [node.left] if isinstance(node, ast.Compare) else \
                list(node.keys) if isinstance(node, ast.Dict) else []
            for value in compared:
                if isinstance(value, ast.Constant) and value.value in MODES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
                elif isinstance(value, (ast.Tuple, ast.List, ast.Set)) and any(
                        isinstance(e, ast.Constant) and e.value in MODES for e in value.elts):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []
