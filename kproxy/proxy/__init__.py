"""Proxy modes: one module per mode behind the Proxier interface (types.py)."""
