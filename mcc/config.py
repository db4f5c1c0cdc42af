"""The configuration: frozen attrs classes, loaded from TOML with cattrs.

Every key can also be given as a command-line flag (see :data:`FLAGS`); flags win
over the file, which wins over the embedded defaults. A bad value is reported as
one line per problem, ``key: value reason``, through :class:`~mcc.errors.ConfigError`.
"""

from __future__ import annotations

import json
import socket
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from .errors import ConfigError
from .origins import DEFAULT_ALLOW_ORIGINS, OriginPolicy, normalize_host, split_host_port
from .policy import RefreshRule
from .units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "Config",
    "Drive",
    "Freshness",
    "HostPort",
    "Limits",
    "Timeouts",
    "check_config",
    "config_to_toml",
    "load_config",
    "structure_config",
]

# RFC 9110 leaves block size to us. 64 KiB keeps per-block overhead (one index row,
# one file, one upstream request) small next to the data; 64 MiB bounds the memory a
# block in flight may buffer.
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 64 * 1024 * 1024

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
AccessLogFormat = Literal["kv", "combined", "json"]
VerifyMode = Literal["always", "first", "never"]


@attrs.frozen
class HostPort:
    """A listening or connecting address, written ``host:port`` (IPv6 in brackets)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Raises ValueError naming the text when it is not ``host:port``."""
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not a 'host:port' string")
        host, port = split_host_port(text, default_port=-1, allow_zero=True)
        if port < 0:
            raise ValueError(f"{text!r} has no port (write host:port)")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class Drive:
    """One cache drive: a folder, the most it may hold, and the free space to leave."""

    path: Path
    max_size: int = 50 * 1024**3
    min_free: int = 1024**3


@attrs.frozen
class Timeouts:
    """Every time limit, in seconds."""

    connect: float = 10.0  # upstream TCP connect
    read: float = 30.0  # upstream: longest silence while waiting for bytes
    request_head: float = 10.0  # client: whole request head must arrive (slowloris)
    keepalive: float = 75.0  # client: idle time between requests on one connection
    send: float = 60.0  # client: longest time one chunk of a response may take to send
    shutdown_grace: float = 10.0  # on SIGTERM, time in-flight responses get to finish
    parent_backoff: float = 30.0  # a failed parent is skipped for this long


@attrs.frozen
class Freshness:
    """How long stored responses are used without asking upstream (RFC 9111 s4.2)."""

    heuristic_max: float = 86400.0  # cap of the 10 %-of-age heuristic lifetime
    max_stale: float = 86400.0  # stale-if-error: serve stale this long past its lifetime


@attrs.frozen
class Limits:
    """Every size and count limit."""

    max_connections: int = 4096  # concurrent client connections; more get 503
    max_request_head: int = 16 * 1024  # RFC 9110 s5.4: we answer 431 beyond this
    max_ranges: int = 32  # more ranges in one request are answered with the whole object
    upstream_retries: int = 2  # extra tries of an idempotent block fetch
    upstream_connections_per_host: int = 16  # idle keep-alive connections kept per upstream
    max_orphan_flights: int = 16  # fetches that keep going after every waiter left
    max_upstream_fetches: int = 256  # upstream requests in flight at once; more wait
    max_misses_per_client: int = 64  # concurrent misses one client address may cause
    max_buffer_memory: int = 256 * 1024 * 1024  # RAM fills may hold (receive buffers, ...)


def _default_node_id() -> str:
    return socket.gethostname().split(".")[0] or "mcc"


