"""The hub over real loopback sockets: routing, topics, request/reply, claims, the duplicate-id
rule, keepalive, the slow-consumer policy, session expiry and shutdown."""

from __future__ import annotations

import pytest
import trio
from bus_helpers import TOKEN, bus_events, capture_logs, close_code, hello, start_hub

from bus import codec as C
from bus.client import open_bus_client
from bus.config import ClientConfig, HubConfig
from bus.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_KEEPALIVE,
    CLOSE_REPLACED,
    CLOSE_TRY_LATER,
    BusBrokenError,
    BusNoRouteError,
    BusRemoteError,
    BusTimeoutError,
)
from bus.hub import serve_bus
from bus.ws import open_ws


async def test_serve_bus_reports_host_port_and_url():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve_bus, HubConfig(token=TOKEN))
            assert info.host == "127.0.0.1" and info.port > 0
            assert info.url == f"ws://127.0.0.1:{info.port}/bus"
            nursery.cancel_scope.cancel()


async def test_direct_send_reaches_only_the_destination():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="c") as c:
                await a.send("b", {"n": 1})
                msg = await b.receive()
                assert (msg.kind, msg.source, msg.dest, msg.payload()) == \
                    ("send", "a", "b", {"n": 1})
                await trio.sleep(0.05)
                assert c.statistics().received == 0
            nursery.cancel_scope.cancel()


async def test_publish_reaches_wildcard_and_exact_subscribers_once_each():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="pub") as pub, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="s1") as s1, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="s2") as s2:
                await s1.subscribe("tasks.*")
                await s1.subscribe("tasks.build")  # overlapping patterns: still one copy
                await s2.subscribe("tasks.>")
                await pub.publish("tasks.build", "b")
                await pub.publish("tasks.build.x", "deep")  # only '>' matches two segments
                await pub.publish("other", "no one")
                assert (await s1.receive()).payload() == "b"
                assert [(await s2.receive()).payload() for _ in range(2)] == ["b", "deep"]
                await s1.unsubscribe("tasks.*")
                await s1.unsubscribe("tasks.build")
                await pub.publish("tasks.build", "after")
                assert (await s2.receive()).payload() == "after"
                await trio.sleep(0.05)
                assert s1.statistics().received == 1
            nursery.cancel_scope.cancel()


async def test_request_reply_and_reply_error():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                async def responder() -> None:
                    async for msg in b:
                        if msg.payload() == "bad":
                            await b.reply_error(msg, "invalid", "cannot do bad")
                        else:
                            await b.reply(msg, msg.payload() + 1)

                nursery.start_soon(responder)
                assert await a.request("b", 41, timeout=5) == 42
                with pytest.raises(BusRemoteError) as exc:
                    await a.request("b", "bad", timeout=5)
                assert (exc.value.code, exc.value.message) == ("invalid", "cannot do bad")
            nursery.cancel_scope.cancel()


async def test_request_to_nobody_fails_at_once_with_no_route(autojump_clock):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a:
                t0 = trio.current_time()
                with pytest.raises(BusNoRouteError, match="'nobody'"):
                    await a.request("nobody", 1, timeout=20)
                assert trio.current_time() - t0 < 0.01
                await a.send("nobody", 1)  # a send is counted, not raised
                with trio.fail_after(1):
                    while a.statistics().no_route == 0:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                assert hub.statistics().no_route == 2
            nursery.cancel_scope.cancel()


async def test_request_without_reply_times_out_at_its_deadline(autojump_clock):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="mute") as mute:
                t0 = trio.current_time()
                with pytest.raises(BusTimeoutError, match="within 2.5s"):
                    await a.request("mute", "hello?", timeout=2.5)
                assert trio.current_time() - t0 == pytest.approx(2.5, abs=0.01)
                msg = await mute.receive()
                await mute.reply(msg, "too late")
                with trio.fail_after(1):
                    while a.statistics().late_replies == 0:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                assert a.statistics().pending_requests == 0
            nursery.cancel_scope.cancel()


async def test_claimed_alias_routes_to_the_claimer_until_released():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="worker.1") as w:
                await w.claim("task.t1")
                await a.send("task.t1", "hi")
                msg = await w.receive()
                assert (msg.dest, msg.source, msg.payload()) == ("task.t1", "a", "hi")
                await w.release("task.t1")
                with pytest.raises(BusNoRouteError):
                    await a.request("task.t1", "gone?", timeout=5)
            nursery.cancel_scope.cancel()


async def test_newest_claim_of_an_alias_wins():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="w1") as w1, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="w2") as w2:
                await w1.claim("task.t")
                await w2.claim("task.t")
                await w1.release("task.t")  # releasing a lost claim leaves the winner alone
                await a.send("task.t", 1)
                assert (await w2.receive()).dest == "task.t"
                assert w1.statistics().received == 0
            nursery.cancel_scope.cancel()


