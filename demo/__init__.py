"""The demo: sidekey end to end on an embedded control plane (``sidekey demo``)."""
