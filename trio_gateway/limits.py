"""Sans-IO admission limits: token-bucket rate limits, connection counts and Origin checks.

Nothing here reads a clock or does I/O. Callers pass the current time as ``now`` (seconds,
from a monotonic clock such as :func:`trio.current_time`), so every rule can be tested by
stepping time by hand. There is no module-level state: each app builds its own objects.

* :class:`TokenBucket` / :class:`RateLimiter`: ``rate`` tokens per second, at most ``burst``
  saved up; the limiter keeps one bucket per key (user id) in bounded memory.
* :class:`ConnectionCounter`: concurrent connections per key and in total.
* :class:`OriginPolicy` / :func:`parse_origin_list`: which browser ``Origin`` values may open
  a connection (cross-site WebSocket hijacking protection).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal, NamedTuple

import trio

__all__ = [
    "ConnectionCounter",
    "ConnectionRefusal",
    "OriginPolicy",
    "RateLimiter",
    "TokenBucket",
    "parse_origin_list",
]

# Float tolerance of a bucket, as a fraction of ``burst + rate``: a take succeeds when it is at
# most this far short, so that waiting exactly ``retry_after`` seconds always suffices despite
# rounding. It is far below anything observable (one nanosecond of refill, a billionth of the
# burst) and can over-grant by at most that much over the bucket's whole life, not per take.
_SLACK = 1e-9

# Most idle buckets one RateLimiter.check evicts, so that a check after a long quiet spell does
# bounded work. Each check adds at most one bucket, so idle buckets still drain; RateLimiter.sweep
# evicts them all at once.
_EVICT_BATCH = 64


def _require_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


class TokenBucket:
    """A token bucket: refills at ``rate`` tokens per second up to ``burst``; starts full.

    Time starts at the first ``now`` the bucket is given. ``now`` should come from a monotonic
    clock; if it ever goes backwards the bucket treats it as "no time has passed" (it never
    refills twice for the same interval).

    A ``cost`` above ``burst`` can never be paid: :meth:`try_take` refuses it and
    :meth:`retry_after` returns ``math.inf``. With ``rate == 0`` the bucket never refills.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        _require_finite("rate", rate)
        _require_finite("burst", burst)
        if rate < 0:
            raise ValueError(f"rate must be >= 0 tokens per second, got {rate!r}")
        if burst <= 0:
            raise ValueError(f"burst must be > 0 tokens, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last: float | None = None

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate!r}, burst={self.burst!r}, tokens={self._tokens!r})"

    @property
    def last_update(self) -> float | None:
        """The latest ``now`` this bucket has seen in :meth:`try_take` (None before the first)."""
        return self._last

    def _level(self, now: float) -> float:
        """Tokens available at ``now``, without changing the bucket."""
        _require_finite("now", now)
        if self._last is None or now <= self._last:
            return self._tokens
        return min(self.burst, self._tokens + (now - self._last) * self.rate)

    def _slack(self) -> float:
        return _SLACK * (self.burst + self.rate)

    def available(self, now: float) -> float:
        """Tokens available at ``now`` (may be a hair below zero right after a take)."""
        return self._level(now)

    def try_take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if the bucket holds them at ``now``; return whether it did.

        A refused take consumes nothing, so a client that keeps retrying too early is not
        punished beyond the refusal itself.
        """
        _check_cost(cost)
        level = self._level(now)
        self._tokens = level
        if self._last is None or now > self._last:
            self._last = now
        if cost - level <= self._slack():
            self._tokens = level - cost
            return True
        return False

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds from ``now`` until :meth:`try_take` of ``cost`` would succeed.

        ``0.0`` when it would succeed now; ``math.inf`` when it never can (``cost > burst``, or
        ``rate == 0`` and too few tokens). Exact: a take at ``now + retry_after(now)`` succeeds
        and any take noticeably earlier fails. Does not change the bucket.
        """
        _check_cost(cost)
        deficit = cost - self._level(now)
        slack = self._slack()
        if deficit <= slack:
            return 0.0
        if cost > self.burst + slack or self.rate == 0:
            return math.inf
        return deficit / self.rate


def _check_cost(cost: float) -> None:
    _require_finite("cost", cost)
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost!r}")


