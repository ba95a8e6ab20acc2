"""The unmodified IDE against a JWT gateway: REST with its token, then a WebSocket with none.

The IDE creates its session with ``POST /api/v1/sessions`` (token), then opens
``/api/v1/ws/{id}`` with no header, no subprotocol and no auth frame; its first frame is a
``user_message`` with all 15 fields of its model. ``WS_AUTH_MODE=session-id`` admits exactly
that socket, as the session's owner, and nothing more.
"""

# The JWT gateway fixtures are test_security's, imported by name (pytest finds fixtures in a
# module's namespace); parameters of the same names are what ruff's F811 sees.
# ruff: noqa: F811

from __future__ import annotations

import io
import logging

import pytest
import trio_websocket

from trio_gateway.observability import JsonFormatter

from ..conftest import INTERNAL_KEY, WsClient, close_code
from ..support.frames import ide_frame
from .test_security import (  # noqa: F401 - fixtures
    Secure,
    SecureFactory,
    no_token_material_in_the_logs,
    secure,
    secure_with,
)


async def create_session(secure: Secure, token: str, session_id: str) -> None:
    async with secure.http() as http:
        created = await http.post(
            "/api/v1/sessions", json={"session_id": session_id}, headers=secure.headers(token)
        )
    assert created.status_code == 201, created.text


async def assert_tokenless_ide_socket_refused(secure: Secure, session_id: str) -> None:
    """A tokenless socket sending the IDE's first frame is closed 4401; nothing reaches the
    runtime."""
    async with secure.ws(session_id) as ws:
        client = WsClient(ws)
        await client.send(ide_frame("hi"))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await client.recv()
    assert close_code(closed.value) == 4401
    assert secure.runtime.stream_requests == []


async def test_a_tokenless_ide_socket_chats_on_a_session_its_user_created(
    secure_with: SecureFactory,
) -> None:
    async with secure_with(ws_auth_mode="session-id") as secure:
        await create_session(secure, secure.token("alice"), "ide-1")
        async with secure.ws("ide-1") as ws:  # no token at all
            client = WsClient(ws)
            await client.send(ide_frame("what is trio?"))
            frames = await client.turn()
        assert frames[-1]["is_final"] is True
        # The runtime got the IDE's frame unchanged, on behalf of the session's owner.
        assert secure.runtime.stream_requests[-1]["message"] == ide_frame("what is trio?")
        assert secure.runtime.stream_headers[-1]["x-user-id"] == "alice"
        async with secure.http() as http:
            metrics = await http.get("/metrics", headers={"X-Internal-Auth": INTERNAL_KEY})
        assert "gateway_websocket_session_id_admissions_total 1.0" in metrics.text


@pytest.mark.parametrize("session", ["never-created", "created-by-a-service"])
async def test_a_tokenless_socket_to_a_session_without_owner_is_refused(
    secure_with: SecureFactory, session: str
) -> None:
    async with secure_with(ws_auth_mode="session-id", allow_internal_auth=True) as secure:
        if session == "created-by-a-service":  # exists at the runtime, owned by nobody
            async with secure.http() as http:
                made = await http.post(
                    "/api/v1/sessions",
                    json={"session_id": session},
                    headers={"X-Internal-Auth": INTERNAL_KEY},
                )
            assert made.status_code == 201
        await assert_tokenless_ide_socket_refused(secure, session)


async def test_in_session_id_mode_a_first_auth_frame_still_works(
    secure_with: SecureFactory,
) -> None:
    async with secure_with(ws_auth_mode="session-id") as secure:
        async with secure.ws("fresh") as ws:
            client = WsClient(ws)
            await client.send({"type": "auth", "token": secure.token("bob")})
            await client.send({"type": "user_message", "content": "bench 2"})
            assert (await client.turn())[-1]["is_final"] is True
        assert secure.runtime.stream_headers[-1]["x-user-id"] == "bob"


async def test_a_session_id_socket_cannot_switch_to_another_users_token(
    secure_with: SecureFactory,
) -> None:
    async with secure_with(ws_auth_mode="session-id") as secure:
        await create_session(secure, secure.token("alice"), "alices")
        async with secure.ws("alices") as ws:
            client = WsClient(ws)
            await client.send({"type": "auth", "token": secure.token("mallory")})
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await client.recv()
        assert close_code(closed.value) == 4401
        assert secure.runtime.stream_requests == []


async def test_token_mode_refuses_the_tokenless_ide_socket(secure: Secure) -> None:
    await create_session(secure, secure.token("alice"), "strict")
    async with secure.ws("strict") as ws:
        client = WsClient(ws)
        await client.send(ide_frame("hi"))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await client.recv()
    assert close_code(closed.value) == 4401


async def test_turns_carry_the_callers_identity_to_the_runtime(secure: Secure) -> None:
    token = secure.token("carol", scopes=["api:read", "api:write"])
    async with secure.ws("carols", token) as ws:
        client = WsClient(ws)
        await client.send({"type": "user_message", "content": "bench 2"})
        await client.turn()
    headers = secure.runtime.stream_headers[-1]
    assert headers["x-user-id"] == "carol"
    assert headers["x-user-scopes"] == "api:read api:write"
    assert "authorization" not in headers


async def test_session_id_mode_and_jwt_off_are_announced_at_startup(
    secure_with: SecureFactory,
) -> None:
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("trio_gateway.app").addHandler(handler)
    try:
        async with secure_with(ws_auth_mode="session-id"):
            pass
        async with secure_with(use_jwt_auth=False):
            pass
    finally:
        logging.getLogger("trio_gateway.app").removeHandler(handler)
    text = log.getvalue()
    assert '"event":"session_id_auth"' in text and "WS_AUTH_MODE=session-id" in text
    assert '"event":"auth_disabled"' in text and "JWT AUTHENTICATION IS OFF" in text


async def test_a_read_only_user_cannot_make_a_session_writable_by_reading_it(
    secure_with: SecureFactory,
) -> None:
    # Reading claims nothing: otherwise a tokenless socket would write as a user who may not.
    async with secure_with(ws_auth_mode="session-id", allow_internal_auth=True) as secure:
        reader = secure.token("reader", scopes=["api:read"])
        async with secure.http() as http:
            made = await http.post(
                "/api/v1/sessions",
                json={"session_id": "ro"},
                headers={"X-Internal-Auth": INTERNAL_KEY},
            )
            assert made.status_code == 201
            got = await http.get("/api/v1/sessions/ro", headers=secure.headers(reader))
            assert got.status_code == 200
        await assert_tokenless_ide_socket_refused(secure, "ro")


async def test_a_session_id_socket_tells_the_runtime_only_the_write_scope(
    secure_with: SecureFactory,
) -> None:
    async with secure_with(ws_auth_mode="session-id") as secure:
        await create_session(secure, secure.token("alice", scopes=["api:read", "api:write"]), "w")
        async with secure.ws("w") as ws:
            client = WsClient(ws)
            await client.send(ide_frame("hi"))
            await client.turn()
        assert secure.runtime.stream_headers[-1]["x-user-scopes"] == "api:write"
