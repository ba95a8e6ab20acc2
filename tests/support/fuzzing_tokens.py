"""Token fuzzing, shared by ``tests/hostile/test_fuzz_tokens.py`` and ``bench/fuzz.py``: hypothesis
draws refused tokens (forged, rogue keys, unknown kids, expired, wrong audience, unscoped,
garbage) and :func:`check_token` offers each at one door of a JWT-on :class:`FuzzGateway`: the
``Authorization`` header of a handshake, a ``bearer.<token>`` subprotocol entry, a REST route or
the first-frame ``auth`` message."""

from __future__ import annotations

import base64
import json
from typing import Any

import trio
from hypothesis import strategies as st

from trio_gateway.tools.dev_auth import DevIssuer

from .fuzzing_exchange import raw_request
from .fuzzing_gateway import FuzzGateway, FuzzStats
from .fuzzing_wire import OP_CLOSE, OP_TEXT, encode_frame

ROGUE = DevIssuer(kid="fuzz-main")  # same kid as the real issuer, another key
OTHER = DevIssuer(kid="unknown-kid")
REFUSED = frozenset({401, 403, 431})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)]
    )


def claims(**extra: Any) -> dict[str, Any]:
    now = 1_900_000_000
    base: dict[str, Any] = {
        "iss": "https://auth.codelab.local",
        "aud": "codelab-api",
        "sub": "fuzz",
    }
    base.update(iat=now, exp=now + 900, type="access", scope="api:read api:write")
    base.update(extra)
    return base


TOKEN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@st.composite
def bad_tokens(draw: st.DrawFn, gateway_issuer: DevIssuer) -> tuple[str, bool]:
    """(token, valid_but_unscoped): a refused token, and whether it is a valid one without the
    write scope (403 rather than 401)."""
    kind = draw(
        st.sampled_from(
            ["garbage", "segments", "alg_none", "hs256", "rogue_key", "unknown_kid", "expired",
             "wrong_aud", "wrong_iss", "refresh", "no_scope", "embedded_jwk", "huge",
             "mutated"]
        )
    )  # fmt: skip
    if kind == "garbage":
        return draw(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=300)), False
    if kind == "segments":
        parts = draw(st.lists(st.binary(max_size=60).map(b64), min_size=1, max_size=5))
        return ".".join(parts), False
    if kind == "alg_none":
        alg = draw(st.sampled_from(["none", "None", "NONE", "nOnE", ""]))
        return forged({"alg": alg, "kid": "fuzz-main"}, claims()), False
    if kind == "hs256":
        return forged({"alg": "HS256", "kid": "fuzz-main"}, claims(), b"x" * 32), False
    if kind == "rogue_key":
        return ROGUE.mint("fuzz"), False
    if kind == "unknown_kid":
        return OTHER.mint("fuzz"), False
    if kind == "expired":
        return gateway_issuer.mint("fuzz", lifetime=60, now=1_000_000_000), False
    if kind == "wrong_aud":
        return gateway_issuer.mint("fuzz", audience=draw(st.text(max_size=20))), False
    if kind == "wrong_iss":
        return gateway_issuer.mint("fuzz", issuer="https://evil.example"), False
    if kind == "refresh":
        return gateway_issuer.mint("fuzz", token_type="refresh"), False
    if kind == "no_scope":
        scopes = draw(st.sampled_from([(), ("admin",), ("api:readonly",)]))
        return gateway_issuer.mint("fuzz", scopes=scopes), True
    if kind == "embedded_jwk":
        header = draw(st.sampled_from(["jwk", "jku", "x5u", "x5c"]))
        return gateway_issuer.mint("fuzz", extra_headers={header: "https://evil"}), False
    if kind == "huge":
        size = draw(st.sampled_from([8 * 1024 + 1, 16 * 1024, 64 * 1024]))
        return "a" * size, False
    token = gateway_issuer.mint("fuzz")
    pos = draw(st.integers(min_value=0, max_value=len(token) - 1))
    char = draw(st.sampled_from("AZaz09-_.="))
    mutated = token[:pos] + char + token[pos + 1 :]
    return (mutated if mutated != token else token + "x"), False


def upgrade(path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def first_frame_close(port: int, token: str) -> int | None:
    """Open a socket without a token, send ``{"type":"auth","token":...}``; the close code."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request

    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(Request(host="127.0.0.1", target="/api/v1/ws/fz-ff")))
            frame = json.dumps({"type": "auth", "token": token}).encode()
            sent = False
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return None
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection) and not sent:
                        await stream.send_all(encode_frame(OP_TEXT, frame))
                        sent = True
                    elif isinstance(event, CloseConnection):
                        await stream.send_all(encode_frame(OP_CLOSE, b"\x03\xe8"))
                        return int(event.code)
        finally:
            await stream.aclose()


def check_token(
    gateway: FuzzGateway, token: str, unscoped: bool, door: str, stats: FuzzStats
) -> None:
    """Offer ``token`` at ``door``; it must be refused the documented way (recorded in
    ``stats``) and the gateway must live on."""
    assert gateway.issuer is not None
    port = gateway.port
    if door == "header":
        answer = trio.run(
            raw_request, port, upgrade("/api/v1/ws/fz-h", [("Authorization", f"Bearer {token}")])
        )
    elif door == "subprotocol":
        answer = trio.run(
            raw_request,
            port,
            upgrade("/api/v1/ws/fz-s", [("Sec-WebSocket-Protocol", f"codelab.v2, bearer.{token}")]),
        )
    elif door == "rest":
        request = (
            f"GET /api/v1/agents HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}"
            "\r\n\r\n"
        ).encode("latin-1")
        answer = trio.run(raw_request, port, request)
    else:
        code = trio.run(first_frame_close, port, token)
        stats.handshakes += 1
        stats.count(stats.close_codes, code)
        want = {4403} if unscoped else {4401}
        assert code in want | {1009}, (door, code, token[:80])  # 1009: over the frame limit
        assert gateway.alive
        return
    problem = stats.record_answer(answer, allowed=REFUSED)
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert not problem, (door, problem, token[:80])
    if unscoped and answer.status != 431:
        assert answer.status == 403, (door, answer.head)
    elif answer.status != 431:
        assert answer.status == 401, (door, answer.head)


DOORS = st.sampled_from(["header", "subprotocol", "rest", "first_frame"])
