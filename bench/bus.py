"""Bus benchmark: routed throughput, latency at half that rate, and a raw WebSocket baseline.

    python bench/bus.py --quick      # < 60 s
    python bench/bus.py              # longer, steadier

Every role runs in its own process on loopback (this script again, with --role): a hub, a
publisher and a consumer, so the hub has a core to itself as it would in production. Messages
are direct sends of a ~100-byte msgpack body [seq, t_sent_ns, padding] from the publisher to
the consumer through the hub. Throughput is end to end (first to last message at the
consumer) with a credit window so the publisher never outruns the hub's slow-consumer limit.
Latency is measured at half the measured throughput: the publisher paces sends every
millisecond, the consumer subtracts the send time (CLOCK_MONOTONIC is shared by processes).
latency_cpu_us_per_msg / latency_cpu_pct_of_one_core: each process's CPU per message over the
middle of that paced run, and all three's share of the cores (200 = all of a 2-core machine),
so each run says how near saturation its p99 was measured. latency_other_cpu_pct_of_one_core
and latency_steal_pct_of_one_core: over the same span, the CPU everything else on the machine
used and the time the hypervisor stole from its cores (Linux /proc/stat): on a shared VM the
p99 follows these.
raw_ws_msgs_per_s: plain trio-websocket echo, one message per WS message, pipelined; each
counted message crosses the socket twice and the echo server both receives and sends it.
raw_ws_oneway_msgs_per_s: the same server, the client streams one way and waits for one ack
(the research notes' "tput" method), so the two baselines bracket one-message-per-frame cost.
raw_fastws_*: the same two baselines on bus.ws's own connection (bus.wsframe, no reader task),
which the hub, its clients and the model link use since trio-websocket cost ~2x the CPU.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import array
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

import msgpack
import trio
import trio_websocket  # the raw baseline the issue names: the library itself

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bus.client import open_bus_client  # noqa: E402
from bus.config import HubConfig  # noqa: E402
from bus.hub import serve_bus  # noqa: E402
from bus.logs import configure_logging  # noqa: E402
from bus.runtime import tune_process  # noqa: E402
from bus.ws import WsClosed, WsConfig, open_ws, serve_ws  # noqa: E402

TOKEN = "bench"
SCRIPT = os.path.abspath(__file__)
PAD = b"x" * 87  # body = msgpack [seq, t_ns, PAD]: 100 bytes
WINDOW = 8000  # messages in flight before the publisher waits for credit
CREDIT_EVERY = 2000


def body(seq: int) -> list[Any]:
    return [seq, time.monotonic_ns(), PAD]


# ---------------------------------------------------------------- roles (child processes)

async def role_hub(args: argparse.Namespace) -> None:
    tune_process()  # as `orchestrator bus` does before its event loop
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_bus, HubConfig(port=0, token=TOKEN))
        print(json.dumps({"url": info.url}), flush=True)


async def role_publisher(args: argparse.Namespace) -> None:
    async with open_bus_client(args.url, token=TOKEN, endpoint_id="pub") as client:
        credited = 0
        more = trio.Event()

        async def credits() -> None:
            nonlocal credited, more
            async for msg in client:
                credited = max(credited, msg.payload())
                more.set()
                more = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(credits)
            await client.request("cons", "ready?", timeout=10)
            n, rate = args.n, args.rate
            sent = 0
            if rate == 0:  # as fast as the credit window allows
                while sent < n:
                    limit = min(n, credited + WINDOW)
                    while sent < limit:
                        await client.send("cons", body(sent))
                        sent += 1
                    if sent < n and sent >= credited + WINDOW:
                        await more.wait()
            else:  # paced: every millisecond, the messages that are due
                t0 = trio.current_time()
                while sent < n:
                    due = min(n, int((trio.current_time() - t0) * rate) + 1)
                    while sent < due:
                        await client.send("cons", body(sent))
                        sent += 1
                    await trio.sleep(0.001)
            while credited < n:
                await more.wait()
            nursery.cancel_scope.cancel()


async def role_consumer(args: argparse.Namespace) -> None:
    n = args.n
    # An array, not a list: a list of a million ints made each of the consumer's full garbage
    # collections walk a million items (35 ms), and those pauses were the p99 it measured.
    lat = array.array("q")
    async with open_bus_client(args.url, token=TOKEN, endpoint_id="cons") as client:
        print(json.dumps({"connected": True}), flush=True)  # the conductor starts the publisher
        with trio.move_on_after(30) as idle:
            ready = await client.receive()
        if idle.cancelled_caught:
            print(json.dumps({"error": "the publisher did not ask 'ready?' within 30 s"}),
                  flush=True)
            return
        await client.reply(ready, "go")
        got = 0
        t_first = t_last = 0.0
        while got < n:
            with trio.move_on_after(15) as idle:
                msg = await client.receive()
            if idle.cancelled_caught:
                print(json.dumps({"error": f"nothing for 15 s after {got} messages"}),
                      flush=True)
                return
            batch = [msg]
            while True:
                try:
                    batch.append(client.receive_nowait())
                except trio.WouldBlock:
                    break
            now = time.monotonic_ns()
            if got == 0:
                t_first = time.perf_counter()
            for m in batch:
                seq, t_sent, _ = msgpack.unpackb(m.body)
                if args.latency:
                    lat.append(now - t_sent)
            got += len(batch)
            t_last = time.perf_counter()
            if got % CREDIT_EVERY < len(batch) or got >= n:
                client.send_nowait("pub", got)
        stats = client.statistics()
    lat = array.array("q", sorted(lat))
    out: dict[str, Any] = {"received": got, "seconds": t_last - t_first,
                           "frames_in": stats.frames_in}
    if lat:
        out["p50_ms"] = lat[len(lat) // 2] / 1e6
        out["p99_ms"] = lat[int(len(lat) * 0.99)] / 1e6
        out["max_ms"] = lat[-1] / 1e6
    print(json.dumps(out), flush=True)


WS = WsConfig(message_queue_size=64, receive_buffer_size=None)


async def role_raw_server(args: argparse.Namespace) -> None:
    async def echo(request: Any) -> None:
        ws = await request.accept()
        try:
            first = await ws.get_message()
            if first[:7] == b"oneway:":  # count n messages, then one ack
                for _ in range(int(first[7:])):
                    await ws.get_message()
                await ws.send_message(b"done")
                return
            await ws.send_message(first)
            while True:
                await ws.send_message(await ws.get_message())
        except (WsClosed, trio_websocket.ConnectionClosed):
            return

    async with trio.open_nursery() as nursery:
        if args.impl == "fast":
            _, port = await nursery.start(serve_ws, echo, "127.0.0.1", 0)
        else:
            server = await nursery.start(functools.partial(
                trio_websocket.serve_websocket, echo, "127.0.0.1", 0, ssl_context=None,
                message_queue_size=WS.message_queue_size,
                receive_buffer_size=WS.receive_buffer_size))
            port = server.port
        print(json.dumps({"url": f"ws://127.0.0.1:{port}/"}), flush=True)


def _dial(args: argparse.Namespace) -> Any:
    if args.impl == "fast":
        return open_ws(args.url, config=WS)
    return trio_websocket.open_websocket_url(
        args.url, message_queue_size=WS.message_queue_size,
        receive_buffer_size=WS.receive_buffer_size)


async def role_raw_client(args: argparse.Namespace) -> None:
    n = args.n
    payload = msgpack.packb(body(0))
    async with _dial(args) as ws:
        t0 = time.perf_counter()

        async def sender() -> None:
            for _ in range(n):
                await ws.send_message(payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            for _ in range(n):
                await ws.get_message()
        seconds = time.perf_counter() - t0
    async with _dial(args) as ws:
        await ws.send_message(b"oneway:%d" % n)
        t0 = time.perf_counter()
        for _ in range(n):
            await ws.send_message(payload)
        await ws.get_message()
        oneway_seconds = time.perf_counter() - t0
    print(json.dumps({"echoed": n, "seconds": seconds, "oneway_seconds": oneway_seconds}),
          flush=True)


ROLES = {"hub": role_hub, "publisher": role_publisher, "consumer": role_consumer,
         "raw-server": role_raw_server, "raw-client": role_raw_client}


# ---------------------------------------------------------------- the conductor

async def spawn(role: str, *extra: str) -> tuple[trio.Process, Any]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, SCRIPT, "--role", role, *extra],
        stdout=subprocess.PIPE)
    return proc, proc.stdout


async def read_json(stream: Any) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise RuntimeError("child exited before reporting")
        buf += chunk
    return json.loads(buf)  # type: ignore[no-any-return]


def box_cpu_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, all cores (Linux /proc/stat):
    busy is every process's user + system + interrupt time; stolen is time the hypervisor
    gave this VM's cores to someone else while they had work."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_pair(url: str, n: int, rate: int, latency: bool,
                   hub: trio.Process | None = None) -> dict[str, Any]:
    cons, cons_out = await spawn("consumer", "--url", url, "--n", str(n),
                                 *(["--latency"] if latency else []))
    # The publisher starts once the consumer holds its endpoint id, so its "ready?" finds it (a
    # fixed pause here lost that race on a busy machine: no route, and the run hung).
    await read_json(cons_out)
    pub, _ = await spawn("publisher", "--url", url, "--n", str(n), "--rate", str(rate))
    load: dict[str, Any] = {}
    if rate and hub is not None:
        # CPU of each process over the paced run's middle (past start-up, before the end):
        # how much of the two cores the latency is measured at, in the same run.
        procs = {"hub": hub.pid, "publisher": pub.pid, "consumer": cons.pid}
        run_s = n / rate
        await trio.sleep(min(1.5, run_s / 4))
        c0, t0 = {k: cpu_seconds(p) for k, p in procs.items()}, time.perf_counter()
        box0 = box_cpu_seconds()
        await trio.sleep(run_s / 2)
        dt = time.perf_counter() - t0
        cpu = {k: cpu_seconds(p) - c0[k] for k, p in procs.items()}
        box_busy, box_steal = (b - a for a, b in zip(box0, box_cpu_seconds(), strict=True))
        load = {"cpu_us_per_msg": {k: round(v / (rate * dt) * 1e6, 2) for k, v in cpu.items()},
                "cpu_pct_of_one_core": round(sum(cpu.values()) / dt * 100),
                # the rest of the machine over the same span: other processes (this script's
                # conductor included) and the hypervisor's steal, in % of one core
                "other_cpu_pct_of_one_core": round(max(0.0, box_busy - sum(cpu.values()))
                                                   / dt * 100),
                "steal_pct_of_one_core": round(box_steal / dt * 100)}
    result = await read_json(cons_out) | load
    await cons.wait()
    await pub.wait()
    if "error" in result or pub.returncode:
        raise RuntimeError(f"run failed: {result}, publisher exit {pub.returncode}")
    return result


async def conductor(quick: bool) -> dict[str, Any]:
    n_tput = 300_000 if quick else 1_500_000
    lat_seconds = 3.0 if quick else 10.0
    n_raw = 50_000 if quick else 150_000
    hub, hub_out = await spawn("hub")
    try:
        url = (await read_json(hub_out))["url"]
        await run_pair(url, 20_000, 0, False)  # warm-up
        cpu0 = cpu_seconds(hub.pid)
        runs = [await run_pair(url, n_tput, 0, False) for _ in range(1 if quick else 3)]
        hub_cpu_us = (cpu_seconds(hub.pid) - cpu0) / (n_tput * len(runs)) * 1e6
        rates = sorted(r["received"] / r["seconds"] for r in runs)
        routed = rates[len(rates) // 2]
        half = int(routed / 2)
        lat = await run_pair(url, int(half * lat_seconds), half, True, hub)
    finally:
        hub.terminate()
        await hub.wait()
    raw: dict[str, tuple[float, float]] = {}
    for impl in ("tw", "fast"):
        raw_srv, raw_out = await spawn("raw-server", "--impl", impl)
        try:
            raw_url = (await read_json(raw_out))["url"]
            raw_runs = []
            for _ in range(1 if quick else 3):
                cli, cli_out = await spawn("raw-client", "--url", raw_url, "--n", str(n_raw),
                                           "--impl", impl)
                raw_runs.append(await read_json(cli_out))
                await cli.wait()
        finally:
            raw_srv.terminate()
            await raw_srv.wait()
        raw_rates = sorted(r["echoed"] / r["seconds"] for r in raw_runs)
        oneway_rates = sorted(r["echoed"] / r["oneway_seconds"] for r in raw_runs)
        raw[impl] = (raw_rates[len(raw_rates) // 2], oneway_rates[len(oneway_rates) // 2])
    return {
        "routed_msgs_per_s": round(routed),
        "routed_runs": [round(r) for r in rates],
        "p50_ms": round(lat["p50_ms"], 3),
        "p99_ms": round(lat["p99_ms"], 3),
        "max_ms": round(lat["max_ms"], 3),
        "latency_rate_msgs_per_s": half,
        "latency_messages": lat["received"],
        # at the latency rate: each process's CPU per message, and all three's share of the
        # cores (200 = both of a 2-core machine); p99 climbs as this nears the whole
        "latency_cpu_us_per_msg": lat["cpu_us_per_msg"],
        "latency_cpu_pct_of_one_core": lat["cpu_pct_of_one_core"],
        # over the same span, what else used the two cores: other processes, and time the
        # hypervisor stole (a shared VM's p99 follows these more than the bus's own CPU)
        "latency_other_cpu_pct_of_one_core": lat["other_cpu_pct_of_one_core"],
        "latency_steal_pct_of_one_core": lat["steal_pct_of_one_core"],
        "raw_ws_msgs_per_s": round(raw["tw"][0]),
        "raw_ws_oneway_msgs_per_s": round(raw["tw"][1]),
        "raw_fastws_msgs_per_s": round(raw["fast"][0]),
        "raw_fastws_oneway_msgs_per_s": round(raw["fast"][1]),
        "hub_cpu_us_per_msg": round(hub_cpu_us, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "body_bytes": len(msgpack.packb(body(0))),
        "messages": n_tput,
        "quick": quick,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller runs, under a minute")
    p.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["tw", "fast"], default="fast", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        configure_logging(json=True, level="warning")  # stderr: stdout carries the results
        try:
            trio.run(ROLES[args.role], args)
        except KeyboardInterrupt:
            pass
        return
    t0 = time.perf_counter()
    result = trio.run(conductor, args.quick)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
