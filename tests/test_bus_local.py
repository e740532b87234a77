"""The in-process attach: the local pair's transport rules (order, close, backpressure, cancel)
and a client on it behaving as one on a WebSocket (routing, request/reply, auth, close, hub
shutdown, inbox backpressure, keepalive)."""

from __future__ import annotations

import pytest
import trio
from bus_helpers import TOKEN, start_hub

from bus.client import open_bus_client
from bus.config import ClientConfig, HubConfig
from bus.errors import CLOSE_GOING_AWAY, BusAuthError, BusBrokenError, BusNoRouteError
from bus.hub import Hub, HubInfo
from bus.local import LOCAL_QUEUE, LocalClosed, local_ws_pair
from bus.ws import WsClosed

# ------------------------------------------------------------------ the pair itself


async def test_pair_carries_frames_in_order_both_ways():
    with trio.fail_after(5):
        a, b = local_ws_pair()
        for i in range(10):
            await a.send_message(bytes([i]))
        await b.send_message(b"back")
        assert [await b.get_message() for _ in range(10)] == [bytes([i]) for i in range(10)]
        assert await a.get_message() == b"back"


async def test_close_lets_the_peer_drain_then_raises_the_close_code_on_both_ends():
    with trio.fail_after(5):
        a, b = local_ws_pair()
        await a.send_message(b"last")
        await a.aclose(1001, "going away")
        assert b.closed is not None and b.closed.code == 1001
        assert await b.get_message() == b"last"
        with pytest.raises(LocalClosed) as info:
            await b.get_message()
        assert isinstance(info.value, WsClosed)  # the hub's and client's handlers see a WsClosed
        assert info.value.reason is not None and info.value.reason.code == 1001
        assert info.value.reason.reason == "going away"
        with pytest.raises(LocalClosed):
            await b.send_message(b"x")
        with pytest.raises(LocalClosed):
            await a.get_message()
        b.close(1000)  # idempotent, and the first code stays
        assert a.closed is not None and a.closed.code == 1001


async def test_a_writer_waits_while_the_queue_is_full_and_resumes_when_read():
    with trio.fail_after(5):
        a, b = local_ws_pair(queue_size=2)
        await a.send_message(b"1")
        await a.send_message(b"2")
        with pytest.raises(trio.WouldBlock):
            a._tx.send_nowait(b"3")  # the bound: two frames, not more
        sent = trio.Event()

        async def third() -> None:
            await a.send_message(b"3")
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            assert await b.get_message() == b"1"
        assert sent.is_set()
        assert [await b.get_message(), await b.get_message()] == [b"2", b"3"]


async def test_closing_wakes_a_writer_blocked_on_a_full_queue():
    with trio.fail_after(5):
        a, b = local_ws_pair(queue_size=1)
        await a.send_message(b"1")
        async with trio.open_nursery() as nursery:

            async def blocked() -> None:
                with pytest.raises(LocalClosed):
                    await a.send_message(b"2")

            nursery.start_soon(blocked)
            await trio.testing.wait_all_tasks_blocked()
            b.close(1000)


async def test_a_cancelled_receive_leaves_the_pair_usable():
    with trio.fail_after(5):
        a, b = local_ws_pair()
        with trio.move_on_after(0.01) as cs:
            await b.get_message()
        assert cs.cancelled_caught
        await a.send_message(b"after")
        assert await b.get_message() == b"after"


# ------------------------------------------------------------------ a client on it


async def test_local_client_routes_both_ways_with_socket_clients():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            assert info.hub is hub
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="orc",
                                       local=info.hub) as orc, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="w") as w:
                await orc.subscribe("logs.*")
                for i in range(300):
                    orc.send_nowait("w", i)
                assert [(await w.receive()).payload() for _ in range(300)] == list(range(300))
                await w.publish("logs.w", "line")
                msg = await orc.receive()
                assert (msg.kind, msg.source, msg.dest, msg.payload()) == \
                    ("publish", "w", "logs.w", "line")
                assert hub.statistics().connected == 2
                assert orc.statistics().connected and orc.statistics().session
            nursery.cancel_scope.cancel()


