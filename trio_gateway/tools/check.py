"""``trio-gateway check``: the effective configuration and whether its dependencies answer.

An operator who deploys the gateway wants one command that says "this is what the process will
run with, and these are the things it needs that are (not) reachable from here", before real
users find out. The module is split the usual way: the top half is pure (redaction, formatting,
the Redis wire format, the verdict) and unit-testable without sockets; the bottom half does the
I/O (one HTTP GET per HTTP dependency, one TCP exchange with Redis, a look at the SQLite state
file), each bounded by a timeout
and reported as one :class:`CheckResult` rather than an exception.

Exit codes (:func:`exit_code`): 0 every check passed (skipped ones count as passed), 1 at least
one failed, 2 the configuration itself is invalid (the CLI returns 2 before any check runs).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import SplitResult, unquote, urlsplit

import httpx
import orjson
import trio
from pydantic import SecretStr

from ..security.auth import KeySet
from ..settings import ENV_PREFIX, Settings, unknown_variables

__all__ = [
    "EXIT_BAD_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "CheckResult",
    "RedisTarget",
    "check_http_health",
    "check_jwks",
    "check_redis",
    "check_runtime",
    "check_sqlite",
    "configuration_lines",
    "encode_redis_command",
    "exit_code",
    "format_report",
    "parse_redis_url",
    "redact_url",
    "run_checks",
    "verdict_line",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_BAD_CONFIG: Final = 2
REDACTED: Final = "***"
#: Default bound on each check, so a black-holed dependency gives a verdict instead of a hang.
DEFAULT_TIMEOUT: Final = 5.0
#: Redis replies we read for PING are one short line; more than this is not Redis.
_MAX_REDIS_REPLY: Final = 4096

Status = Literal["ok", "FAIL", "skipped"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: which dependency, where, the verdict and one line of detail."""

    name: str
    target: str
    status: Status
    detail: str

    @property
    def passed(self) -> bool:
        """True unless the check failed (a skipped check is not a failure)."""
        return self.status != "FAIL"


# --- pure part: redaction and formatting ------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo (if any) replaced by ``***``.

    ``redis://user:secret@host:6379/0`` becomes ``redis://user:***@host:6379/0``; a URL without
    a password, or text that is not a URL, comes back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    if not has_password:
        return url
    netloc = f"{user}:{REDACTED}@{hostinfo}"
    return SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment).geturl()


def _display(name: str, value: Any) -> str:
    """One setting's value as printed: secrets redacted, URLs without passwords."""
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        if "://" in secret:
            # A URL secret (redis_url): the host and database matter for debugging, the
            # password never does.
            return redact_url(secret)
        return f"{REDACTED} (set, {len(secret)} characters)" if secret else "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return redact_url(text) if "://" in text else text


def configuration_lines(settings: Settings) -> list[str]:
    """Every setting as ``GATEWAY__NAME = value`` (secrets redacted), plus derived values."""
    names = [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]
    width = max(len(name) for name in names)
    lines = [
        f"{env_name:<{width}} = {_display(name, getattr(settings, name))}"
        for env_name, name in zip(names, Settings.model_fields, strict=True)
    ]
    lines.append(f"{'(effective JWKS URL)':<{width}} = {redact_url(settings.effective_jwks_url)}")
    return lines


def exit_code(results: Iterable[CheckResult]) -> int:
    """0 when every check passed or was skipped, 1 when any failed."""
    return EXIT_OK if all(result.passed for result in results) else EXIT_FAILED


def verdict_line(results: Sequence[CheckResult]) -> str:
    """The overall verdict, one line, e.g. ``verdict: FAIL (1 of 3 checks failed)``."""
    failed = sum(1 for result in results if not result.passed)
    ran = sum(1 for result in results if result.status != "skipped")
    if failed:
        return f"verdict: FAIL ({failed} of {ran} {'check' if ran == 1 else 'checks'} failed)"
    return f"verdict: OK ({ran} {'check' if ran == 1 else 'checks'} passed)"


def format_report(settings: Settings, results: Sequence[CheckResult]) -> str:
    """The whole report: configuration, one line per check, the verdict line."""
    lines = ["effective configuration:"]
    lines += [f"  {line}" for line in configuration_lines(settings)]
    unknown = unknown_variables()
    if unknown:
        lines += ["", "unknown variables (ignored; a typo leaves its setting at the default):"]
        lines += [f"  {name}" for name in unknown]
    lines += ["", "checks:"]
    name_width = max((len(result.name) for result in results), default=0)
    for result in results:
        lines.append(
            f"  [{result.status:^7}] {result.name:<{name_width}}  {result.target}: {result.detail}"
        )
    lines += ["", verdict_line(results)]
    return "\n".join(lines) + "\n"