@attrs.frozen
class Config:
    """The whole configuration of one mcc node. Defaults are the embedded config."""

    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 8080),)
    listen_tls: tuple[HostPort, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_listen: HostPort = HostPort("127.0.0.1", 8081)
    admin_token: str = ""
    drives: tuple[Drive, ...] = (Drive(Path("mcc-cache")),)
    block_size: int = 1024 * 1024
    readahead_blocks: int = 4
    allow_origins: tuple[str, ...] = DEFAULT_ALLOW_ORIGINS
    canonical_hosts: Mapping[str, str] = attrs.field(factory=dict)
    origin: str | None = None
    parents: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    upstream_proxy: HostPort | None = None
    upstream_ca_file: Path | None = None
    origin_fallback: bool = True
    node_id: str = attrs.field(factory=_default_node_id)
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    access_log: str = "-"
    access_log_format: AccessLogFormat = "kv"
    verify_on_read: VerifyMode = "first"
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    freshness: Freshness = Freshness()
    refresh_patterns: tuple[RefreshRule, ...] = ()
    # a committed block survives a power loss (blob, folder and index fsynced in
    # batches); off: a power loss may cost a refetch of what was stored since the start
    durable: bool = True
    commit_interval: float = 0.002  # group commit: longest wait for more blocks to join
    commit_batch: int = 64  # group commit: most blocks in one batch (a full one goes now)

    def origin_policy(self) -> OriginPolicy:
        """The compiled allowlist (``--origin``'s host is allowed too)."""
        patterns = list(self.allow_origins)
        if self.origin:
            https = self.origin.lower().startswith("https://")
            patterns.append(("https://" if https else "") + _url_authority(self.origin))
        return OriginPolicy.build(patterns, self.canonical_hosts)


def _url_authority(url: str) -> str:
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = rest.split("/", 1)[0]
    default = 443 if url.lower().startswith("https://") else 80
    host, port = split_host_port(authority, default_port=default)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LITERAL: object = Literal
_TUPLE: object = tuple
_TABLES = ("timeouts", "limits", "freshness")


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def size(value: object, _: type) -> int:
        return parse_size(value)

    def seconds(value: object, _: type) -> float:
        return parse_duration(value)

    def strict_int(value: object, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        return value

    def strict_bool(value: object, _: type) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value

    def strict_str(value: object, _: type) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value

    def literal(value: object, kind: Any) -> object:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value

    def homogeneous_tuple(value: object, kind: Any) -> tuple[Any, ...]:
        # a TOML string is iterable: without this, "mirror" became six one-letter hosts
        elem = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            noun = "tables" if attrs.has(elem) and elem is not HostPort else "strings"
            raise ValueError(f"expected a list of {noun}, got {_describe(value)}")
        out: list[Any] = []
        errors: list[Exception] = []
        for i, item in enumerate(value):
            try:
                out.append(conv.structure(item, elem))
            except Exception as exc:
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    IterableValidationNote(f"Structuring {kind} @ index {i}", i, elem),
                ]
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {kind!r}", errors, kind)
        return tuple(out)

    def string_table(value: object, _: type) -> dict[str, str]:
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a table of strings, got {_describe(value)}")
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{bad[0]!r}: expected a string, got {_describe(value[bad[0]])}")
        return dict(value)

    def table(fn: Any) -> Any:
        def structure(value: object, kind: type) -> Any:
            if not isinstance(value, Mapping):
                raise ValueError(f"expected a table, got {_describe(value)}")
            return fn(value, kind)

        return structure

    conv.register_structure_hook_func(
        lambda t: typing.get_origin(t) is _TUPLE and typing.get_args(t)[1:] == (...,),
        homogeneous_tuple,
    )
    conv.register_structure_hook_func(lambda t: t == Mapping[str, str], string_table)
    conv.register_structure_hook_func(lambda t: typing.get_origin(t) is _LITERAL, literal)
    conv.register_structure_hook(HostPort, lambda v, _: HostPort.parse(v))
    conv.register_structure_hook(Path, lambda v, _: Path(strict_str(v, str)))
    conv.register_structure_hook(int, strict_int)
    conv.register_structure_hook(bool, strict_bool)
    conv.register_structure_hook(str, strict_str)
    conv.register_structure_hook(float, seconds)
    sized = cattrs.gen.override(struct_hook=size)
    make = cattrs.gen.make_dict_structure_fn
    conv.register_structure_hook(Drive, table(make(Drive, conv, max_size=sized, min_free=sized)))
    limits = make(Limits, conv, max_request_head=sized, max_buffer_memory=sized)
    conv.register_structure_hook(Limits, table(limits))
    for cls in (Timeouts, Freshness, RefreshRule):
        conv.register_structure_hook(cls, table(make(cls, conv)))
    # last: Config's structuring function captures the hooks of its nested classes
    conv.register_structure_hook(Config, table(make(Config, conv, block_size=sized)))
    return conv


def _describe(value: object) -> str:
    """``a string "mirror"``, ``an integer 5``: what a config value was, for messages."""
    if isinstance(value, str):
        return f"a string {json.dumps(value)}"
    if isinstance(value, bool):
        return f"a boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"an integer {value}"
    if isinstance(value, float):
        return f"a number {value}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{type(value).__name__} {value}"


_converter = _make_converter()


def _flatten_errors(exc: BaseException, path: str) -> list[str]:
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        out: list[str] = []
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "name")), None)
            index = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "index")), None)
            if note is not None:
                sub_path = f"{path}.{note.name}" if path else note.name
            elif index is not None:
                sub_path = f"{path}[{index.index}]"
            else:
                sub_path = path
            out += _flatten_errors(sub, sub_path)
        return out
    if isinstance(exc, ForbiddenExtraKeysError):
        prefix = f"{path}." if path else ""
        return [f"{prefix}{k}: unknown key" for k in sorted(exc.extra_fields)]
    if isinstance(exc, KeyError):
        return [f"{path}.{exc.args[0]}: required key is missing"]
    message = str(exc) if isinstance(exc, ValueError) else f"has the wrong type ({exc})"
    return [f"{path or 'config'}: {message}"]