async def test_claiming_another_peers_endpoint_id_is_refused():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="orchestrator"), \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="w") as w:
                with pytest.raises(BusRemoteError) as exc:
                    await w.claim("orchestrator")
                assert exc.value.code == "claim_refused"
            nursery.cancel_scope.cancel()


async def test_duplicate_endpoint_id_newest_wins_old_closed_4000():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            with capture_logs() as logs:
                async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                        open_bus_client(info.url, token=TOKEN, endpoint_id="w") as old:
                    await old.subscribe("t.*")
                    async with open_bus_client(info.url, token=TOKEN, endpoint_id="w") as new:
                        with pytest.raises(BusBrokenError) as exc:
                            await old.receive()
                        assert exc.value.close_code == CLOSE_REPLACED
                        await a.send("w", "to the newest")
                        assert (await new.receive()).payload() == "to the newest"
                        await a.publish("t.x", 1)  # the old session's subscription is gone
                        await trio.sleep(0.05)
                        assert new.statistics().received == 1
            replaced = [e for e in bus_events(logs) if e["event"] == "bus.replaced"]
            assert len(replaced) == 1 and replaced[0]["code"] == CLOSE_REPLACED
            nursery.cancel_scope.cancel()


async def test_keepalive_closes_a_silent_peer_after_interval_plus_timeout(autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery, keepalive_interval=3.0, keepalive_timeout=2.0)
            async with open_ws(info.url) as ws:
                await ws.send_message(hello(endpoint_id="silent"))
                await ws.get_message()  # WELCOME
                t0 = trio.current_time()
                # a peer that never answers: the hub pings it after 3 s, gives up after 5 s
                frames = []
                try:
                    while True:
                        frames.append(await ws.get_message())
                except Exception:
                    pass
                assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.05)
                assert ws.closed is not None and ws.closed.code == CLOSE_KEEPALIVE
                assert any(C.FrameDecoder(C.Limits()).decode(f)[0][0] == C.PING
                           for f in frames)
            # the session waits for a resume, then expires (resume_window, 30 s by default)
            assert hub.statistics().sessions == 1
            await trio.sleep(30.1)
            assert hub.statistics().sessions == 0
            nursery.cancel_scope.cancel()


async def test_an_idle_but_answering_client_is_never_dropped(autojump_clock):
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery, keepalive_interval=1.0, keepalive_timeout=1.0)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="idle") as c:
                await trio.sleep(100)
                assert c.statistics().reconnects == 0
                assert hub.statistics().connected == 1
            nursery.cancel_scope.cancel()


async def test_slow_consumer_is_closed_1013_after_grace_while_others_keep_talking(
        autojump_clock):
    hub_cfg = dict(max_pending_msgs=100, slow_consumer_grace=4.0)
    slow_cfg = ClientConfig(inbox_size=10)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery, **hub_cfg)
            with capture_logs() as logs:
                async with open_bus_client(info.url, token=TOKEN, endpoint_id="slow",
                                           config=slow_cfg) as slow, \
                        open_bus_client(info.url, token=TOKEN, endpoint_id="p") as p, \
                        open_bus_client(info.url, token=TOKEN, endpoint_id="q") as q:
                    for i in range(15):  # separate frames: the slow reader stops after 10
                        for j in range(10):
                            await p.send("slow", i * 10 + j)
                        await trio.sleep(0.01)
                    t_over = trio.current_time()

                    async def echo() -> None:
                        async for m in q:
                            await q.reply(m, m.payload())

                    nursery.start_soon(echo)
                    # p and q keep talking while the slow consumer sits over its limit
                    while hub.statistics().slow_consumers_closed == 0:
                        assert await p.request("q", "ping", timeout=1) == "ping"
                        await trio.sleep(0.25)
                    closed_after = trio.current_time() - t_over
                    assert 3.5 <= closed_after <= 4.3
                    got = []
                    with pytest.raises(BusBrokenError) as exc:
                        while True:
                            got.append((await slow.receive()).payload())
                    assert exc.value.close_code == CLOSE_TRY_LATER
                    # an in-order prefix: what had reached the client before the close (all of
                    # it, when the client's held ACK did not hit the closed socket first)
                    assert got == list(range(len(got))) and 10 <= len(got) <= 150
                    assert await p.request("q", "still", timeout=1) == "still"
            slow_lines = [e for e in bus_events(logs) if e["event"] == "bus.slow_consumer"]
            assert len(slow_lines) == 1 and slow_lines[0]["endpoint_id"] == "slow"
            assert hub.statistics().slow_consumers_closed == 1
            nursery.cancel_scope.cancel()


