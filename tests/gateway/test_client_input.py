"""Bad input never kills a session: one error frame per bad frame, then business as usual."""

from __future__ import annotations

import pytest
import trio
import trio_websocket

from ..conftest import RunningGateway, close_code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2, 3]", "invalid_message"),
        ('"just a string"', "invalid_message"),
        ('{"content": "no type"}', "invalid_message"),
        ('{"type": "launch"}', "unsupported_type"),
        ('{"type": "tool_result", "result": 1}', "invalid_message"),
        (b"\x00\x01binary", "binary_not_supported"),
    ],
)
async def test_each_bad_frame_gets_one_error_frame_and_the_session_goes_on(
    gateway: RunningGateway, frame: str | bytes, code: str
) -> None:
    async with gateway.connect("bad-input") as client:
        await client.send(frame)
        error = await client.recv()
        assert error["type"] == "error" and error["code"] == code
        assert error["error"] == error["content"] and error["error"]
        assert error["is_final"] is False, "a refused frame does not end any turn"
        await client.send({"type": "user_message", "content": "still there?"})
        frames = await client.turn()
        assert frames[-1]["type"] == "assistant_message"


async def test_a_bad_frame_during_a_turn_does_not_disturb_the_turn(
    gateway: RunningGateway,
) -> None:
    async with gateway.connect("bad-during-turn") as client:
        await client.send({"type": "user_message", "content": "bench 300 2000"})
        await client.send("{oops")
        frames = await client.turn()
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["invalid_json"]
    tokens = [f["token"] for f in frames if f["type"] == "assistant_message"]
    assert "".join(tokens) == "".join(f"t{i} " for i in range(300))


async def test_a_frame_over_the_size_limit_closes_with_1009(
    nursery: trio.Nursery, demo_runtime: tuple[object, str]
) -> None:
    from ..conftest import gateway_settings, run_gateway

    settings = gateway_settings(demo_runtime[1], ws_max_message_bytes=64 * 1024)
    async with run_gateway(nursery, settings) as gw:
        async with gw.connect("big") as client:
            await client.send({"type": "user_message", "content": "x" * (65 * 1024)})
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await client.recv()
            assert close_code(closed.value) == 1009
        # a frame just under the limit is fine
        async with gw.connect("big-ok") as client:
            await client.send({"type": "user_message", "content": "x" * (60 * 1024)})
            assert (await client.turn())[-1]["is_final"] is True


@pytest.mark.parametrize("path_id", ["x" * 257, "a%2Fb", "tab%09here", "nul%00", "line%0Abreak"])
async def test_a_malformed_session_id_is_rejected_at_the_handshake_with_400(
    gateway: RunningGateway, path_id: str
) -> None:
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(gateway.ws_url(path_id)):
            pass
    assert rejected.value.status_code == 400
    assert b"invalid_session_id" in (rejected.value.body or b"")


async def test_an_empty_session_id_is_rejected(gateway: RunningGateway) -> None:
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with trio_websocket.open_websocket_url(gateway.ws_url("")):
            pass
    assert rejected.value.status_code == 400


async def test_a_session_id_of_256_characters_is_fine(gateway: RunningGateway) -> None:
    async with gateway.connect("s" * 256) as client:
        await client.send({"type": "user_message", "content": "hi"})
        assert (await client.turn())[-1]["is_final"] is True
