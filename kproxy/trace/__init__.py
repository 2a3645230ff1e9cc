"""`kproxy trace`: one crafted packet from a pod, a node or external, followed with its reply
through every hop of the lab.

- ``plan``: pure. SRC and DST against the lab's members and Services: the flow, who captures.
- ``hops``: pure. Captured packets and conntrack entries to the flow's hops; text and JSON.
- ``run``: the kernel part. Recorders in the namespaces, the mode's tracer on each node
  (Mode.tracer), the probe, and the cleanup, also on Ctrl-C and SIGTERM.
"""
