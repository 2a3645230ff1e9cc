"""Packets crafted, sent and sniffed with scapy inside a lab's namespaces.

scapy reads the interfaces and routes of the namespace it is imported in and
keeps them, so it does its work in a process started inside the namespace
(kproxy.packets.worker, run through nsenter); this process builds and decodes
the packets (kproxy.packets.netns).
"""