async def test_local_client_requests_and_replies():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="orc",
                                       local=info.hub) as orc, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="w") as w:

                async def answer() -> None:
                    msg = await w.receive()
                    await w.reply(msg, msg.payload() * 2)
                    msg = await w.receive()
                    assert await w.request(msg.source, "ask back", timeout=5) == "answered"

                nursery.start_soon(answer)
                assert await orc.request("w", 21, timeout=5) == 42
                await orc.send("w", "go")
                back = await orc.receive()
                assert (back.kind, back.source) == ("request", "w")
                await orc.reply(back, "answered")
                with pytest.raises(BusNoRouteError):
                    await orc.request("nobody", 1, timeout=5)
            nursery.cancel_scope.cancel()


async def test_local_client_with_a_wrong_token_is_refused_like_a_socket_one():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            with pytest.raises(BusAuthError):
                async with open_bus_client(info.url, token="wrong", endpoint_id="orc",
                                           local=info.hub):
                    pass  # pragma: no cover
            assert hub.statistics().auth_failures == 1
            nursery.cancel_scope.cancel()


async def test_closing_a_local_client_ends_its_session_with_bye():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="w") as w:
                async with open_bus_client(info.url, token=TOKEN, endpoint_id="orc",
                                           local=info.hub) as orc:
                    for i in range(100):
                        orc.send_nowait("w", i)
                # flushed before BYE, and the session is gone (no resume window left behind)
                assert [(await w.receive()).payload() for _ in range(100)] == list(range(100))
                assert hub.statistics().sessions == 1
                with pytest.raises(BusNoRouteError):
                    await w.request("orc", 1, timeout=5)
            nursery.cancel_scope.cancel()


async def test_hub_shutdown_breaks_a_local_client_with_going_away():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            hub_scope = trio.CancelScope()
            hub = Hub(HubConfig(token=TOKEN))

            async def run(task_status: trio.TaskStatus[HubInfo]) -> None:
                with hub_scope:
                    await hub.serve(task_status=task_status)

            info = await nursery.start(run)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="orc",
                                       local=hub) as orc:
                hub_scope.cancel()
                with pytest.raises(BusBrokenError) as exc:
                    await orc.receive()
                assert exc.value.close_code == CLOSE_GOING_AWAY


async def test_local_attach_to_a_hub_that_is_not_serving_fails_to_open():
    with trio.fail_after(10):
        hub = Hub(HubConfig(token=TOKEN))
        with pytest.raises(BusBrokenError, match="not serving"):
            async with open_bus_client("ws://nowhere/bus", token=TOKEN, endpoint_id="orc",
                                       local=hub):
                pass  # pragma: no cover


async def test_a_local_client_that_stops_reading_holds_back_the_hub_not_memory():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery, max_frame_envelopes=4)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="orc",
                                       local=info.hub,
                                       config=ClientConfig(inbox_size=10)) as orc, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="w") as w:
                for i in range(2000):
                    w.send_nowait("orc", i)
                await trio.testing.wait_all_tasks_blocked(0.05)
                # orc read three frames of 4 (inbox 12 >= 10) and stopped; the pair holds
                # LOCAL_QUEUE frames; the hub's writer waits and the rest stays in the hub,
                # unacked, where the slow-consumer policy bounds it
                assert orc.statistics().inbox == 12
                assert hub.sessions[orc.statistics().session].seq.unacked == 2000 - 12
                assert LOCAL_QUEUE + 3 <= hub.statistics().frames_out <= LOCAL_QUEUE + 3 + 2
                assert [(await orc.receive()).payload() for _ in range(2000)] == \
                    list(range(2000))
            nursery.cancel_scope.cancel()


async def test_an_idle_local_client_stays_connected_through_keepalive(autojump_clock):
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="orc",
                                       local=info.hub) as orc:
                await trio.sleep(120)  # twelve keepalive periods of silence
                assert orc.statistics().reconnects == 0
                assert hub.statistics().connected == 1
                with pytest.raises(BusNoRouteError):  # and still answered at once
                    await orc.request("nobody", 1, timeout=5)
            nursery.cancel_scope.cancel()