class RateLimiter:
    """One :class:`TokenBucket` per key (a user id), in bounded memory.

    Buckets live in an LRU-ordered :class:`~collections.OrderedDict`. Each :meth:`check`
    first evicts buckets idle for longer than ``idle_ttl`` seconds from the old end (at most a
    small batch per call; :meth:`sweep` evicts them all), then, when a new key would exceed
    ``max_keys``, the least recently used bucket.

    **An evicted key starts again with a full bucket.** That is the deliberate direction: an
    overloaded or attacked limiter forgets and lets a user burst again instead of growing
    without bound or refusing legitimate users. With ``idle_ttl >= burst / rate`` an idle
    eviction is invisible (the bucket would have refilled completely anyway); a shorter
    ``idle_ttl`` lets a user who waits ``idle_ttl`` get a full bucket early. LRU eviction only
    affects users once more than ``max_keys`` keys are active at the same time, so size
    ``max_keys`` well above the number of concurrently active users.
    """

    def __init__(
        self, rate: float, burst: float, *, max_keys: int = 100_000, idle_ttl: float = 600
    ) -> None:
        TokenBucket(rate, burst)  # validate rate and burst once, up front
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        _require_finite("idle_ttl", idle_ttl)
        if idle_ttl < 0:
            raise ValueError(f"idle_ttl must be >= 0 seconds, got {idle_ttl!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.idle_ttl = float(idle_ttl)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        """How many keys currently have a bucket."""
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` currently has a bucket (a key without one starts full)."""
        return key in self._buckets

    def check(self, key: str, now: float, cost: float = 1.0) -> tuple[bool, float]:
        """Charge ``cost`` to ``key`` at ``now``: ``(allowed, retry_after_seconds)``.

        ``retry_after`` is ``0.0`` when allowed, else the exact wait until the same request
        would be allowed (``math.inf`` if it never can: ``cost > burst``).
        """
        _check_cost(cost)
        _require_finite("now", now)
        self._evict_idle(now, _EVICT_BATCH)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if bucket.try_take(now, cost):
            return True, 0.0
        return False, bucket.retry_after(now, cost)

    def sweep(self, now: float) -> int:
        """Evict every bucket idle for longer than ``idle_ttl`` at ``now``; return how many."""
        _require_finite("now", now)
        return self._evict_idle(now, None)

    def _evict_idle(self, now: float, limit: int | None) -> int:
        """Pop idle buckets from the least recently used end, at most ``limit`` of them."""
        evicted = 0
        buckets = self._buckets
        while buckets and (limit is None or evicted < limit):
            oldest = next(iter(buckets.values()))
            last = oldest.last_update
            # Ordered by last use, so the first bucket still in use ends the scan (if a clock
            # went backwards the order may be slightly off, which only delays an eviction).
            if last is not None and now - last <= self.idle_ttl:
                break
            buckets.popitem(last=False)
            evicted += 1
        return evicted


ConnectionRefusal = Literal["per_user", "total"]


class ConnectionCounter:
    """Concurrent connections per key (user id) and in total, each with a limit.

    Grant with :meth:`try_acquire`, and call :meth:`release` exactly once for every grant
    (in a ``finally``). Keys whose count drops to zero are forgotten, so memory follows the
    number of users currently connected.
    """

    def __init__(self, per_key_limit: int, total_limit: int) -> None:
        if per_key_limit < 0:
            raise ValueError(f"per_key_limit must be >= 0, got {per_key_limit!r}")
        if total_limit < 0:
            raise ValueError(f"total_limit must be >= 0, got {total_limit!r}")
        self.per_key_limit = per_key_limit
        self.total_limit = total_limit
        self._counts: dict[str, int] = {}
        self._total = 0

    def __len__(self) -> int:
        """How many keys hold at least one connection."""
        return len(self._counts)

    @property
    def total(self) -> int:
        """Connections currently held across all keys."""
        return self._total

    def count(self, key: str) -> int:
        """Connections ``key`` currently holds."""
        return self._counts.get(key, 0)

    def try_acquire(self, key: str) -> ConnectionRefusal | None:
        """Count one more connection for ``key``: None when granted, else why it was refused.

        ``"per_user"`` when ``key`` is at its own limit (checked first: it is the answer that
        stays true however the others behave), ``"total"`` when the gateway as a whole is full.
        A refused attempt changes nothing.
        """
        held = self._counts.get(key, 0)
        if held >= self.per_key_limit:
            return "per_user"
        if self._total >= self.total_limit:
            return "total"
        self._counts[key] = held + 1
        self._total += 1
        return None

    def release(self, key: str) -> None:
        """Give back one connection of ``key``.

        Raises ValueError if ``key`` holds none: a release without a grant is a bug in the
        caller, and silently ignoring it would hide a double release.
        """
        held = self._counts.get(key, 0)
        if held <= 0:
            raise ValueError(f"release({key!r}) without a matching try_acquire")
        if held == 1:
            del self._counts[key]
        else:
            self._counts[key] = held - 1
        self._total -= 1


# --- Origin checks ---------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# scheme "://" host [":" port], nothing else: no userinfo, path, query, fragment or whitespace.
_ORIGIN_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-*]+)"
    r"(?::(?P<port>[0-9]+))?"
)
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")


