"""Cluster DNS: the records of the Kubernetes DNS specification, served from the lab's store (docs/dns.md)."""
