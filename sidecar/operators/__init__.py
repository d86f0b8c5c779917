"""The operators' commands of the `sidecar` CLI: list, show, requeue, purge (docs/operations.md).

A client of the daemon like any service: it uses only the client and what is below it.
"""

from __future__ import annotations

from sidecar.operators.commands import add_operator_commands, format_table

__all__ = ["add_operator_commands", "format_table"]