async def test_consumer_twice_over_the_limit_is_closed_at_once(autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery, max_pending_msgs=50, slow_consumer_grace=100)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="slow",
                                       config=ClientConfig(inbox_size=5)) as slow, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="p") as p:
                t0 = trio.current_time()
                for i in range(30):
                    for _ in range(5):
                        await p.send("slow", i)
                    await trio.sleep(0.001)
                while hub.statistics().slow_consumers_closed == 0:  # noqa: ASYNC110
                    await trio.sleep(0.001)
                assert trio.current_time() - t0 < 1.0
                with pytest.raises(BusBrokenError):
                    while True:
                        await slow.receive()
            assert hub.statistics().slow_consumers_closed == 1
            nursery.cancel_scope.cancel()


async def test_hub_shutdown_flushes_then_closes_1001():
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            hub_scope = trio.CancelScope()

            async def run_hub(task_status: trio.TaskStatus) -> None:
                with hub_scope:
                    await serve_bus(HubConfig(token=TOKEN), task_status=task_status)

            info = await outer.start(run_hub)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:
                for i in range(100):
                    a.send_nowait("b", i)
                while b.statistics().received == 0:  # noqa: ASYNC110
                    await trio.sleep(0.001)
                hub_scope.cancel()
                got = []
                with pytest.raises(BusBrokenError) as exc:
                    while True:
                        got.append((await b.receive()).payload())
                assert exc.value.close_code == CLOSE_GOING_AWAY
                assert got == list(range(100))
                # a's link closes too (in its own time: the hub closes its links concurrently)
                with pytest.raises(BusBrokenError) as exc:
                    await a.receive()
                assert exc.value.close_code == CLOSE_GOING_AWAY
                with pytest.raises(BusBrokenError):
                    await a.send("b", "after")


async def test_wrong_path_is_rejected_404():
    from bus.ws import WsRejected

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery)
            with pytest.raises(WsRejected) as exc:
                async with open_ws(info.url.replace("/bus", "/nope")):
                    pass
            assert exc.value.status_code == 404
            nursery.cancel_scope.cancel()


async def test_hub_without_token_accepts_any_token():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery, token=None)
            async with open_bus_client(info.url, token="", endpoint_id="a") as a:
                await a.subscribe("x")
            nursery.cancel_scope.cancel()


async def test_auth_failure_is_closed_1008_and_logged_once():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery)
            with capture_logs() as logs:
                async with open_ws(info.url) as ws:
                    await ws.send_message(hello(token="wrong"))
                    assert await close_code(ws) == 1008
            lines = bus_events(logs)
            assert [e["event"] for e in lines] == ["bus.auth_failed"]
            assert "token" in lines[0]["reason"] and lines[0]["peer"].startswith("127.0.0.1:")
            assert hub.statistics().sessions == 0
            nursery.cancel_scope.cancel()


async def test_handshake_timeout_closes_a_mute_connection_1008(autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            _, info = await start_hub(nursery, handshake_timeout=7.0)
            async with open_ws(info.url) as ws:
                t0 = trio.current_time()
                assert await close_code(ws) == 1008
                assert trio.current_time() - t0 == pytest.approx(7.0, abs=0.05)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- `orchestrator bus`

def _bus_cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from orchestrator import cmd_bus
    from orchestrator.cli import build_parser

    err = io.StringIO()
    args = build_parser().parse_args(["bus", *argv])
    with contextlib.redirect_stderr(err):
        code = cmd_bus.run(args)
    return code, err.getvalue()


def test_cli_refuses_a_public_host_without_a_token(monkeypatch):
    monkeypatch.delenv("SWITCHBOARD_TOKEN", raising=False)
    code, err = _bus_cli("--host", "0.0.0.0", "--port", "0")
    assert code == 2
    assert "without a token" in err and "SWITCHBOARD_TOKEN" in err


def test_cli_says_a_blank_env_token_is_blank(monkeypatch):
    # it was taken as unset, and then "set SWITCHBOARD_TOKEN" was the advice
    monkeypatch.setenv("SWITCHBOARD_TOKEN", "   ")
    code, err = _bus_cli("--host", "0.0.0.0", "--port", "0")
    assert code == 2 and "SWITCHBOARD_TOKEN holds only whitespace" in err
    monkeypatch.setenv("SWITCHBOARD_TOKEN", "")  # VAR= cmd: unset, as in any shell
    code, err = _bus_cli("--host", "0.0.0.0", "--port", "0")
    assert code == 2 and "without a token" in err


def test_cli_refuses_an_unreadable_token_file(tmp_path):
    code, err = _bus_cli("--token-file", str(tmp_path / "missing"), "--port", "0")
    assert code == 2 and "cannot read token file" in err


async def test_cli_serves_until_sigterm_with_the_env_token(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, SWITCHBOARD_TOKEN="cli-token")
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "orchestrator", "bus", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        try:
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
            url = line.decode().split()[-1]
            assert url.startswith("ws://127.0.0.1:") and url.endswith("/bus")
            async with open_bus_client(url, token="cli-token", endpoint_id="a") as a:
                await a.subscribe("x")
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0  # a clean stop on request, as the model server
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
