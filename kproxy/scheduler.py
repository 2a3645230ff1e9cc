"""The pod scheduler, simply: the one rule both a lab's topology and `kproxy apply` place pods by.

A pod goes to its nodeName; else, of the nodes whose labels match its
nodeSelector, to the one with the fewest pods of its ReplicaSet (Kubernetes'
default spreading: the replicas of a Deployment land on different nodes),
then the least loaded; a tie goes to the node first in the lab's order (the
topology's, then nodes added later). Kubernetes' own scheduler scores more and
breaks ties at random; a fixed order keeps a lab reproducible.
"""

from __future__ import annotations

from typing import Mapping

HOSTNAME_LABEL = "kubernetes.io/hostname"
OS_LABEL = "kubernetes.io/os"


def node_labels(name: str, labels: Mapping[str, str]) -> dict[str, str]:
    """A Node's labels as the kubelet registers them: hostname and os, then the lab's own."""
    return {HOSTNAME_LABEL: name, OS_LABEL: "linux", **labels}


def choose_node(nodes: Mapping[str, Mapping[str, str]], load: Mapping[str, int],
                node_selector: Mapping[str, str], siblings: Mapping[str, int] | None = None) -> str | None:
    """Of nodes (name -> own labels, in the lab's order) node_selector matches, the one with the
    fewest siblings (pods of the same ReplicaSet, by node), then the least loaded."""
    fits = [name for name, labels in nodes.items()
            if all(node_labels(name, labels).get(k) == v for k, v in node_selector.items())]
    spread = siblings or {}
    return min(fits, key=lambda name: (spread.get(name, 0), load[name])) if fits else None
