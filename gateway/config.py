"""Settings: one msgspec Struct tree, loaded from YAML with ``${ENV}`` references.

Nothing is read at import time: ``load_settings(path)`` is called once by the CLI (or by a
test) and the result is passed to ``create_app``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from gateway.errors import split_validation_error

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]


class ConfigError(Exception):
    """Raised for a bad config file; the message names the offending key."""


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerSettings(_Base):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    #: the URL clients reach the gateway at; signed file URLs and vendor callbacks use it
    public_base_url: str | None = None
    #: HMAC key for signed file URLs; empty = generated once and kept in the database
    url_signing_secret: str | None = None
    #: how long a signed URL for a generated image stays valid
    file_url_ttl_s: PosInt = 86_400
    #: run the engine's workers inside the API process
    run_workers: bool = True
    #: how long an authenticated key is remembered in-process (0 = look it up on every request);
    #: a key revoked by another process (the CLI) stops working within this time
    auth_cache_s: NonNegative = 5.0
    #: bearer token for the /admin endpoints (unset: they are disabled)
    admin_token: str | None = None
    #: bearer token for ``GET /metrics`` (the admin token works too; neither set: it is disabled)
    metrics_token: str | None = None


class DatabaseSettings(_Base):
    #: which database: unset (or ``sqlite:///PATH``) is SQLite, the embedded default, at
    #: ``path``; ``postgresql://USER:PASSWORD@HOST:PORT/DB`` is PostgreSQL, which several
    #: replicas (on several machines) may share
    url: str | None = None
    #: SQLite file; relative paths are relative to ``data_dir``
    path: str = "gateway.sqlite3"
    #: ``auto``: a process brings the schema up to date when it starts (replicas take turns);
    #: ``check``: it refuses to start while migrations are pending (run ``lora-gateway migrate``)
    migrate: Literal["auto", "check"] = "auto"
    #: PostgreSQL: connections per process (API requests and the engine share them)
    pool_size: Annotated[int, msgspec.Meta(ge=2, le=200)] = 10
    #: PostgreSQL: a statement running longer is cancelled (a stuck lock cannot hang a request)
    statement_timeout_ms: PosInt = 30_000
    busy_timeout_ms: PosInt = 10_000
    #: reads run on the event loop through a plain sqlite3 connection (every read is a short
    #: indexed lookup: cheaper than a hop to a database thread); false: a pool of threaded readers
    inline_reads: bool = True
    #: write transactions run on the event loop through a plain sqlite3 connection, start to
    #: commit in one go (the WAL checkpoint runs in a thread); false: an aiosqlite writer thread
    inline_writes: bool = True
    #: size of the threaded reader pool (used when inline_reads is false)
    read_connections: Annotated[int, msgspec.Meta(ge=1, le=32)] = 4


class StorageSettings(_Base):
    backend: str = "local"
    #: the backend's own options, e.g. ``{root: /srv/blobs}`` for ``local``
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class UploadSettings(_Base):
    min_images: Annotated[int, msgspec.Meta(ge=1)] = 15
    max_images: Annotated[int, msgspec.Meta(ge=1)] = 30
    max_image_mb: Positive = 10
    max_total_mb: Positive = 100
    max_image_pixels: PosInt = 40_000_000
    #: where uploads are spooled while streaming (default: the system temp dir)
    tmp_dir: str | None = None
    #: ``decode``: every image's pixel data is decoded at upload, so a truncated or corrupt file
    #: is a 400 (about 5 ms of CPU per MiB of JPEG); ``structure``: only a structural check
    #: (end marker, chunk CRCs, sizes), cheaper, but a JPEG cut short with its end marker
    #: appended then passes and trains on grey
    pixel_check: Literal["decode", "structure"] = "decode"


class DatasetSettings(_Base):
    max_side: Annotated[int, msgspec.Meta(ge=64, le=4096)] = 1024
    jpeg_quality: Annotated[int, msgspec.Meta(ge=50, le=100)] = 92
    #: ``template`` (default) or ``openai`` (configure it under ``captioners.openai``)
    captioner: str = "template"


class OperationSettings(_Base):
    """Timing for one operation (training or generation); unset keys inherit."""

    #: an attempt that reports no progress (and no state change) for this long is stuck:
    #: it is cancelled and the work moves on
    stuck_after_s: Positive | None = None
    #: an attempt still running this long after it was submitted is stuck, progress or not
    deadline_s: Positive | None = None
    #: status polls back off from min to max (default: ``engine.min/max_poll_interval_s``)
    min_poll_interval_s: Positive | None = None
    max_poll_interval_s: Positive | None = None


class ProviderTimings(_Base):
    training: OperationSettings = msgspec.field(default_factory=OperationSettings)
    generation: OperationSettings = msgspec.field(default_factory=OperationSettings)


class EngineSettings(_Base):
    #: how often idle workers look for due rows (new work in-process wakes them at once)
    poll_interval_s: Positive = 0.5
    #: a worker's lease on a row; a crashed worker's rows are taken over after this
    lease_s: Positive = 120
    #: steps (and provider status requests) run at once by one process, poll batches included
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    #: first wait between provider status polls, doubling up to ``max_poll_interval_s``;
    #: the backoff restarts when an attempt's state changes
    min_poll_interval_s: Positive = 1.0
    max_poll_interval_s: Positive = 30.0
    #: tries per lora or job across all providers (retries and fallbacks together)
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    #: wait before retrying the same provider after a failed try (doubling per try), unless
    #: the provider said when (Retry-After)
    retry_backoff_s: NonNegative = 2.0
    #: unexpected errors (bugs, storage failures) a lora or job may hit before it ends FAILED
    max_crashes: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    #: wait before retrying a step that raised an unexpected error (doubling per crash)
    crash_backoff_s: NonNegative = 10.0
    #: lookups of an ambiguous submission (by attempt id) before it counts as unknown
    reconcile_tries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    #: how long an ambiguous submission to a provider that cannot look jobs up waits for the
    #: provider's callback before it counts as unknown (providers without callbacks: no wait)
    reconcile_wait_s: NonNegative = 600
    #: tries of a durable cancel request before it is abandoned (logged)
    cancel_tries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 12
    #: image decodes/encodes the engine runs at once (in threads, off the event loop);
    #: null = half the machine's cores (at least one), leaving the rest to the API
    image_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    #: how much lower those threads' CPU priority is (Linux nice; 0 = the same as the API), so a
    #: busy machine serves requests first and the engine's image work takes what is left
    image_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    #: trainings: stuck after an hour without progress, or a day after submission
    training: OperationSettings = msgspec.field(
        default_factory=lambda: OperationSettings(stuck_after_s=3600, deadline_s=86_400)
    )
    #: generations take seconds to minutes
    generation: OperationSettings = msgspec.field(
        default_factory=lambda: OperationSettings(stuck_after_s=300, deadline_s=1800, max_poll_interval_s=5)
    )
    #: per-provider overrides of ``training`` / ``generation``, keyed by provider name
    providers: dict[str, ProviderTimings] = msgspec.field(default_factory=dict)
    #: largest artifact (LoRA weights) copied into storage
    max_artifact_mb: Positive = 2048
    #: largest generated image fetched from a provider
    max_image_mb: Positive = 50


Strategy = Literal["priority", "cheapest", "weighted"]


class RouteSettings(_Base):
    #: ``priority``: the first eligible, healthy instance in ``providers`` order; ``cheapest``: the
    #: lowest declared cost (ties by order); ``weighted``: spread by ``weights``, stable per object
    strategy: Strategy = "priority"
    #: provider instances (keys of ``providers``), in priority order
    providers: list[str] = msgspec.field(default_factory=lambda: ["sandbox"])
    #: ``weighted`` only: a relative weight per instance (missing: 1)
    weights: dict[str, Annotated[float, msgspec.Meta(gt=0)]] = msgspec.field(default_factory=dict)


class BreakerSettings(_Base):
    #: provider-side failures in a row (unavailable, timeouts, rate limits, 5xx) that open an
    #: instance's breaker for an operation
    failures: PosInt = 5
    #: how long an open breaker stays open before one probe request is let through
    cooldown_s: Positive = 30.0


class RoutingSettings(_Base):
    training: RouteSettings = msgspec.field(default_factory=RouteSettings)
    inference: RouteSettings = msgspec.field(default_factory=RouteSettings)
    breaker: BreakerSettings = msgspec.field(default_factory=BreakerSettings)


class TeamDefaults(_Base):
    #: credits given to the team created on a new database
    bootstrap_credits: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    max_concurrent_trainings: Annotated[int, msgspec.Meta(ge=0)] = 10
    #: requests per minute per API key (0 = unlimited)
    rate_limit_per_minute: Annotated[int, msgspec.Meta(ge=0)] = 600


class WebhookSettings(_Base):
    #: tries per delivery; with the delays below, 12 tries span about 5 hours
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] = 12
    #: first retry delay, doubling each time up to ``max_delay_s`` (each times a jitter of 0.75–1.0)
    base_delay_s: Positive = 60
    max_delay_s: Positive = 3600
    timeout_s: Positive = 10
    #: at most this much of a receiver's response body is read
    max_response_bytes: PosInt = 4096
    #: deliveries sent at once by one process
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    #: hosts allowed over http and on private addresses (development and tests only)
    allow_hosts: list[str] = msgspec.field(default_factory=list)


class FilesSettings(_Base):
    #: generated images are deleted this many days after their job completed (the job then says
    #: ``expired: true``); 0 keeps them forever
    retention_days: Annotated[int, msgspec.Meta(ge=0)] = 30
    #: how often each engine sweeps (expired images, work directories left behind)
    sweep_interval_s: Positive = 86_400


class LoggingSettings(_Base):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(_Base):
    #: where the database, blobs and provider state live by default
    data_dir: str = "./lora-gateway-data"
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    uploads: UploadSettings = msgspec.field(default_factory=UploadSettings)
    datasets: DatasetSettings = msgspec.field(default_factory=DatasetSettings)
    #: per-captioner options, keyed by captioner name
    captioners: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    routing: RoutingSettings = msgspec.field(default_factory=RoutingSettings)
    #: provider instances and their options, keyed by instance name; ``type`` names the provider
    #: type (a registered provider; default: the instance name itself)
    providers: dict[str, dict[str, Any]] = msgspec.field(default_factory=lambda: {"sandbox": {}})
    teams: TeamDefaults = msgspec.field(default_factory=TeamDefaults)
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    files: FilesSettings = msgspec.field(default_factory=FilesSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)

    @property
    def data_path(self) -> Path:
        """``data_dir`` as an absolute path (subprocesses may run elsewhere)."""
        return Path(self.data_dir).expanduser().absolute()

    @property
    def database_path(self) -> Path:
        """The SQLite file (``database.url`` as ``sqlite:///PATH``, else ``database.path``)."""
        url = self.database.url
        raw = url[len("sqlite:///"):] if url and url.startswith("sqlite:///") else self.database.path
        p = Path(raw).expanduser()
        return p if p.is_absolute() else self.data_path / p

    @property
    def database_backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        url = self.database.url or ""
        return "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str, env: dict[str, str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable ${{{name}}} is not set")

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    return value


