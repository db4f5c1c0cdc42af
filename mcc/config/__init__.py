"""The configuration: frozen attrs classes, loaded from TOML with cattrs.

Every key is declared once, with its flag, help and unit (:mod:`mcc.config.knobs`,
:mod:`mcc.config.model`); flags win over the file, which wins over the embedded
defaults. A bad value is reported as one line per problem, ``key: value reason``,
through :class:`~mcc.errors.ConfigError`.
"""

from .check import check_config
from .convert import config_as_raw, config_to_toml, load_config, structure_config, with_overrides
from .knobs import Entry, Knob, entries
from .model import Config, Drive, Freshness, HostPort, Limits, Timeouts

__all__ = [
    "Config",
    "Drive",
    "Entry",
    "Freshness",
    "HostPort",
    "Knob",
    "Limits",
    "Timeouts",
    "check_config",
    "config_as_raw",
    "config_to_toml",
    "entries",
    "load_config",
    "structure_config",
    "with_overrides",
]