class _Origin(NamedTuple):
    """A normalised origin: lowercase scheme and host, port None when it is the default."""

    scheme: str
    host: str
    port: int | None

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" + ("" if self.port is None else f":{self.port}")


def _explain_bad_shape(value: str) -> str:
    """A human-readable reason why ``value`` is not of the form scheme://host[:port]."""
    if value == "null":
        return "the 'null' origin (sandboxed frames, file: pages) can never be allowed"
    if value != value.strip() or any(c.isspace() for c in value):
        return "it contains whitespace"
    if "://" not in value:
        return "expected scheme://host[:port], e.g. https://app.example.com"
    rest = value.split("://", 1)[1]
    if "@" in rest:
        return "an origin has no user info ('user@')"
    if rest.endswith("/") and "/" not in rest[:-1]:
        return "an origin has no path: drop the trailing '/'"
    if any(c in rest for c in "/?#\\"):
        return "an origin has no path, query or fragment"
    return "expected scheme://host[:port] with an ASCII hostname (punycode), IPv4 or [IPv6]"


def _parse_host(host: str, *, wildcard: bool) -> str:
    """Validate and lowercase a hostname, IPv4 address or bracketed IPv6 address."""
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
        if wildcard:
            raise ValueError("a wildcard needs a domain name, not an IP address")
        return f"[{address.compressed}]"
    host = host.lower()
    if len(host) > 253:
        raise ValueError("the hostname is longer than 253 characters")
    labels = host.split(".")
    if labels[-1].isdigit():  # looks numeric: must be a canonical dotted-quad IPv4 address
        if wildcard:
            raise ValueError("a wildcard needs a domain name, not an IP address")
        parts = labels
        if len(parts) != 4 or not all(
            p.isdigit() and int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in parts
        ):
            raise ValueError(f"{host!r} is not a valid dotted-quad IPv4 address")
        return host
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            if label == "":
                raise ValueError(f"{host!r} has an empty label (stray or trailing '.')")
            raise ValueError(f"{host!r} has an invalid label {label!r}")
    return host


def _parse_origin(value: str, *, allow_wildcard: bool = False) -> _Origin:
    """Strictly parse ``value`` as scheme://host[:port] and normalise it.

    With ``allow_wildcard``, the host may start with ``*.`` (returned as-is in the host, e.g.
    ``*.example.com``). Raises ValueError with a reason on anything else.
    """
    match = _ORIGIN_RE.fullmatch(value)
    if match is None:
        raise ValueError(_explain_bad_shape(value))
    scheme = match["scheme"].lower()
    raw_host: str = match["host"]
    wildcard = raw_host.startswith("*.")
    if "*" in (raw_host[2:] if wildcard else raw_host):
        raise ValueError("'*' may only stand alone or as the whole first label ('https://*.a.b')")
    if wildcard and not allow_wildcard:
        raise ValueError("a wildcard is not an origin")
    host = _parse_host(raw_host[2:] if wildcard else raw_host, wildcard=wildcard)
    port: int | None = None
    raw_port = match["port"]
    if raw_port is not None:
        if raw_port.startswith("0") or len(raw_port) > 5 or not 1 <= int(raw_port) <= 65535:
            raise ValueError(f"port {raw_port!r} is not a number from 1 to 65535")
        port = int(raw_port)
        if _DEFAULT_PORTS.get(scheme) == port:
            port = None
    return _Origin(scheme, f"*.{host}" if wildcard else host, port)