def check_config(config: Config) -> list[str]:
    """Semantic checks the types cannot express; returns one line per problem."""
    problems: list[str] = []
    b = config.block_size
    if b & (b - 1) or not MIN_BLOCK_SIZE <= b <= MAX_BLOCK_SIZE:
        problems.append(f"block_size: {b} is not a power of two between 64 KiB and 64 MiB")
    if config.commit_batch < 1:
        problems.append(f"commit_batch: {config.commit_batch} is less than 1")
    if not 0 <= config.commit_interval <= 1:
        problems.append(f"commit_interval: {config.commit_interval}s is not between 0s and 1s")
    if config.admin_token and len(config.admin_token) < 16:
        problems.append("admin_token: must be at least 16 characters (or empty for none)")
    if not config.admin_token and config.admin_listen.host not in ("127.0.0.1", "::1", "localhost"):
        problems.append(
            f"admin_token: required when admin_listen ({config.admin_listen}) is not on loopback"
        )
    if not config.listen:
        problems.append("listen: at least one address is needed")
    if config.listen_tls and (config.tls_cert is None or config.tls_key is None):
        problems.append("listen_tls: needs tls_cert and tls_key (PEM files)")
    if config.upstream_proxy is not None and config.upstream_proxy.port == 0:
        problems.append(f"upstream_proxy: {config.upstream_proxy} needs a real port")
    if not config.drives:
        problems.append("drives: at least one cache drive is needed")
    paths = [d.path.resolve() for d in config.drives]
    if len(set(paths)) != len(paths):
        problems.append("drives: the same folder is named twice")
    for i, d in enumerate(config.drives):
        if d.max_size < 16 * b:
            problems.append(
                f"drives[{i}].max_size: {d.max_size} is smaller than 16 blocks ({16 * b})"
            )
    if not 0 <= config.readahead_blocks <= 64:
        problems.append(f"readahead_blocks: {config.readahead_blocks} is not between 0 and 64")
    for i, pattern in enumerate(config.allow_origins):
        try:
            OriginPolicy.build([pattern])
        except ValueError as exc:
            problems.append(f"allow_origins[{i}]: {exc}")
    for host, canon in config.canonical_hosts.items():
        try:
            normalize_host(host)
            normalize_host(canon)
        except ValueError as exc:
            problems.append(f"canonical_hosts.{host}: {exc}")
    for key, urls in (
        ("origin", [config.origin] if config.origin else []),
        ("parents", config.parents),
        ("peers", config.peers),
    ):
        for i, url in enumerate(urls):
            where = key if key == "origin" else f"{key}[{i}]"
            problem = _check_http_url(url)
            if problem:
                problems.append(f"{where}: {url!r} {problem}")
    if not config.node_id or not all(c.isalnum() or c in "-_." for c in config.node_id):
        problems.append(
            f"node_id: {config.node_id!r} must be letters, digits, '-', '_' or '.' (a Via token)"
        )
    for name in attrs.fields_dict(Timeouts):
        value = getattr(config.timeouts, name)
        if value <= 0:
            problems.append(f"timeouts.{name}: {value} must be more than zero")
    for i, rule in enumerate(config.refresh_patterns):
        if not rule.match:
            problems.append(f"refresh_patterns[{i}].match: must not be empty")
        if rule.immutable and (rule.max_age is not None or rule.min_age is not None):
            problems.append(f"refresh_patterns[{i}]: immutable excludes max_age and min_age")
    lim = config.limits
    for name, low in (
        ("max_connections", 1),
        ("max_request_head", 1024),
        ("max_ranges", 1),
        ("upstream_retries", 0),
        ("upstream_connections_per_host", 0),
        ("max_orphan_flights", 0),
        ("max_upstream_fetches", 1),
        ("max_misses_per_client", 1),
        ("max_buffer_memory", 4 * 1024 * 1024),
    ):
        if getattr(lim, name) < low:
            problems.append(f"limits.{name}: {getattr(lim, name)} is less than {low}")
    return problems


