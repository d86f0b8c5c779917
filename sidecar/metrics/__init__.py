"""Prometheus exposition of one daemon.

registry.py  DaemonMetrics: counted where events happen, queue gauges read at scrape
http.py      the small HTTP listener scrapers reach (SIDECAR_METRICS_ADDR)
"""

from __future__ import annotations

from sidecar.metrics.http import MetricsListener
from sidecar.metrics.registry import CONTENT_TYPE, MAX_LABEL_VALUES, DaemonMetrics

__all__ = ["CONTENT_TYPE", "MAX_LABEL_VALUES", "DaemonMetrics", "MetricsListener"]
