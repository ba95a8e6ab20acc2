"""Gateway settings: every knob, read from ``GATEWAY__*`` environment variables and ``.env``.

All settings are validated when :func:`load_settings` runs, so a bad value stops the process at
startup with a message that names the variable, instead of surfacing as a strange failure later.
``.env.example`` lists every field here with its default (a test keeps the two in sync).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .client_address import Network, parse_networks

ENV_PREFIX = "GATEWAY__"
PLACEHOLDER_INTERNAL_KEY = "change-me-internal-key"
MIN_INTERNAL_KEY_LENGTH = 16
MiB = 1024 * 1024


class SettingsError(ValueError):
    """Raised with a human-readable, variable-by-variable message when settings are invalid."""


class Settings(BaseSettings):
    """The gateway's configuration. Field ``foo_bar`` is read from ``GATEWAY__FOO_BAR``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        frozen=True,
    )

    # --- upstream Agent Runtime -------------------------------------------------------------
    agent_url: str = Field(
        "http://127.0.0.1:8001", description="Base URL of the Agent Runtime (HTTP + SSE)."
    )
    internal_api_key: SecretStr = Field(
        SecretStr(PLACEHOLDER_INTERNAL_KEY),
        description="Sent to the runtime as X-Internal-Auth. Never logged.",
    )
    request_timeout: float = Field(
        30.0, gt=0, le=3600, description="Seconds to connect to the runtime and to send a request."
    )
    stream_idle_timeout: float = Field(
        900.0,
        gt=0,
        le=86400,
        description=(
            "Seconds a turn's SSE stream may stay silent (comments count as activity) before the "
            "turn fails with runtime_timeout. Well above the runtime's 360 s LLM timeout."
        ),
    )
    runtime_max_connections: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description=(
            "Cap on runtime connections in use at once, turns and proxied REST requests together "
            "(one pool: a streaming turn holds its connection for its whole length; a turn waits "
            "up to REQUEST_TIMEOUT for one, then fails with runtime_unavailable; a REST request "
            "waits SATURATION_WAIT, then gets 503)."
        ),
    )
    # Keep-alive pool of runtime connections, turns and REST (upstream/http_stream.py).
    runtime_pool_max_idle: int = Field(
        100,
        ge=0,
        le=100_000,
        description=(
            "Idle keep-alive connections to the runtime kept for the next turns (0: a new "
            "connection per turn); more are closed when released."
        ),
    )
    runtime_pool_idle_expiry: float = Field(
        4.0,
        gt=0,
        le=3600,
        description=(
            "Seconds an idle pooled runtime connection may wait before it is closed instead of "
            "reused. Keep it below the runtime server's keep-alive timeout (hypercorn and "
            "uvicorn: 5 s) so the server rarely closes a connection just as a turn starts on it."
        ),
    )
    max_concurrent_requests: int = Field(
        200,
        ge=1,
        le=100_000,
        description="REST requests proxied to the runtime at once; more wait briefly, then 503.",
    )
    saturation_wait: float = Field(
        0.5,
        ge=0,
        le=60,
        description=(
            "Seconds a REST request may wait for a free slot when MAX_CONCURRENT_REQUESTS are "
            "in flight before it gets 503 with Retry-After."
        ),
    )
    # REST answers read from the runtime (edge/rest_proxy.py).
    max_response_body_bytes: int = Field(
        16 * MiB,
        ge=1024,
        le=1024 * MiB,
        description=(
            "Largest runtime answer the REST proxy reads (it holds each in memory, at most "
            "MAX_CONCURRENT_REQUESTS at once); a larger one gets 502 response_too_large."
        ),
    )
    max_request_body_bytes: int = Field(
        1 * MiB,
        ge=1024,
        le=1024 * MiB,
        description="Largest REST request body; larger gets 413 before anything is sent upstream.",
    )

    # --- authentication and authorization ---------------------------------------------------
    use_jwt_auth: bool = Field(
        True, description="Require a valid access token (JWT from the Auth Service) everywhere."
    )
    auth_service_url: str = Field(
        "http://127.0.0.1:8003",
        description=(
            "Base URL of the Auth Service (the real one listens on 8003; `trio-gateway demo` "
            "wires in its own issuer)."
        ),
    )
    jwks_url: str = Field(
        "", description="JWKS location; empty: AUTH_SERVICE_URL + /.well-known/jwks.json."
    )
    jwt_issuer: str = Field("https://auth.codelab.local", min_length=1, description="Required iss.")
    jwt_audience: str = Field("codelab-api", min_length=1, description="Required aud.")
    jwt_leeway: float = Field(
        30.0, ge=0, le=600, description="Clock skew tolerated on exp, nbf and iat (seconds)."
    )
    jwt_max_lifetime: float = Field(
        86400.0, gt=0, le=31 * 86400, description="Tokens whose exp - iat exceeds this are refused."
    )
    jwks_refetch_cooldown: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "Minimum seconds between JWKS refetches caused by an unknown kid or a bad signature."
        ),
    )
    jwks_stale_seconds: float = Field(
        3600.0,
        ge=0,
        le=7 * 86400,
        description=(
            "How long the last good keys keep working past expiry while the Auth Service is down."
        ),
    )
    read_scope: str = Field("api:read", description="Scope required for GET routes.")
    write_scope: str = Field(
        "api:write", description="Scope required for other routes and for the WebSocket."
    )
    allow_internal_auth: bool = Field(
        False,
        description=(
            "Accept X-Internal-Auth: <INTERNAL_API_KEY> instead of a token on REST (services)."
        ),
    )
    allow_query_token: bool = Field(
        False, description="Accept ?access_token= on the WebSocket handshake (never logged)."
    )
    ws_auth_mode: Literal["token", "session-id"] = Field(
        "token",
        description=(
            "token: every WebSocket authenticates with a token (header, subprotocol or first "
            "auth frame). session-id: a socket with no token at the handshake is admitted to "
            "a session that already has an owner, as that owner, with the write scope only "
            "(the old gateway's exposure: the session id is the credential); an auth frame it "
            "sends is an in-band refresh (another user's token closes it with 4401). Sockets "
            "to unowned sessions still authenticate with their first frame. For today's IDE, "
            "which sends no token on its WebSocket; REST still needs tokens."
        ),
    )
    ws_auth_timeout: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Seconds a handshake without a token has to send its auth frame.",
    )
    insecure_dev: bool = Field(
        False,
        description="Development only: allow the placeholder or an empty INTERNAL_API_KEY.",
    )

    # --- limits per user and per origin --------------------------------------------------------
    allowed_origins: str = Field(
        "",
        description=(
            "Comma-separated browser origins allowed to open WebSockets (https://app.example, "
            "https://*.example). Requests without Origin (native clients) are always allowed."
        ),
    )
    max_connections_per_user: int = Field(
        20, ge=1, le=100_000, description="Open WebSockets per user; more get HTTP 429."
    )
    max_sessions_per_user: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description=(
            "Sessions one user may own at a time (JWT auth only); a new one beyond it gets 429. "
            "Deleted sessions and those unused for SESSION_OWNERSHIP_TTL no longer count."
        ),
    )
    session_ownership_ttl: float = Field(
        30 * 86_400,
        ge=0,
        le=10 * 365 * 86_400,
        description=(
            "Seconds a session's owner is remembered after it was last opened or used over REST "
            "(JWT auth only); afterwards the next user to touch the id owns it. 0 keeps owners "
            "until the session is deleted, and a user then reaches MAX_SESSIONS_PER_USER for good."
        ),
    )
    ws_messages_per_second: float = Field(
        5.0, gt=0, le=10_000, description="Sustained inbound WebSocket messages per user."
    )
    ws_message_burst: int = Field(
        30, ge=1, le=100_000, description="Inbound WebSocket messages a user may send at once."
    )
    rest_requests_per_second: float = Field(
        20.0, gt=0, le=100_000, description="Sustained REST requests per user; more get 429."
    )
    rest_request_burst: int = Field(
        60, ge=1, le=1_000_000, description="REST requests a user may send at once."
    )
    # Lockouts (one user, or one anonymous client address, must not fill what all share).
    max_live_sessions_per_user: int = Field(
        100,
        ge=1,
        le=1_000_000,
        description=(
            "Live sessions (connected or in their grace period) one user may hold in this "
            "process; a handshake that would open one more gets HTTP 429 (close 4429 after "
            "first-frame auth). With JWT auth off, each client address counts as one user."
        ),
    )
    ws_handshakes_per_second: float = Field(
        5.0,
        gt=0,
        le=100_000,
        description=(
            "Sustained WebSocket handshakes per user (per client address with JWT auth off); "
            "more get HTTP 429 with Retry-After (close 4429 after first-frame auth)."
        ),
    )
    ws_handshake_burst: int = Field(
        60,
        ge=1,
        le=1_000_000,
        description=(
            "WebSocket handshakes a user may make at once (every session of an IDE or two "
            "reconnecting after a restart)."
        ),
    )
    detached_bytes_per_user: int = Field(
        8 * MiB,
        ge=0,
        le=64 * 1024 * MiB,
        description=(
            "Relayed bytes all of one user's detached sessions (client gone, turn still "
            "running) may hold for a reconnect, in this process; what does not fit is dropped "
            "and the returning client is told to resync."
        ),
    )

    # --- logging -------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Root log level. DEBUG may log frame payloads: never in production."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json: one JSON object per line; text: readable lines; auto: text on a TTY.",
    )
    access_log: bool = Field(True, description="Log one line per HTTP request and handshake.")
    metrics_allow: str = Field(
        "127.0.0.1/32,::1/128",
        description=(
            "Comma-separated client networks allowed to read /metrics (the internal key in "
            "X-Internal-Auth is accepted too). Empty: key only."
        ),
    )

    trusted_proxies: str = Field(
        "",
        description=(
            "Comma-separated networks of reverse proxies in front of the gateway. Only a peer "
            "in one of them may name the client's address with X-Forwarded-For (read from the "
            "right); empty: the TCP peer is always the client."
        ),
    )

    # --- WebSocket sessions -------------------------------------------------------------------
    ws_heartbeat_interval: float = Field(
        20.0,
        gt=0,
        le=3600,
        description=(
            "Seconds between WebSocket protocol pings; a peer silent for about two intervals is "
            "dropped. v2 clients also get an application heartbeat frame after this much quiet."
        ),
    )
    ws_close_timeout: float = Field(
        5.0, gt=0, le=600, description="Seconds the closing handshake may take before we abort."
    )
    ws_max_message_bytes: int = Field(
        16 * MiB,
        ge=1024,
        le=256 * MiB,
        description=(
            "Largest inbound WebSocket message (whole, reassembled); larger closes 1009. The "
            "IDE sends a whole file read as one tool_result (the old gateway took 16 MiB)."
        ),
    )
    ws_slow_client_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "Seconds one outbound send may stay blocked on a client that does not read before "
            "the connection is aborted and its turn cancelled."
        ),
    )
    outbound_queue_max_bytes: int = Field(
        1 * MiB,
        ge=4096,
        le=1024 * MiB,
        description=(
            "Per-session bound on relayed runtime data waiting for the socket; when full the "
            "gateway stops reading the runtime stream (backpressure)."
        ),
    )
    max_pending_control_frames: int = Field(
        256,
        ge=8,
        le=100_000,
        description=(
            "Gateway-made frames (errors, pongs) a client may leave unread before it is closed "
            "with 1008."
        ),
    )
    max_queued_messages: int = Field(
        16, ge=0, le=10_000, description="Runtime-bound messages waiting behind a running turn."
    )
    session_grace_seconds: float = Field(
        30.0,
        ge=0,
        le=86400,
        description=(
            "After a disconnect, a running turn continues this long so the runtime can finish; a "
            "reconnect within it re-attaches to the live turn."
        ),
    )
    max_connections: int = Field(
        10_000, ge=1, le=1_000_000, description="Open WebSockets per process; more get HTTP 503."
    )
    max_sessions: int = Field(
        20_000,
        ge=1,
        le=1_000_000,
        description="Live sessions per process (connected or in grace); more get HTTP 503.",
    )
    # Hostile edge: what a socket may cost before it has authenticated, and compression.
    max_pending_auth: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description=(
            "Sockets per process waiting for their first-frame auth (opened without a token); "
            "more get HTTP 503. They do not count against MAX_CONNECTIONS."
        ),
    )
    max_pending_auth_per_address: int = Field(
        16,
        ge=1,
        le=1_000_000,
        description=(
            "Sockets one client address (see TRUSTED_PROXIES) may hold waiting for their "
            "first-frame auth; more get HTTP 429."
        ),
    )
    ws_compression: Literal["off", "on"] = Field(
        "off",
        description=(
            "permessage-deflate on WebSockets. off: never negotiated, whatever the client "
            "offers. on: negotiated, inflation bounded by WS_MAX_MESSAGE_BYTES (costs CPU per "
            "frame)."
        ),
    )

    # --- resume and shared state ---------------------------------------------------------------
    replay_max_frames: int = Field(
        2048,
        ge=0,
        le=1_000_000,
        description=(
            "Frames per session kept for a v2 client that reconnects with resume (also bounded "
            "by REPLAY_MAX_BYTES and the grace period); 0 disables resume."
        ),
    )
    replay_max_bytes: int = Field(
        256 * 1024,
        ge=0,
        le=1024 * 1024 * 1024,
        description=(
            "Encoded bytes per session kept for resume; the oldest frames go first. Only "
            "sessions that sent frames within the grace period hold any."
        ),
    )
    resume_wait_seconds: float = Field(
        2.0,
        ge=0,
        le=60,
        description=(
            "A v2 client re-attaching to a live session has this long to send resume before "
            "the gateway continues live without replaying; with several replicas, also how "
            "long a resume waits for frames the other replica sent but has not yet appended "
            "to the shared stream."
        ),
    )
    state_backend: Literal["sqlite", "memory", "redis"] = Field(
        "sqlite",
        description=(
            "Where ownership, per-user limits, session leases and replay streams live: sqlite "
            "(session owners in the file SQLITE_PATH, kept across restarts; the rest in this "
            "process), memory (all in this process, lost on restart: for tests) or redis "
            "(several replicas sharing REDIS_URL)."
        ),
    )
    sqlite_path: str = Field(
        "trio-gateway.sqlite3",
        min_length=1,
        max_length=4096,
        description=(
            "STATE_BACKEND=sqlite: the file that keeps session owners (created if missing; "
            "relative paths start at the working directory). Must be on a local disk; several "
            "gateway processes on one host may share it."
        ),
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis for STATE_BACKEND=redis (redis://[user:password@]host:port/db).",
    )
    redis_key_prefix: str = Field(
        "trio-gateway:",
        min_length=1,
        max_length=64,
        description="Prefix of every Redis key, so several deployments can share one Redis.",
    )
    redis_timeout: float = Field(
        0.5,
        gt=0,
        le=30,
        description=(
            "STATE_BACKEND=redis: seconds one Redis call may take; slower counts as Redis being "
            "unavailable (new sessions get 503, admitted traffic continues)."
        ),
    )
    session_lease_seconds: float = Field(
        15.0,
        gt=0,
        le=3600,
        description=(
            "STATE_BACKEND=redis: a replica holds a session's lease this long between renewals; "
            "a replica that dies releases its sessions after at most this long."
        ),
    )

    # --- server --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", min_length=1, description="Bind address of trio-gateway serve.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port of trio-gateway serve.")
    http_head_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a connection may take to send a complete request head (or WebSocket "
            "handshake), counted from its opening or from the end of the previous response; "
            "an idle keep-alive connection is closed after as long."
        ),
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "On SIGTERM/SIGINT: seconds to let running turns finish before every session is "
            "closed with 1012 and the process exits."
        ),
    )

    @field_validator("metrics_allow", "trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)  # raises ValueError naming the bad entry
        return value

    @property
    def metrics_networks(self) -> list[Network]:
        """Parsed ``metrics_allow``."""
        return parse_networks(self.metrics_allow)

    @property
    def trusted_proxy_networks(self) -> list[Network]:
        """Parsed ``trusted_proxies``."""
        return parse_networks(self.trusted_proxies)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        value = value.strip()
        return value.lower() if value.lower() in ("auto", "json", "text") else value.upper()

    @field_validator("ws_compression", mode="before")
    @classmethod
    def _lower_switch(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        from .limits import parse_origin_list

        parse_origin_list(value)  # raises ValueError with the bad entry named
        return value

    @field_validator("jwks_url")
    @classmethod
    def _optional_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("agent_url", "auth_service_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("sqlite_path")
    @classmethod
    def _sqlite_file(cls, value: str) -> str:
        # A path is opened as a plain file name: ":memory:" would be a database that nothing
        # shares and a restart loses, which is STATE_BACKEND=memory under another name.
        if value.strip() != value or not value.strip():
            raise ValueError("must be a file path without surrounding spaces")
        if value == ":memory:" or "\x00" in value:
            raise ValueError("must be a file path (for no file, use STATE_BACKEND=memory)")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        key = self.internal_api_key.get_secret_value().strip()
        weak = len(key) < MIN_INTERNAL_KEY_LENGTH or PLACEHOLDER_INTERNAL_KEY in key
        if not self.insecure_dev and weak:
            raise ValueError(
                "GATEWAY__INTERNAL_API_KEY is empty, the placeholder "
                f"'{PLACEHOLDER_INTERNAL_KEY}' or shorter than {MIN_INTERNAL_KEY_LENGTH} "
                "characters: set the runtime's real key "
                "(or GATEWAY__INSECURE_DEV=true for local development)"
            )
        return self

    @property
    def effective_jwks_url(self) -> str:
        """``jwks_url``, or the Auth Service's well-known location."""
        return self.jwks_url or f"{self.auth_service_url}/.well-known/jwks.json"

    @property
    def read_timeout(self) -> float:
        """Seconds without any inbound byte (pongs count) after which a peer is considered dead."""
        return self.ws_heartbeat_interval * 2 + 1


def describe_validation_error(error: ValidationError) -> str:
    """Turn a pydantic error into one line per bad variable, naming the environment variable."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        name = f"{ENV_PREFIX}{where.upper()}" if where else "settings"
        lines.append(f"{name}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (and ``.env``), raising :class:`SettingsError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None


def unknown_variables(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> list[str]:
    """``GATEWAY__*`` names in the environment (and ``.env``) that are no setting, each with a
    hint when it looks like a typo: ``GATEWAY__USE_JWT_AUTHH (did you mean
    GATEWAY__USE_JWT_AUTH?)``.

    pydantic-settings ignores unknown names (``extra="ignore"``: the environment holds plenty
    that is not ours), so a misspelt variable would silently leave its setting at the default.
    """
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    names = set(os.environ if environ is None else environ)
    if env_file is not None and Path(env_file).is_file():
        names |= {name for name in dotenv_values(env_file, encoding="utf-8") if name}
    unknown = sorted(
        name.upper()
        for name in names
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        described.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return described


def render_env_example() -> str:
    """The text of ``.env.example``: every setting, its default and its explanation.

    Regenerate the file with
    ``python -c "from trio_gateway.settings import render_env_example as r; print(r(), end='')"
    > .env.example``; a test fails when the two drift apart.
    """
    lines = [
        "# trio-gateway settings. Every variable is optional; the value shown is the default.",
        "# Copy to .env (read from the working directory) or set them in the environment.",
        "# A bad value stops the gateway at startup with a message naming the variable.",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        text = str(default).lower() if isinstance(default, bool) else str(default)
        lines += ["", f"# {field.description}", f"{ENV_PREFIX}{name.upper()}={text}"]
    return "\n".join(lines) + "\n"
