"""The manager over both stores: Redis first, the local store when Redis cannot serve.

manager.py   ResilientQueue: the life cycle, the routing of each call, the views (stats, health)
failover.py  whether Redis serves: the failover, the probe, the watch, the reconciliation
handover.py  the local backlog moved to Redis once it serves again
"""

from __future__ import annotations

from sidecar.queue.resilient.failover import FLAP_WINDOW_S, PROBE_SUCCESSES
from sidecar.queue.resilient.manager import ResilientQueue

__all__ = ["FLAP_WINDOW_S", "PROBE_SUCCESSES", "ResilientQueue"]