def settings_from_mapping(raw: dict[str, Any] | None, *, env: dict[str, str] | None = None, source: str = "config") -> Settings:
    """Build Settings from a plain mapping (already parsed YAML), expanding ``${ENV}``."""
    env = dict(os.environ) if env is None else env
    raw = _expand_env(raw or {}, "", env)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        key, msg = split_validation_error(e)
        raise ConfigError(f"{source}: invalid value for `{key or '(top level)'}`: {msg}") from None
    _check_consistency(settings, source)
    return settings


def load_settings(path: str | Path | None, *, env: dict[str, str] | None = None) -> Settings:
    """Load a YAML config file; ``None`` gives the embedded defaults."""
    if path is None:
        return settings_from_mapping({}, env=env, source="defaults")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return settings_from_mapping(raw, env=env, source=str(p))


def _check_consistency(s: Settings, source: str) -> None:
    if s.uploads.min_images > s.uploads.max_images:
        raise ConfigError(f"{source}: `uploads.min_images` is larger than `uploads.max_images`")
    if s.engine.min_poll_interval_s > s.engine.max_poll_interval_s:
        raise ConfigError(f"{source}: `engine.min_poll_interval_s` is larger than `engine.max_poll_interval_s`")
    for name in s.engine.providers:
        if name not in s.providers:
            raise ConfigError(f"{source}: `engine.providers` names `{name}`, which is not configured under `providers`")
    for name, raw in s.providers.items():
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: `providers.{name}` must be a mapping of options")
        if "type" in raw and (not isinstance(raw["type"], str) or not raw["type"]):
            raise ConfigError(f"{source}: `providers.{name}.type` must name a provider type")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise ConfigError(f"{source}: provider instance name `{name}`: letters, digits, `_`, `.` and `-` only")
    for op in ("training", "inference"):
        check_route(getattr(s.routing, op), s.providers, f"{source}: `routing.{op}")
    url = s.database.url
    if url is not None and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(f"{source}: `database.url` must start with sqlite:/// or postgresql://")
    if s.server.public_base_url is not None and not re.match(r"^https?://", s.server.public_base_url):
        raise ConfigError(f"{source}: `server.public_base_url` must start with http:// or https://")


def check_route(route: RouteSettings, providers: dict[str, Any], where: str) -> None:
    """A route names configured instances only (``where`` is the message's prefix)."""
    if not route.providers:
        raise ConfigError(f"{where}.providers` is empty")
    for name in route.providers:
        if name not in providers:
            raise ConfigError(f"{where}.providers` names `{name}`, which is not configured under `providers`")
    for name in route.weights:
        if name not in route.providers:
            raise ConfigError(f"{where}.weights` names `{name}`, which is not in its `providers`")
