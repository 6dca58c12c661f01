"""Benchmarks: the limit (Redis), the peer (limits), the floor (a minimal app) and this
service, all in one run on one machine. Run with ``python -m bench.run``."""
