"""The lab of the Service behaviour suites: one per proxy mode, shared by every module that asks for it.

`lab` is session-scoped (tests/conftest.py makes it visible everywhere), so
pytest runs the tests of every module that uses it one mode after the other,
with one lab per mode: the Services below plus what each test applies.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.labtools import Lab, kproxy, running_lab

# (mode, its options, and lab up's other options): nftables twice, with kube-proxy's numgen vmap and
# with the cascade that large clusters get, which must behave the same.
MODES = [("iptables",), ("userspace",),
         pytest.param(("ipvs",), marks=pytest.mark.ipvs, id="ipvs"),  # in a QEMU guest where this kernel lacks IPVS
         ("nftables",), ("nftables", "--mode-opt", "endpoint-choice=cascade"),
         # The whole suite once more with the lab's objects in etcd (the agents watching it over the underlay).
         pytest.param(("iptables", "--store", "etcd"), id="iptables-etcd")]

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports:
  - {port: 81, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: dns-like}
spec:
  selector: {app: web}
  ports:
  - {name: dns, port: 53, targetPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nothing-has-this-label}
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, labels: {app: solo}}
spec:
  nodeName: node2
  containers:
  - name: c
    ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: solo}
spec:
  type: NodePort
  selector: {app: solo}
  ports:
  - {port: 80, targetPort: http}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  replicas: 2
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: api
        ports: [{containerPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports:
  - {port: 80, targetPort: 9000}
"""


@pytest.fixture(scope="session", params=MODES, ids=lambda mode: "-".join(mode).replace("--mode-opt-", ""))
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    manifests = tmp_path_factory.mktemp("svc") / "services.yaml"
    manifests.write_text(MANIFESTS)
    with running_lab("--mode", *request.param, dns=True) as name:
        kproxy("apply", "--lab", name, "-f", str(manifests))
        yield Lab(name)


