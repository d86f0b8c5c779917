"""Settings: one table of every setting, read and validated into `Settings`.

spec.py      a row of the table: variable, parser, accepted values, doc
daemon.py    the daemon's rows
llm.py       the LLM side's rows (sidecar.llm; the daemon never reads them)
web.py       the web dashboard's rows (sidecar.web; the daemon never reads them)
settings.py  Settings, read from the environment once at start; SPECS
parse.py     the parsers and the checks across settings
docs.py      the table in docs/configuration.md and `serve --help`, generated from the rows
"""

from __future__ import annotations

from sidecar.config.parse import (
    default_socket_path,
    default_state_dir,
    parse_sentinel_url,
    sentinel_hosts,
)
from sidecar.config.settings import SPECS, Settings
from sidecar.config.spec import ConfigError, Spec

__all__ = [
    "SPECS",
    "ConfigError",
    "Settings",
    "Spec",
    "default_socket_path",
    "default_state_dir",
    "parse_sentinel_url",
    "sentinel_hosts",
]
