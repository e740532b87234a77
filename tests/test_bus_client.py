"""The client: batching, errors by whose fault, reconnect and resume (exactly once, both ways),
keepalive against a dead hub, statistics."""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio
from bus_helpers import TOKEN, Proxy, start_hub

from bus import codec as C
from bus.client import YIELD_EVERY, Message, open_bus_client
from bus.config import ClientConfig
from bus.errors import (
    CLOSE_PROTOCOL,
    BusAuthError,
    BusBrokenError,
    BusClosedError,
    BusNoRouteError,
    ProtocolError,
)
from bus.ws import (
    WsConfig,
    WsConnectTimeout,
    WsHandshakeError,
    WsRequest,
    connect_failure,
    open_ws,
    serve_ws,
)


async def wait_for(predicate, step: float = 0.001) -> None:
    while not predicate():  # noqa: ASYNC110 - polling a statistics() counter
        await trio.sleep(step)


async def test_many_queued_messages_share_few_frames():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                for i in range(2000):
                    a.send_nowait("b", i)
                got = [(await b.receive()).payload() for _ in range(2000)]
                assert got == list(range(2000))
                assert a.statistics().frames_out <= 6  # 1024 envelopes per frame at most
                assert b.statistics().frames_in <= 10
            nursery.cancel_scope.cancel()


async def test_a_lone_message_is_sent_without_waiting_for_a_batch(autojump_clock):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                t0 = trio.current_time()
                await a.send("b", "now")
                assert (await b.receive()).payload() == "now"
                assert trio.current_time() == t0  # no timer anywhere on the path
            nursery.cancel_scope.cancel()


async def test_closed_client_raises_bus_closed_error_and_iteration_ends():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a:
                pass
            with pytest.raises(BusClosedError):
                await a.send("x", 1)
            with pytest.raises(BusClosedError):
                await a.request("x", 1, timeout=1)
            assert [m async for m in a] == []
            nursery.cancel_scope.cancel()


async def test_close_flushes_queued_messages_before_bye():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a:
                    for i in range(500):
                        a.send_nowait("b", i)
                got = [(await b.receive()).payload() for _ in range(500)]
                assert got == list(range(500))
            nursery.cancel_scope.cancel()


async def test_wrong_token_raises_bus_auth_error_from_open():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            with pytest.raises(BusAuthError, match="token"):
                async with open_bus_client(info.url, token="nope", endpoint_id="a"):
                    pytest.fail("must not get here")
            nursery.cancel_scope.cancel()


async def test_unreachable_hub_raises_bus_broken_error():
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()  # nothing listens there now
        with pytest.raises(BusBrokenError, match="cannot connect.*connection refused"):
            async with open_bus_client(f"ws://127.0.0.1:{port}/bus", token=TOKEN,
                                       endpoint_id="a"):
                pass


def test_connect_failure_names_the_cause_the_websocket_library_wraps():
    def wrapped(cause: BaseException) -> WsHandshakeError:
        try:
            try:
                raise cause
            except BaseException as exc:
                raise WsHandshakeError() from exc
        except WsHandshakeError as outer:
            return outer

    refused = OSError("all attempts to connect to 127.0.0.1:1 failed")
    refused.__cause__ = ExceptionGroup("all attempts", [ConnectionRefusedError(111, "refused")])
    assert connect_failure(wrapped(refused)).startswith("connection refused")
    unknown = socket.gaierror(-2, "Name or service not known")
    assert connect_failure(wrapped(unknown)) == (
        "cannot resolve the host name (Name or service not known)")
    assert connect_failure(WsConnectTimeout()).startswith("timed out")
    assert connect_failure(wrapped(OSError("network is unreachable"))) == (
        "network is unreachable")
    assert connect_failure(WsHandshakeError()) == "HandshakeError()"  # nothing more known


async def test_a_wrong_path_says_the_server_answered_404_and_where_the_bus_is():
    # it said "ConnectionRejected<status_code=404 ...>" and advised starting the orchestrator
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            wrong = info.url.replace("/bus", "/nope")
            with pytest.raises(BusBrokenError, match="answered 404.*the bus is at /bus"):
                async with open_bus_client(wrong, token=TOKEN, endpoint_id="a"):
                    pass
            nursery.cancel_scope.cancel()