def _check_http_url(url: str) -> str | None:
    if not url.startswith(("http://", "https://")):
        return "is not an http:// or https:// URL"
    try:
        _url_authority(url)
    except ValueError as exc:
        return f"has a bad host: {exc}"
    return None


def load_config(
    path: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Build the effective config: defaults, then the TOML file, then ``overrides``.

    Args:
      path: a TOML file, or None for the embedded defaults.
      overrides: keys as in the file (``"timeouts": {"read": 5}``); they win. The
        ``timeouts``, ``limits`` and ``freshness`` tables are merged key by key; every other key,
        lists and ``canonical_hosts`` included, is replaced whole.

    Returns:
      The checked, frozen :class:`Config`.

    Raises:
      ConfigError: one line per problem, naming the key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError([f"config: cannot read {str(path)!r}: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config: {str(path)!r} is not valid TOML: {exc}"]) from None
    for key, value in (overrides or {}).items():
        if key in _TABLES and isinstance(raw.get(key), Mapping):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return structure_config(raw)


def structure_config(raw: Mapping[str, Any]) -> Config:
    """Turn a plain mapping (as read from TOML) into a checked Config.

    Raises:
      ConfigError: one line per problem, naming the key.
    """
    try:
        config = _converter.structure(dict(raw), Config)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError) as exc:
        problems = _flatten_errors(exc, "")
    else:
        problems = check_config(config)
        if problems:
            raise ConfigError(problems)
        return config
    # Report every problem in one round: drop the keys whose type is wrong, so that
    # the rest can be structured and range-checked too.
    bad = {_key_of(p) for p in problems}
    rest = _without(raw, bad)
    try:
        partial = _converter.structure(rest, Config)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError):
        raise ConfigError(problems) from None
    dropped = {k.split(".")[0] for k in bad if "." not in k}
    for line in check_config(partial):
        key = _key_of(line)
        if key not in bad and key.split(".")[0] not in dropped:
            problems.append(line)
    raise ConfigError(problems)


def _key_of(problem: str) -> str:
    """The key a problem line names: ``limits.max_ranges`` or ``listen`` (indexes and
    anything below a list dropped: the whole list is set aside)."""
    key = problem.split(":", 1)[0]
    return key.split("[", 1)[0] if "[" in key else key


def _without(raw: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    out = dict(raw)
    for key in keys:
        table, dot, sub = key.partition(".")
        if dot and isinstance(out.get(table), Mapping):
            out[table] = {k: v for k, v in out[table].items() if k != sub}
        else:
            out.pop(table, None)
    return out


def config_to_toml(config: Config) -> str:
    """The config as TOML that :func:`load_config` reads back to an equal Config."""
    top: list[str] = []
    tables: list[str] = []

    def value(v: object, key: str) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return _toml_str(format_duration(v))
        if isinstance(v, int):
            sized = key in (
                "block_size",
                "max_size",
                "min_free",
                "max_request_head",
                "max_buffer_memory",
            )
            return _toml_str(format_size(v)) if sized else str(v)
        if isinstance(v, (HostPort, Path)):
            return _toml_str(str(v))
        if isinstance(v, str):
            return _toml_str(v)
        if isinstance(v, tuple):
            return "[" + ", ".join(value(x, key) for x in v) + "]"
        if isinstance(v, Mapping):
            items = ", ".join(f"{_toml_str(k)} = {value(x, k)}" for k, x in v.items())
            return "{ " + items + " }" if items else "{}"
        raise TypeError(f"cannot write {v!r} as TOML")

    for field in attrs.fields(Config):
        v = getattr(config, field.name)
        if field.name == "drives":
            for d in v:
                tables.append("[[drives]]")
                tables += [
                    f"{f.name} = {value(getattr(d, f.name), f.name)}" for f in attrs.fields(Drive)
                ]
                tables.append("")
        elif field.name == "refresh_patterns":
            for rule in v:
                tables.append("[[refresh_patterns]]")
                for f in attrs.fields(RefreshRule):
                    value_ = getattr(rule, f.name)
                    if value_ is not None:
                        tables.append(f"{f.name} = {value(value_, f.name)}")
                tables.append("")
        elif isinstance(v, (Timeouts, Limits, Freshness)):
            tables.append(f"[{field.name}]")
            tables += [
                f"{f.name} = {value(getattr(v, f.name), f.name)}" for f in attrs.fields(type(v))
            ]
            tables.append("")
        elif v is None:
            top.append(f"# {field.name} is not set")
        else:
            top.append(f"{field.name} = {value(v, field.name)}")
    return "\n".join([*top, "", *tables]).rstrip() + "\n"


def _toml_str(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
