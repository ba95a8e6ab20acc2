"""Every way a runtime can fail ends the turn with one clear error frame; the session lives on."""

from __future__ import annotations

from typing import Any

import trio

from ..conftest import RunningGateway, WsClient, gateway_settings, run_gateway
from ..support.ports import free_port
from ..support.scripted_runtime import Script, ScriptedRuntime, chunk, sse

GOOD = sse(chunk(type="assistant_message", token="fine", content="fine", is_final=True))


async def ask(client: WsClient, content: str) -> dict[str, Any]:
    """Send ``content`` as a user message; the first frame of the answer."""
    await client.send({"type": "user_message", "content": content})
    return await client.recv()


async def assert_session_still_works(client: WsClient) -> None:
    await client.send({"type": "user_message", "content": "anything else"})
    frames = await client.turn()
    assert frames[-1]["type"] == "assistant_message"


async def test_http_error_before_the_stream_carries_status_and_detail(
    scripted_runtime: ScriptedRuntime, scripted_gateway: RunningGateway
) -> None:
    scripted_runtime.scripts["bad"] = Script(
        status=400,
        content_type="application/json",
        body=[b'{"detail": "tool_result requires call_id"}'],
    )
    async with scripted_gateway.connect("s") as client:
        error = await ask(client, "bad")
        assert error["type"] == "error" and error["code"] == "runtime_error"
        assert error["status"] == 400
        assert error["detail"] == "tool_result requires call_id"
        assert error["is_final"] is True
        assert "tool_result requires call_id" in error["content"] == error["error"]
        await assert_session_still_works(client)


async def test_a_500_with_a_non_json_body(
    scripted_runtime: ScriptedRuntime, scripted_gateway: RunningGateway
) -> None:
    scripted_runtime.scripts["boom"] = Script(
        status=500, content_type="text/plain", body=[b"Internal Server Error"]
    )
    async with scripted_gateway.connect("s") as client:
        error = await ask(client, "boom")
        assert (error["code"], error["status"]) == ("runtime_error", 500)
        # a raw 500 body may expose runtime internals: it never reaches the client
        assert "detail" not in error and "Internal Server Error" not in error["content"]


async def test_a_validation_dump_is_summarised_never_echoed(
    scripted_runtime: ScriptedRuntime, scripted_gateway: RunningGateway
) -> None:
    scripted_runtime.scripts["dump"] = Script(
        status=422,
        content_type="application/json",
        body=[b'{"detail": [{"loc": ["body"], "msg": "bad", "input": "PRIVATE-TEXT"}]}'],
    )
    async with scripted_gateway.connect("s") as client:
        error = await ask(client, "dump")
    assert error["status"] == 422 and "PRIVATE-TEXT" not in str(error)
    assert error["detail"] == "request validation failed (1 error(s))"


async def test_unreachable_runtime(nursery: trio.Nursery) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # a port that was just free: nothing listens
    async with run_gateway(nursery, gateway_settings(nowhere)) as gw:
        async with gw.connect("s") as client:
            error = await ask(client, "hi")
            assert error["code"] == "runtime_unavailable" and error["is_final"] is True
            assert (await ask(client, "again"))["code"] == "runtime_unavailable"


async def test_runtime_dying_mid_stream(
    scripted_runtime: ScriptedRuntime, scripted_gateway: RunningGateway
) -> None:
    scripted_runtime.scripts["die"] = Script(
        body=[sse(chunk(type="assistant_message", token="par", content="par")), 0.05],
        ending="die",
    )
    async with scripted_gateway.connect("s") as client:
        await client.send({"type": "user_message", "content": "die"})
        frames = await client.turn()
        assert frames[0]["token"] == "par"
        assert frames[-1]["code"] == "runtime_stream_broken"
        assert frames[-1]["is_final"] is True
        await assert_session_still_works(client)


async def test_a_silent_stream_times_out_but_comments_count_as_activity(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    scripted_runtime.scripts["chatty"] = Script(
        body=[b": keep-alive\n\n", 0.3, b": keep-alive\n\n", 0.3, b": keep-alive\n\n", 0.3, GOOD]
    )
    scripted_runtime.scripts["silent"] = Script(body=[b": hello\n\n"], ending="hang")
    settings = gateway_settings(scripted_runtime.url, stream_idle_timeout=0.5)
    async with run_gateway(nursery, settings) as gw:
        async with gw.connect("s") as client:
            await client.send({"type": "user_message", "content": "chatty"})
            assert (await client.turn())[-1]["token"] == "fine"

            error = await ask(client, "silent")
            assert error["code"] == "runtime_timeout" and error["is_final"] is True
            await assert_session_still_works(client)
    # the timed-out request was closed, not left dangling at the runtime
    assert scripted_runtime.client_went_away == 1


async def test_an_sse_event_that_is_not_json_is_skipped(
    scripted_runtime: ScriptedRuntime, scripted_gateway: RunningGateway
) -> None:
    scripted_runtime.scripts["garbage"] = Script(body=[b"data: {not json\n\ndata: [1]\n\n", GOOD])
    async with scripted_gateway.connect("s") as client:
        await client.send({"type": "user_message", "content": "garbage"})
        assert [f["token"] for f in await client.turn()] == ["fine"]


async def test_the_runtimes_own_error_chunk_is_relayed_as_is(gateway: RunningGateway) -> None:
    async with gateway.connect("s") as client:
        # the demo runtime answers an unknown call_id with HTTP 400 before streaming
        await client.send({"type": "tool_result", "call_id": "call_unknown", "result": 1})
        error = await client.recv()
    assert error["code"] == "runtime_error" and error["status"] == 400