# --- pure part: the Redis wire format ---------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to reach Redis, parsed from ``redis_url``."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    db: int

    @property
    def display(self) -> str:
        """``host:port`` (and db), never the password."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``redis://[user[:password]@]host[:port][/db]`` (``rediss://`` for TLS).

    Raises :class:`ValueError` with a message that never contains the password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ValueError("REDIS_URL is not a valid URL") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"REDIS_URL must start with redis:// or rediss://, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("REDIS_URL has no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"REDIS_URL database must be a number, not {path!r}")
    return RedisTarget(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=int(path) if path else 0,
    )


def encode_redis_command(*args: str) -> bytes:
    """One command in RESP (the Redis protocol): an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def redis_commands(target: RedisTarget) -> list[tuple[str, ...]]:
    """What the check sends: AUTH when there is a password, SELECT for a non-zero db, PING."""
    commands: list[tuple[str, ...]] = []
    if target.password is not None:
        auth = (target.username, target.password) if target.username else (target.password,)
        commands.append(("AUTH", *auth))
    if target.db:
        commands.append(("SELECT", str(target.db)))
    commands.append(("PING",))
    return commands


# --- I/O part -----------------------------------------------------------------------------------


async def check_runtime(settings: Settings, http: httpx.AsyncClient) -> CheckResult:
    """``GET {agent_url}/health`` answers 200 (it is the runtime's one public route)."""
    return await _check_health("agent runtime", settings.agent_url, http)


async def check_http_health(name: str, base_url: str, timeout: float) -> CheckResult:
    """``GET {base_url}/health`` answers 200, bounded by ``timeout`` (``check --demo``'s
    check of the demo's gateway itself)."""
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
        return await _check_health(name, base_url, http)


async def _check_health(name: str, base_url: str, http: httpx.AsyncClient) -> CheckResult:
    url = f"{base_url}/health"
    target = redact_url(url)
    try:
        answer = await http.get(url)
    except httpx.HTTPError as error:
        return CheckResult(name, target, "FAIL", _http_error(error))
    if answer.status_code != 200:
        return CheckResult(name, target, "FAIL", f"HTTP {answer.status_code}")
    detail = "HTTP 200"
    try:
        body = orjson.loads(answer.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        facts = [f"{key} {body[key]}" for key in ("service", "status", "version") if key in body]
        if facts:
            detail += f" ({', '.join(str(fact) for fact in facts)})"
    return CheckResult(name, target, "ok", detail)


async def check_jwks(settings: Settings, http: httpx.AsyncClient) -> CheckResult:
    """The JWKS downloads and holds at least one usable signature key (when JWT is on)."""
    url = settings.effective_jwks_url
    target = redact_url(url)
    if not settings.use_jwt_auth:
        return CheckResult("JWKS", target, "skipped", "USE_JWT_AUTH is false")
    try:
        answer = await http.get(url)
    except httpx.HTTPError as error:
        return CheckResult("JWKS", target, "FAIL", _http_error(error))
    if answer.status_code != 200:
        return CheckResult("JWKS", target, "FAIL", f"HTTP {answer.status_code}")
    try:
        keys = KeySet.from_jwks(orjson.loads(answer.content))
    except (orjson.JSONDecodeError, ValueError) as error:
        return CheckResult("JWKS", target, "FAIL", f"not a JWKS: {error}")
    skipped = f", {keys.skipped} unusable skipped" if keys.skipped else ""
    if not keys:
        return CheckResult("JWKS", target, "FAIL", f"no usable signature key{skipped}")
    kids = ", ".join(sorted(keys))
    return CheckResult("JWKS", target, "ok", f"{len(keys)} key(s): {kids}{skipped}")


async def check_redis(settings: Settings, timeout: float) -> CheckResult:
    """TCP connect to Redis, AUTH/SELECT when configured, ``PING`` answered with ``+PONG``.

    A raw socket and a few bytes of RESP are enough to prove "reachable and speaking Redis
    with these credentials"; no client library is needed for that.
    """
    if settings.state_backend != "redis":
        shown = redact_url(settings.redis_url.get_secret_value())
        return CheckResult("redis", shown, "skipped", f"STATE_BACKEND is {settings.state_backend}")
    try:
        target = parse_redis_url(settings.redis_url.get_secret_value())
    except ValueError as error:
        return CheckResult("redis", "REDIS_URL", "FAIL", str(error))
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout):
            if target.tls:
                stream = await trio.open_ssl_over_tcp_stream(
                    target.host, target.port, ssl_context=ssl.create_default_context()
                )
            else:
                stream = await trio.open_tcp_stream(target.host, target.port)
            reply = ""
            for command in redis_commands(target):
                await stream.send_all(encode_redis_command(*command))
                reply = await _read_redis_line(stream)
                if not reply.startswith("+"):
                    # Never echo our own command back: AUTH carries the password.
                    return CheckResult("redis", target.display, "FAIL", f"{command[0]}: {reply}")
    except trio.TooSlowError:
        return CheckResult("redis", target.display, "FAIL", f"no answer within {timeout:g} s")
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as error:
        return CheckResult("redis", target.display, "FAIL", _os_error(error))
    except ValueError as error:
        return CheckResult("redis", target.display, "FAIL", str(error))
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
    if reply != "+PONG":
        return CheckResult("redis", target.display, "FAIL", f"PING answered {reply!r}")
    return CheckResult("redis", target.display, "ok", "PONG")


