"""The embedded sim's own process (orchestrator.simproc) with real child processes: it comes up
and says where, its log lines reach the sink with the run id, an exit nobody asked for is
reported with the reason, stop() is not reported, and a child that cannot start says why."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
import trio

from modellink.sim import SimConfig
from orchestrator.simproc import SimStartError, start_sim_process


async def _stats(base_url: str, token: str) -> tuple[int, bytes]:
    host, port = base_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET /v1/switchboard/stats HTTP/1.1\r\nHost: x\r\n"
                              f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
                              .encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_sim_child_serves_logs_with_the_run_id_and_reports_an_exit_it_was_not_asked_for(
        tmp_path: Any):
    lines: list[bytes] = []
    exits: list[tuple[int, list[str]]] = []
    exited = trio.Event()

    async def on_exit(code: int, tail: list[str]) -> None:
        exits.append((code, tail))
        exited.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            child = await start_sim_process(
                nursery, host="127.0.0.1", token="tok-1", sim=SimConfig.zero(),
                log_level="info", run_id="run-7", sink=lines.append, on_exit=on_exit,
                cwd=tmp_path)
            assert os.readlink(f"/proc/{child.proc.pid}/cwd") == str(tmp_path)
            status, body = await _stats(child.base_url, "tok-1")
            assert status == 200 and json.loads(body)["responses_started"] == 0
            assert (await _stats(child.base_url, "wrong"))[0] == 401  # the token is its key
            # its own process group: a terminal's Ctrl-C does not reach it directly
            assert os.getpgid(child.proc.pid) != os.getpgid(0)
            os.kill(child.proc.pid, signal.SIGKILL)
            await exited.wait()
    assert exits == [(-signal.SIGKILL, [])]
    logged = [json.loads(line) for chunk in lines for line in chunk.split(b"\n")]
    start = [e for e in logged if e["event"] == "model_server.start"]
    assert start and start[0]["run_id"] == "run-7"


async def test_a_stopped_sim_child_is_not_reported_and_ends_with_its_nursery(tmp_path: Any):
    exits: list[int] = []

    async def on_exit(code: int, tail: list[str]) -> None:
        exits.append(code)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            child = await start_sim_process(
                nursery, host="127.0.0.1", token="t", sim=SimConfig.zero(), log_level="info",
                run_id="r", sink=None, on_exit=on_exit)
            await child.stop()
            assert child.proc.returncode == 0  # SIGTERM: a clean stop
            other = await start_sim_process(
                nursery, host="127.0.0.1", token="t", sim=SimConfig.zero(), log_level="info",
                run_id="r", sink=None, on_exit=on_exit)
            nursery.cancel_scope.cancel()  # the run's nursery ends: the child is stopped too
    assert other.proc.returncode == 0
    assert exits == []


async def test_a_sim_child_that_cannot_start_says_why():
    async def on_exit(code: int, tail: list[str]) -> None:
        raise AssertionError("not started, so not reported")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            with pytest.raises(SimStartError) as info:
                await start_sim_process(
                    nursery, host="127.0.0.1", token="t", sim=SimConfig.zero(),
                    log_level="loud", run_id="r", sink=None, on_exit=on_exit)
    msg = str(info.value)
    assert msg.startswith("the embedded sim model server did not start (it exited with 2 "
                          "before listening)"), msg
    assert "loud" in msg  # its own error line, from its stderr


async def test_a_sim_child_cancelled_while_it_starts_does_not_outlive_it(tmp_path: Any):
    from agent_helpers import procs_mentioning

    async def on_exit(code: int, tail: list[str]) -> None:
        raise AssertionError("not started, so not reported")

    run_id = f"cancelled-{os.getpid()}-{id(tmp_path)}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.05) as scope:  # Python start-up alone takes longer
                await start_sim_process(
                    nursery, host="127.0.0.1", token="t", sim=SimConfig.zero(),
                    log_level="info", run_id=run_id, sink=None, on_exit=on_exit)
    assert scope.cancelled_caught
    assert procs_mentioning(run_id) == []
