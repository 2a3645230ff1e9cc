"""Cluster DNS on the real kernel, in every proxy mode: dig and getent in pods, through kube-dns's ClusterIP.

The queries cross each node's proxy rules (DNAT and conntrack) to the coredns
pods' servers, as in a cluster. The labs are the Service suite's (tests/servicelab.py);
lab up gave each its DNS, as it gives every lab unless told --no-dns.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from kproxy.lab.probe import http_get
from kproxy.lab.state import ns_name
from tests.conditions import wait_for
from tests.labtools import Lab, kproxy, running_lab

pytestmark = pytest.mark.kernel

DNS_IP = "10.96.0.10"
RECORDS = """
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432, targetPort: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: pg, ports: [{containerPort: 5432}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, labels: {app: db}}
spec: {hostname: db-1, subdomain: db, containers: [{name: pg, ports: [{containerPort: 5432}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: search}
spec: {type: ExternalName, externalName: search.example.com}
"""


def dig(lab: Lab, *args: str, pod: str = "client", check: bool = True) -> str:
    """dig's output, asked from a pod through its resolv.conf: `ip netns exec`, as `kproxy exec`
    runs it (tests/test_services_dns.py's getent and curl go through kproxy exec itself), without a Python
    start per query, which the emulated guest pays dearly while a DNS server restarts beside it."""
    done = subprocess.run(["ip", "netns", "exec", ns_name(lab.name, pod), "dig", "+time=2", "+tries=3", *args],
                          capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"dig {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout.strip()


def status_of(lab: Lab, *args: str) -> str:
    out = dig(lab, "+noall", "+comments", *args)
    return next(line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status:" in line)


@pytest.fixture
def records(lab: Lab, tmp_path: Path) -> Iterator[Lab]:
    manifest = tmp_path / "records.yaml"
    manifest.write_text(RECORDS)
    kproxy("apply", "--lab", lab.name, "-f", str(manifest))
    try:
        yield lab
    finally:
        kproxy("delete", "--lab", lab.name, "-f", str(manifest), check=False)


def test_kube_dns_runs_in_kube_system_on_two_nodes(lab: Lab) -> None:
    services = kproxy("get", "svc", "-n", "kube-system", "--lab", lab.name).stdout.splitlines()
    assert services[1].split()[:5] == ["kube-dns", "ClusterIP", DNS_IP, "<none>", "53/UDP,53/TCP,9153/TCP"]
    pods = json.loads(kproxy("get", "pods", "-A", "-l", "k8s-app=kube-dns", "--lab", lab.name, "-o", "json").stdout)
    assert [p["metadata"]["namespace"] for p in pods["items"]] == ["kube-system"] * 2
    assert len({p["spec"]["nodeName"] for p in pods["items"]}) == 2
    assert all(p["status"]["containerStatuses"][0]["ready"] for p in pods["items"])


def test_every_search_path_expansion_reaches_the_service(lab: Lab) -> None:
    for name in ("web", "web.default", "web.default.svc", "web.default.svc.cluster.local"):
        out = kproxy("exec", "--lab", lab.name, "client", "--", "getent", "hosts", name).stdout
        assert out.split() == [lab.ip("web"), "web.default.svc.cluster.local"], name
    answer = kproxy("exec", "--lab", lab.name, "client", "--", "curl", "-s", "-m", "5", "http://web/").stdout
    assert answer.startswith("pod=web-"), answer


def test_dig_gets_each_record_over_udp_and_tcp(records: Lab) -> None:
    lab = records
    web = lab.ip("web")
    assert dig(lab, "+short", "web.default.svc.cluster.local") == web
    assert dig(lab, "+short", "+tcp", "web.default.svc.cluster.local") == web
    assert dig(lab, "+short", "SRV", "_http._tcp.web.default.svc.cluster.local") == \
        "0 100 80 web.default.svc.cluster.local."
    reverse = ".".join(reversed(web.split("."))) + ".in-addr.arpa."
    assert dig(lab, "+noall", "+answer", "-x", web).split() == \
        [reverse, "5", "IN", "PTR", "web.default.svc.cluster.local."]
    db = {p["metadata"]["name"]: p["status"]["podIP"] for p in lab.pods("app=db")}
    assert sorted(dig(lab, "+short", "db.default.svc.cluster.local").split()) == sorted(db.values())
    assert dig(lab, "+short", "db-0.db.default.svc.cluster.local") == db["db-0"]
    assert sorted(dig(lab, "+short", "SRV", "_pg._tcp.db.default.svc.cluster.local").splitlines()) == \
        ["0 50 5432 db-0.db.default.svc.cluster.local.", "0 50 5432 db-1.db.default.svc.cluster.local."]
    assert dig(lab, "+short", "-x", db["db-1"]) == "db-1.db.default.svc.cluster.local."
    assert dig(lab, "+short", "search.default.svc.cluster.local") == "search.example.com."
    assert dig(lab, "+short", "TXT", "dns-version.cluster.local") == '"1.1.0"'
    assert status_of(lab, "nothing.default.svc.cluster.local") == "NXDOMAIN"
    assert status_of(lab, "AAAA", "web.default.svc.cluster.local") == "NOERROR"
    assert dig(lab, "+short", "AAAA", "web.default.svc.cluster.local") == ""  # NODATA
    assert status_of(lab, "example.com") == "REFUSED"  # no upstream in a lab: said at once


def test_a_headless_service_drops_a_pod_that_stops_being_ready(records: Lab) -> None:
    lab = records
    db = {p["metadata"]["name"]: p["status"]["podIP"] for p in lab.pods("app=db")}
    kproxy("delete", "pod", "db-1", "--lab", lab.name)
    assert dig(lab, "+short", "db.default.svc.cluster.local") == db["db-0"]
    assert status_of(lab, "db-1.db.default.svc.cluster.local") == "NXDOMAIN"


def test_a_new_service_resolves_within_a_second(lab: Lab, tmp_path: Path) -> None:
    manifest = tmp_path / "fresh.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: fresh}\n"
                        "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    try:
        kproxy("apply", "--lab", lab.name, "-f", str(manifest))
        ip = json.loads(kproxy("get", "svc", "fresh", "--lab", lab.name, "-o", "json").stdout)["spec"]["clusterIP"]
        wait_for("fresh resolved", lambda: dig(lab, "+short", "+tries=1", "fresh.default.svc.cluster.local") == ip, 1.0)
    finally:
        kproxy("delete", "--lab", lab.name, "-f", str(manifest), check=False)


def test_queries_go_on_while_a_dns_pod_is_killed(lab: Lab) -> None:
    """A deleted coredns pod leaves kube-dns's endpoints first; the queries in flight and after
    go to the other replica (dig retries), and the Deployment replaces the pod."""
    failures: list[str] = []
    answered = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            out = dig(lab, "+short", "+time=1", "+tries=3", "web.default.svc.cluster.local", check=False)
            (answered if out == web else failures).append(out)

    web = lab.ip("web")
    before = {p["metadata"]["name"] for p in lab.pods("k8s-app=kube-dns", "kube-system")}
    asker = threading.Thread(target=ask)
    asker.start()
    try:
        wait_for("queries answered", lambda: len(answered) >= 3, 30)
        kproxy("delete", "pod", sorted(before)[0], "-n", "kube-system", "--lab", lab.name)
        count = len(answered)
        wait_for("queries answered after the delete", lambda: len(answered) >= count + 5, 60)
    finally:
        stop.set()
        asker.join()
    assert failures == []
    after = lab.pods("k8s-app=kube-dns", "kube-system")
    assert len(after) == 2 and sorted(before)[0] not in {p["metadata"]["name"] for p in after}
    assert all(p["status"]["containerStatuses"][0]["ready"] for p in after)


def test_dns_pods_serve_coredns_metrics(lab: Lab) -> None:
    pod = next(p for p in lab.pods("k8s-app=kube-dns", "kube-system") if p["status"].get("podIP"))
    dig(lab, "+short", "web.default.svc.cluster.local")
    body = http_get(lab.ns(pod["spec"]["nodeName"]), pod["status"]["podIP"], 9153, "/metrics").decode()
    for name in ("coredns_dns_requests_total", "coredns_dns_responses_total",
                 "coredns_dns_request_duration_seconds_bucket"):
        assert f"\n{name}{{" in body, name
    assert 'rcode="NOERROR"' in body and 'zone="cluster.local."' in body


def test_pods_resolve_through_kube_dns_and_nodes_keep_the_machines_resolver(lab: Lab) -> None:
    pod_conf = kproxy("exec", "--lab", lab.name, "client", "--", "cat", "/etc/resolv.conf").stdout
    assert pod_conf == ("search default.svc.cluster.local svc.cluster.local cluster.local\n"
                        f"nameserver {DNS_IP}\noptions ndots:5\n")
    node_conf = kproxy("exec", "--lab", lab.name, "node1", "--", "cat", "/etc/resolv.conf").stdout
    assert node_conf == Path("/etc/resolv.conf").read_text()


def test_no_dns_leaves_it_out_and_down_removes_every_resolv_conf() -> None:
    with running_lab() as name:  # --no-dns
        assert json.loads(kproxy("get", "pods", "-A", "--lab", name, "-l", "k8s-app=kube-dns", "-o", "json")
                          .stdout)["items"] == []
        conf = kproxy("exec", "--lab", name, "client", "--", "cat", "/etc/resolv.conf").stdout
        assert conf == Path("/etc/resolv.conf").read_text()
        kproxy("lab", "up", "--name", name, "--dns")  # turned on in the running lab
        assert Path(f"/etc/netns/kp_{name}_client/resolv.conf").exists()
        assert kproxy("exec", "--lab", name, "client", "--", "getent", "hosts", "kube-dns.kube-system").stdout \
            .split() == [DNS_IP, "kube-dns.kube-system.svc.cluster.local"]
    assert not list(Path("/etc/netns").glob(f"kp_{name}_*"))