async def check_sqlite(settings: Settings, timeout: float) -> CheckResult:
    """The state file (``STATE_BACKEND=sqlite``) can be created, or opened and written, and
    holds a schema this version knows. Changes nothing (see ``sqlite_store.inspect_database``).
    """
    from ..state.sqlite_store import SqliteStateError, inspect_database

    target = settings.sqlite_path
    if settings.state_backend != "sqlite":
        return CheckResult(
            "sqlite", target, "skipped", f"STATE_BACKEND is {settings.state_backend}"
        )
    # In a thread, abandoned at the timeout: a file on a hung mount must not hang the check.
    with trio.move_on_after(timeout):
        try:
            detail = await trio.to_thread.run_sync(inspect_database, target, abandon_on_cancel=True)
        except SqliteStateError as error:
            return CheckResult("sqlite", target, "FAIL", str(error))
        return CheckResult("sqlite", target, "ok", detail)
    return CheckResult("sqlite", target, "FAIL", f"no answer within {timeout:g} s")


async def _read_redis_line(stream: trio.abc.Stream) -> str:
    """One CRLF-terminated reply line (status ``+...`` or error ``-...``)."""
    data = b""
    while b"\r\n" not in data:
        chunk = await stream.receive_some(_MAX_REDIS_REPLY)
        if not chunk:
            raise ValueError("the server closed the connection without answering")
        data += chunk
        if len(data) > _MAX_REDIS_REPLY:
            raise ValueError("the answer is not Redis (no line end)")
    return data.split(b"\r\n", 1)[0].decode("utf-8", "replace")


async def run_checks(settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> list[CheckResult]:
    """Run every check concurrently; results in a fixed order (runtime, JWKS, Redis, SQLite)."""
    results: list[CheckResult | None] = [None, None, None, None]
    # trust_env=False: the gateway itself does not use proxy variables to reach its runtime,
    # so neither should the check that claims to reproduce what the gateway sees.
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:

        async def runtime() -> None:
            results[0] = await check_runtime(settings, http)

        async def jwks() -> None:
            results[1] = await check_jwks(settings, http)

        async def redis() -> None:
            results[2] = await check_redis(settings, timeout)

        async def sqlite() -> None:
            results[3] = await check_sqlite(settings, timeout)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(runtime)
            nursery.start_soon(jwks)
            nursery.start_soon(redis)
            nursery.start_soon(sqlite)
    return [result for result in results if result is not None]


def _http_error(error: httpx.HTTPError) -> str:
    """One line for an httpx failure, naming the OS reason (refused, unknown host) if any."""
    if isinstance(error, httpx.TimeoutException):
        return f"timed out ({type(error).__name__})"
    reason = _os_reason(error)
    if reason:
        return f"unreachable ({reason})"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _os_error(error: BaseException) -> str:
    """One line for a socket failure."""
    reason = _os_reason(error)
    return f"unreachable ({reason or f'{type(error).__name__}: {error}'})"


def _os_reason(error: BaseException) -> str | None:
    """The ``strerror`` of the first OS error behind ``error``.

    trio reports a failed connect as "all attempts to connect ... failed" with the real reasons
    (e.g. "Connection refused") one or two causes down, sometimes inside an exception group.
    """
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None
