"""Header smuggling, for ``tests/hostile/test_fuzz_headers.py`` and ``bench/fuzz.py``.

Random REST requests whose headers come from the families a proxy must never pass on
(forwarding and address headers, method overrides, path rewrites, identity claims, the gateway's
own ``X-User-ID``/``X-Internal-Auth`` in any case and with underscores, hop-by-hop headers and
names listed in ``Connection``), mixed with allow-listed and random headers, sent over raw TCP
to a :class:`~tests.support.fuzzing_gateway.FuzzGateway`. :func:`check_smuggling` then reads
what the demo runtime received and says what, if anything, leaked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from hypothesis import strategies as st

from .fuzzing_exchange import HttpAnswer, raw_request
from .fuzzing_gateway import INTERNAL_KEY, FuzzGateway
from .fuzzing_strategies import _TCHAR, header_values

# The documented allow-list of client headers (docs/security.md) and what the gateway sets.
ALLOWED = frozenset(
    {
        "accept", "accept-language", "cache-control", "content-type", "if-match",
        "if-modified-since", "if-none-match", "if-unmodified-since", "user-agent",
    }
)  # fmt: skip
GATEWAY_SET = frozenset(
    {
        "host", "content-length", "x-internal-auth", "x-user-id", "x-user-scopes",
        "x-request-id", "x-forwarded-for", "x-forwarded-proto",
    }
)  # fmt: skip

DANGEROUS = [
    "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port",
    "X-Forwarded-Server", "X-Forwarded-Prefix", "X-Forwarded-User", "Forwarded", "X-Real-IP",
    "X-Client-IP", "True-Client-IP", "CF-Connecting-IP", "X-Cluster-Client-IP",
    "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-Method",
    "X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "Remote-User", "X-Remote-User",
    "X-Auth-User", "X-User", "X-User-ID", "X-User-Scopes", "X-Internal-Auth", "Remote-Addr",
    "Authorization", "Cookie", "Proxy-Authorization", "Keep-Alive", "TE", "Trailer",
    "Proxy-Connection", "Accept-Encoding", "Content-Encoding", "X-Request-ID",
]  # fmt: skip
# Request framing and protocol switches belong to other proofs (tests/hostile/test_fuzz.py);
# here they would only make a request hang or leave HTTP/1.1.
FRAMING = frozenset(
    {"host", "content-length", "transfer-encoding", "expect", "upgrade", "http2-settings"}
)
DANGEROUS_VALUES = [
    "127.0.0.1", "6.6.6.6", "for=6.6.6.6;proto=https", "admin", "internal-service", "DELETE",
    "/events/metrics/sessions", "https", INTERNAL_KEY, "Bearer x", "*", "",
]  # fmt: skip
ROUTES = [
    ("GET", "/api/v1/agents", b""),
    ("GET", "/api/v1/sessions/smuggle-1", b""),
    ("GET", "/api/v1/events/stats", b""),
    ("PATCH", "/api/v1/sessions/smuggle-1", b'{"title": "t"}'),
    ("POST", "/api/v1/sessions", b"{}"),
]


@st.composite
def spellings(draw: st.DrawFn, name: str) -> str:
    """``name`` as some client might spell it: any case, hyphens or underscores."""
    if draw(st.booleans()):
        name = name.replace("-", "_")
    style = draw(st.sampled_from(["as-is", "lower", "upper", "random"]))
    if style == "lower":
        return name.lower()
    if style == "upper":
        return name.upper()
    if style == "random":
        flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
        pairs = zip(name, flips, strict=True)
        return "".join(c.upper() if flip else c.lower() for c, flip in pairs)
    return name


header_name = st.one_of(
    st.sampled_from(DANGEROUS).flatmap(spellings),
    st.sampled_from(sorted(ALLOWED)).flatmap(spellings),
    st.text(alphabet=_TCHAR, min_size=1, max_size=20),
).filter(lambda name: name.lower() not in FRAMING)
header_value = st.one_of(st.sampled_from(DANGEROUS_VALUES), header_values)


@dataclass
class SmugglingRequest:
    """One request: its bytes and the marker ``X-Request-ID`` that finds it at the runtime."""

    method: str
    path: str
    marker: str
    headers: list[tuple[str, str]]
    data: bytes


@st.composite
def smuggling_requests(draw: st.DrawFn) -> SmugglingRequest:
    """A REST request carrying up to a dozen hostile headers, maybe a ``Connection`` list."""
    method, path, body = draw(st.sampled_from(ROUTES))
    headers = draw(st.lists(st.tuples(header_name, header_value), min_size=1, max_size=12))
    if draw(st.booleans()):
        named = draw(st.lists(st.sampled_from([n for n, _ in headers] + ["keep-alive"])))
        headers.append(("Connection", ", ".join(n for n in named if n.lower() not in FRAMING)))
    marker = uuid.uuid4().hex
    # The marker goes first: the gateway keeps the first sane X-Request-ID it sees.
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"X-Request-ID: {marker}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return SmugglingRequest(method, path, marker, headers, data)


async def send_smuggling(gateway: FuzzGateway, request: SmugglingRequest) -> HttpAnswer:
    """Send one request to the gateway over a fresh TCP connection."""
    return await raw_request(gateway.port, request.data)


def check_smuggling(
    gateway: FuzzGateway, request: SmugglingRequest, answer: HttpAnswer
) -> list[str]:
    """Problems with what the runtime received for ``request`` (empty: nothing leaked)."""
    runtime = gateway.runtime
    assert runtime is not None
    recorded = gateway.run_sync_in_loop(lambda: list(runtime.rest_headers))
    mine = [lines for lines in recorded if ("x-request-id", request.marker) in lines]
    problems: list[str] = []
    if answer.status is not None and answer.status >= 500:
        problems.append(f"5xx answer: {answer.head!r}")
    if not mine:
        if answer.status is not None and 200 <= answer.status < 300:
            problems.append(f"answered {answer.status} but the runtime saw no request")
        return problems
    lines = mine[-1]
    names = [name for name, _ in lines]
    leaked = sorted(set(names) - ALLOWED - GATEWAY_SET)
    if leaked:
        problems.append(f"leaked to the runtime: {leaked}")
    hop_by_hop = {
        token.strip().lower()
        for name, value in request.headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    if forwarded := sorted(hop_by_hop & (set(names) - GATEWAY_SET)):
        problems.append(f"headers named in Connection were forwarded: {forwarded}")
    expected = {
        "x-internal-auth": INTERNAL_KEY,
        "x-user-id": "anonymous",
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-request-id": request.marker,
    }
    for name, value in expected.items():
        values = [v for n, v in lines if n == name]
        if values != [value]:
            problems.append(f"{name} reached the runtime as {values!r}, not [{value!r}]")
    if names.count("x-user-scopes") != 1:
        problems.append(f"x-user-scopes reached the runtime {names.count('x-user-scopes')} times")
    return problems