def _parse_entry(entry: str) -> _Origin | None:
    """Parse one allow-list entry: None for ``*``, else an exact or wildcard origin."""
    if entry == "*":
        return None
    return _parse_origin(entry, allow_wildcard=True)


class OriginPolicy:
    """Which values of the ``Origin`` request header are accepted.

    Entries (validated up front; ValueError on a malformed one):

    * ``scheme://host[:port]``: exactly that origin. Scheme and host compare case-insensitively
      and a default port (http 80, https 443) equals no port. Other ports must match exactly.
    * ``scheme://*.domain[:port]``: any origin with that scheme and port whose host is a
      *proper* subdomain of ``domain`` at any depth (``https://*.example.com`` allows
      ``https://a.example.com`` and ``https://a.b.example.com`` but not ``https://example.com``).
    * ``*``: any well-formed origin (for development).

    In :meth:`allows`, a missing header (None; native clients such as IDEs send none) is
    always allowed, while ``null``, malformed values and values with anything after the port
    (a path, even ``/``) are always refused, even with ``*``. An empty allow-list therefore
    refuses every browser but still admits native clients.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        if isinstance(allowed, str):
            raise TypeError(
                "OriginPolicy takes an iterable of origins, not one string "
                "(use parse_origin_list for a comma-separated setting)"
            )
        self.allow_all = False
        exact: set[_Origin] = set()
        wildcards: set[tuple[str, str, int | None]] = set()
        for entry in allowed:
            try:
                origin = _parse_entry(entry)
            except ValueError as error:
                raise ValueError(f"invalid allowed origin {entry!r}: {error}") from None
            if origin is None:
                self.allow_all = True
            elif origin.host.startswith("*."):
                # Keep the leading dot: the host must end with ".example.com", so neither
                # "example.com" nor "evilexample.com" matches.
                wildcards.add((origin.scheme, origin.host[1:], origin.port))
            else:
                exact.add(origin)
        self._exact = frozenset(exact)
        self._wildcards = tuple(sorted(wildcards, key=str))

    def __repr__(self) -> str:
        entries = sorted(str(o) for o in self._exact)
        entries += [str(_Origin(s, "*" + suffix, p)) for s, suffix, p in self._wildcards]
        if self.allow_all:
            entries.append("*")
        return f"OriginPolicy({entries!r})"

    def allows(self, origin: str | None) -> bool:
        """Whether a request carrying this ``Origin`` header value may proceed."""
        if origin is None:
            return True
        try:
            parsed = _parse_origin(origin)
        except ValueError:
            return False
        if self.allow_all or parsed in self._exact:
            return True
        return any(
            parsed.scheme == scheme and parsed.port == port and parsed.host.endswith(suffix)
            for scheme, suffix, port in self._wildcards
        )


def parse_origin_list(text: str) -> list[str]:
    """Parse a comma-separated allow-list setting into normalised entries.

    Whitespace around entries and empty entries (a trailing comma) are ignored, so ``""``
    gives ``[]``. Entries come back normalised (lowercase, default ports dropped), ready for
    :class:`OriginPolicy`. A malformed entry raises ValueError naming it and saying why.
    """
    entries: list[str] = []
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        try:
            origin = _parse_entry(entry)
        except ValueError as error:
            raise ValueError(
                f"invalid origin {entry!r} (entry {position} of the allow-list): {error}"
            ) from None
        entries.append("*" if origin is None else str(origin))
    return entries


async def acquire_within(limiter: trio.CapacityLimiter, wait: float) -> bool:
    """Take a slot of ``limiter``, waiting at most ``wait`` seconds.

    A free slot is taken even when ``wait`` is 0 (``move_on_after(0)`` alone would cancel
    the acquire before it could succeed).
    """
    try:
        limiter.acquire_nowait()
        return True
    except trio.WouldBlock:
        pass
    with trio.move_on_after(wait):
        await limiter.acquire()
        return True
    return False