async def test_bad_endpoint_id_or_topic_is_the_callers_value_error():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            with pytest.raises(ValueError, match="endpoint id"):
                async with open_bus_client(info.url, token=TOKEN, endpoint_id="a b"):
                    pass
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a:
                with pytest.raises(ValueError, match="topic"):
                    await a.publish("tasks.*", 1)
                with pytest.raises(ValueError, match="pattern"):
                    await a.subscribe("a..b")
                with pytest.raises(TypeError):
                    await a.send("b", object())
                with pytest.raises(ValueError, match="only a request"):
                    await a.reply(Message(kind="send", source="b", dest="a",
                                          correlation_id=0, body=b"\xc0"), 1)
            nursery.cancel_scope.cancel()


async def test_exceptions_from_the_body_are_not_wrapped_in_groups():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            with pytest.raises(KeyError):
                async with open_bus_client(info.url, token=TOKEN, endpoint_id="a"):
                    raise KeyError("mine")
            nursery.cancel_scope.cancel()


async def test_reconnect_resumes_subscriptions_claims_and_queued_messages_both_ways():
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            proxy = Proxy(target_port=info.port)
            await nursery.start(proxy.serve)
            async with open_bus_client(proxy.url(), token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                await a.subscribe("news.*")
                await a.claim("task.1")
                await b.send("a", "before")
                assert (await a.receive()).payload() == "before"
                proxy.refuse = True
                proxy.cut()
                await wait_for(lambda: not a.statistics().connected)
                # while a is away: both sides queue
                for i in range(50):
                    await b.send("a", i)
                    await b.publish("news.x", f"n{i}")
                    await b.send("task.1", f"t{i}")
                    a.send_nowait("b", i)
                proxy.refuse = False
                got = [(await a.receive()) for _ in range(150)]
                assert [m.payload() for m in got if m.kind == "send" and m.dest == "a"] == \
                    list(range(50))
                assert [m.payload() for m in got if m.kind == "publish"] == \
                    [f"n{i}" for i in range(50)]
                assert [m.payload() for m in got if m.dest == "task.1"] == \
                    [f"t{i}" for i in range(50)]
                assert [(await b.receive()).payload() for _ in range(50)] == list(range(50))
                assert a.statistics().reconnects == 1
                await trio.sleep(0.05)
                assert a.statistics().inbox == 0 and b.statistics().inbox == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("lost", ["up", "down"])
async def test_messages_whose_ack_was_lost_are_not_delivered_twice_after_resume(lost):
    """'up': the client's frames reach the hub but the hub's acks never come back; 'down': the
    hub's frames reach the client but the client's acks are lost. Either way the resume
    handshake's last_seen acks them, nothing is resent needlessly and nothing arrives twice
    (replays that do arrive are dropped by sequence: see test_bus_conn and the hostile suite)."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            proxy = Proxy(target_port=info.port)
            await nursery.start(proxy.serve)
            async with open_bus_client(proxy.url(), token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                await a.subscribe("warm.up")
                if lost == "up":
                    proxy.blackhole("down")  # acks from the hub vanish
                    for i in range(20):
                        await a.send("b", i)
                    got = [(await b.receive()).payload() for _ in range(20)]
                else:
                    proxy.blackhole("up")  # acks from the client vanish
                    for i in range(20):
                        await b.send("a", i)
                    got = [(await a.receive()).payload() for _ in range(20)]
                assert got == list(range(20))
                assert a.statistics().unacked == (20 if lost == "up" else 0)
                proxy.cut()
                await wait_for(lambda: a.statistics().reconnects == 1)
                await a.send("b", "after")
                await b.send("a", "after")
                receiver = b if lost == "up" else a
                assert (await receiver.receive()).payload() == "after"
                await wait_for(lambda: a.statistics().unacked == 0)
                await wait_for(lambda: all(s.seq.unacked == 0 for s in hub.sessions.values()))
                assert a.statistics().duplicates == 0
                await trio.sleep(0.05)
                assert receiver.statistics().inbox == 0  # nothing delivered twice
            nursery.cancel_scope.cancel()


async def test_resume_window_passed_breaks_the_client_and_answers_its_requests(autojump_clock):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery, resume_window=10.0)
            proxy = Proxy(target_port=info.port)
            await nursery.start(proxy.serve)
            async with open_bus_client(proxy.url(), token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                await a.subscribe("x")
                proxy.refuse = True
                proxy.cut()
                t0 = trio.current_time()
                # a request queued for the vanished peer is answered NOROUTE when it expires
                with pytest.raises(BusNoRouteError):
                    await b.request("a", "are you there?", timeout=60)
                assert trio.current_time() - t0 == pytest.approx(10.0, abs=0.2)
                with pytest.raises(BusBrokenError, match="resume window of 10s"):
                    await a.receive()
                assert trio.current_time() - t0 == pytest.approx(10.0, abs=0.2)
                with pytest.raises(BusBrokenError):
                    await a.send("b", 1)
            nursery.cancel_scope.cancel()


async def test_keepalive_detects_a_dead_hub_and_reconnects(autojump_clock):
    """A fake hub that welcomes and then never says anything again (a frozen process)."""
    cfg = ClientConfig(keepalive_interval=2.0, keepalive_timeout=3.0)
    dials: list[float] = []

    async def frozen_hub(request: WsRequest) -> None:
        ws = await request.accept()
        dials.append(trio.current_time())
        await ws.get_message()
        await ws.send_message(C.EnvelopeEncoder().welcome(
            session="s", resumed=len(dials) > 1, last_seen=0, resume_window=100))
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, frozen_hub, "127.0.0.1", 0)
            async with open_bus_client(f"ws://127.0.0.1:{port}/bus", token=TOKEN,
                                       endpoint_id="a", config=cfg) as a:
                await wait_for(lambda: len(dials) == 2, step=0.1)
                assert dials[1] - dials[0] == pytest.approx(5.0, abs=0.2)
                assert a.statistics().reconnects == 1
            nursery.cancel_scope.cancel()


async def test_hub_speaking_garbage_breaks_the_client_with_protocol_error():
    async def bad_hub(request: WsRequest) -> None:
        ws = await request.accept()
        await ws.get_message()
        await ws.send_message(C.EnvelopeEncoder().welcome(
            session="s", resumed=False, last_seen=0, resume_window=10))
        await ws.send_message(b"\xc1garbage")
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, bad_hub, "127.0.0.1", 0)
            async with open_bus_client(f"ws://127.0.0.1:{port}/bus", token=TOKEN,
                                       endpoint_id="a") as a:
                with pytest.raises(ProtocolError) as exc:
                    await a.receive()
                assert exc.value.close_code == CLOSE_PROTOCOL
            nursery.cancel_scope.cancel()


async def test_send_blocks_when_the_outbound_queue_is_full_then_resumes():
    cfg = ClientConfig(max_outbound=10)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            proxy = Proxy(target_port=info.port)
            await nursery.start(proxy.serve)
            async with open_bus_client(proxy.url(), token=TOKEN, endpoint_id="a",
                                       config=cfg) as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                proxy.blackhole("down")  # no acks: the queue cannot drain
                for i in range(10):
                    a.send_nowait("b", i)
                with pytest.raises(trio.WouldBlock):
                    a.send_nowait("b", 10)
                with trio.move_on_after(0.2) as cs:
                    await a.send("b", 10)
                assert cs.cancelled_caught
                proxy.cut()  # reconnect: the hub's position acks everything
                await a.send("b", 10)
                got = [(await b.receive()).payload() for _ in range(11)]
                assert got == list(range(11))
            nursery.cancel_scope.cancel()


async def test_a_task_awaiting_send_in_a_loop_still_fills_frames():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                for i in range(2048):
                    await a.send("b", i)
                got = [(await b.receive()).payload() for _ in range(2048)]
                assert got == list(range(2048))
                assert a.statistics().frames_out <= 2048 // YIELD_EVERY + 4
            nursery.cancel_scope.cancel()


async def test_send_in_a_cancelled_scope_raises_and_queues_nothing():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a:
                before = a.statistics().sent
                with trio.CancelScope() as cs:
                    cs.cancel()
                    await a.send("b", 1)
                assert cs.cancelled_caught
                assert a.statistics().sent == before
            nursery.cancel_scope.cancel()


async def test_a_lone_ack_waits_ack_delay_and_data_carries_it_at_once(autojump_clock):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                delay = b.config.ack_delay
                assert delay > 0
                held = hub.sessions[b.statistics().session].seq
                await a.send("b", 1)
                await b.receive()
                await trio.sleep(delay * 0.9)
                assert held.unacked == 1  # b's ACK is held for data to carry it
                assert a.statistics().unacked == 1  # and so is the hub's ACK to a
                await trio.sleep(delay * 0.2)
                assert held.unacked == 0  # ... for ack_delay at most
                assert a.statistics().unacked == 0
                frames = b.statistics().frames_out
                await a.send("b", 2)
                await b.receive()
                t1 = trio.current_time()
                await b.send("a", "back")
                await a.receive()
                await wait_for(lambda: held.unacked == 0)
                assert trio.current_time() - t1 < delay / 4  # the reply carried the ACK
                assert b.statistics().frames_out == frames + 1  # one frame: ACK + data
            nursery.cancel_scope.cancel()


async def _serve_silent(nursery: trio.Nursery) -> tuple[int, list[bytes]]:
    """A TCP port that accepts and reads, but never answers: the port and what each connection
    sent first (for a WebSocket client, its upgrade request)."""
    heard: list[bytes] = []

    async def accept_and_say_nothing(stream: trio.SocketStream) -> None:
        heard.append(await stream.receive_some())
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, accept_and_say_nothing, 0,
                                            host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], heard


async def test_open_ws_gives_up_at_connect_timeout_when_the_upgrade_is_never_answered(
        autojump_clock):
    with trio.fail_after(60):  # trio-websocket alone waited for the peer to hang up
        async with trio.open_nursery() as nursery:
            port, heard = await _serve_silent(nursery)
            t0 = trio.current_time()
            with pytest.raises(WsConnectTimeout) as caught:
                async with open_ws(f"ws://127.0.0.1:{port}/x", config=WsConfig(connect_timeout=3)):
                    pytest.fail("must not get here")
            assert trio.current_time() - t0 == pytest.approx(3.0)
            nursery.cancel_scope.cancel()
    assert b"upgrade: websocket" in heard[0].lower()  # the TCP connection was up
    assert connect_failure(caught.value) == str(caught.value)
    assert "timed out connecting after 3s" in str(caught.value)
    assert "accepted the connection but did not answer the WebSocket upgrade" in str(caught.value)


async def test_open_ws_lets_a_cancel_from_outside_through_while_dialling(autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port, _ = await _serve_silent(nursery)
            with trio.move_on_after(1) as outer:
                async with open_ws(f"ws://127.0.0.1:{port}/x", config=WsConfig(connect_timeout=3)):
                    pytest.fail("must not get here")
            assert outer.cancelled_caught and trio.current_time() == pytest.approx(1.0)
            nursery.cancel_scope.cancel()


async def test_bus_client_dial_to_a_silent_port_fails_at_connect_timeout(autojump_clock):
    cfg = ClientConfig(ws=WsConfig(connect_timeout=3))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port, heard = await _serve_silent(nursery)
            t0 = trio.current_time()
            with pytest.raises(BusBrokenError, match=rf"cannot connect to ws://127.0.0.1:{port}/bus"
                               r": timed out connecting after 3s"):
                async with open_bus_client(f"ws://127.0.0.1:{port}/bus", token=TOKEN,
                                           endpoint_id="a", config=cfg):
                    pytest.fail("must not get here")
            assert trio.current_time() - t0 == pytest.approx(3.0)
            nursery.cancel_scope.cancel()
    assert len(heard) == 1


async def test_wss_to_a_plain_hub_says_to_use_ws_instead_of_timing_out_silently():
    # The hub answers a TLS hello with plain HTTP at once; the WebSocket library swallows the
    # TLS error and waits out its bound, after which open_ws asks once more why TLS failed.
    from bus.ws import WsConfig, open_ws

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            url = info.url.replace("ws://", "wss://")
            with pytest.raises(WsConnectTimeout) as caught:
                async with open_ws(url, config=WsConfig(connect_timeout=1.0)):
                    pytest.fail("must not get here")
            why = connect_failure(caught.value)
            assert "did not answer in TLS" in why and "instead of https:// (wss://)" in why
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a"):
                pass  # and the hub still serves ws:// peers
            nursery.cancel_scope.cancel()
