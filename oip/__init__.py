"""The Open Inference Protocol (KServe v2) front end: a process the daemon starts (daemon/oip_frontend.py)
that serves REST and gRPC through KServe's server and forwards every request to the dispatcher through
the wire client (`python -m oip`, its spec on stdin)."""
