"""Model link benchmark: an agent rollout over WebSocket deltas vs HTTP full context.

OpenAI's published scenario: one agent session of T model turns (20 and 50); after each turn a
tool output of about 1,000 tokens goes back. Four modes in the same run, against the sim model
server running in its own process (client and server do not share an event loop or a core):

  ws-msgpack      one WebSocket, connection cache, msgpack deltas (previous_response_id + new items)
  ws-json         the same with JSON text frames (what OpenAI's endpoint speaks)
  http-new        POST /v1/responses, full context every turn, a new TCP connection per turn
  http-keepalive  the same on one kept-alive connection

Cost model: the sim charges ttft_s + prefill_s_per_token x uncached input tokens before the first
event and decode_s_per_token per output token; its prefix cache is global to the server (and sized
here to hold every session), so both transports get the same cached_tokens and the same simulated
time. Every session's first message
carries a nonce, so no session reuses another's cache. "Overhead" is a turn's elapsed time minus
that simulated model time (computed from the turn's usage and the server's rates): the time spent
in transport, encoding, validation and rendering, on both sides.

Run: `python bench/model_link.py --quick` (under a minute: single sessions at 20 and 50 turns with
model time zero, 20 turns at the sim's default rates, 100 concurrent sessions of 10 turns with
model time zero) or without --quick (several minutes: also 50 turns at default rates, and
100 concurrent sessions of 50 turns at both rates).
The last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modellink.client import ModelEndpoint, open_model_session  # noqa: E402
from modellink.sim import SimConfig  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "ws-msgpack": {"transport": "ws", "encoding": "msgpack"},
    "ws-json": {"transport": "ws", "encoding": "json"},
    "http-new": {"transport": "http", "encoding": "json", "keepalive": False},
    "http-keepalive": {"transport": "http", "encoding": "json", "keepalive": True},
}
WS_MODES = ("ws-msgpack", "ws-json")
HTTP_MODES = ("http-new", "http-keepalive")
MAX_TURNS = 200

INSTRUCTIONS = (
    "You are a careful coding agent. Read the files you need with read_file, one call per turn, "
    "then answer with a short summary of what you found and what you would change."
)
TOOLS = [{
    "type": "function", "name": "read_file",
    "description": "Read a file of the workspace and return its text with line numbers.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"], "additionalProperties": False},
}]

_WORDS = ("def", "return", "self", "value", "result", "import", "for", "in", "range", "if",
          "else", "path", "file", "line", "count", "items", "config", "timeout", "error",
          "raise", "None", "True", "False", "async", "await", "with", "open", "read", "write",
          "test", "assert", "agent", "tool", "model", "turn", "context", "cache", "server")


def tool_output(session: int, turn: int, tokens: int = 1000) -> str:
    """About `tokens` tokens (the sim's tokenizer) of numbered code-like lines, per session/turn."""
    from modellink.tokenizer import get_tokenizer

    count = get_tokenizer().count
    rng = random.Random(f"{session}:{turn}")
    lines: list[str] = []
    n = 0
    while n < tokens:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 9))]
        line = f"{len(lines) + 1:4d}    {' '.join(words)}({rng.randint(0, 999)})"
        lines.append(line)
        n += count(line) + 1
    return "\n".join(lines)


def script(turns: int) -> str:
    """The model's part: a read_file call every turn (the rollout stops after T turns)."""
    return json.dumps([{"call": {"name": "read_file", "arguments": {"path": f"src/module_{i}.py"}}}
                       for i in range(turns)])


def sim_config(rates: str) -> SimConfig:
    # The script lives in the server (default_script), not in each request's metadata: a real
    # agent's requests carry no script, and 50 steps would add ~3 KB to every WebSocket delta.
    # The prefix cache holds every session's context (100 x 50 turns x ~1.1k tokens ~ 6M tokens):
    # with the default 2M tokens, 100 interleaved sessions thrash the LRU and the simulated
    # prefill of the misses, not the transport, decides the result.
    base = SimConfig.zero() if rates == "zero" else SimConfig()
    return attrs.evolve(base, default_script=script(MAX_TURNS), prefix_cache_blocks=1 << 19)


# ------------------------------------------------------------------ server process


def serve_main(rates: str) -> None:
    """Server role: start the sim model server on 127.0.0.1:0, print its base_url, serve."""
    from bus.logs import configure_logging
    from modellink.server import ModelServerConfig, serve_model

    configure_logging(json=False, level="warning", stream=sys.stderr)
    sim = sim_config(rates)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve_model, ModelServerConfig(
                host="127.0.0.1", port=0, token=None, sim=sim))
            print(json.dumps({"base_url": info.base_url}), flush=True)

    trio.run(run)


@attrs.frozen
class Server:
    proc: subprocess.Popen[str]
    base_url: str
    sim: SimConfig

    def cpu_s(self) -> float:
        """The server process's CPU seconds so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")


def start_server(rates: str) -> Server:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", rates],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith("{"):
            return Server(proc=proc, base_url=json.loads(line)["base_url"],
                          sim=sim_config(rates))
    raise SystemExit(f"the {rates} sim server did not start (exit {proc.wait()})")


# ------------------------------------------------------------------ client


@attrs.frozen
class Turn:
    bytes_sent: int
    bytes_received: int
    elapsed_s: float
    model_s: float
    resent: bool

    @property
    def overhead_s(self) -> float:
        return self.elapsed_s - self.model_s


@attrs.frozen
class Rollout:
    turns: list[Turn]
    e2e_s: float


def model_time(sim: SimConfig, usage: Any) -> float:
    uncached = usage.input_tokens - usage.cached_tokens
    return sim.ttft_s + sim.prefill_s_per_token * uncached + sim.decode_s_per_token * \
        usage.output_tokens


async def rollout(server: Server, mode: str, turns: int, session: int,
                  outputs: list[str]) -> Rollout:
    endpoint = ModelEndpoint(base_url=server.base_url, model="sim", **MODES[mode])
    rows: list[Turn] = []
    items: list[dict[str, Any]] = [{"type": "message", "role": "user",
                                    "content": f"[session {session}-{mode}-{time.time_ns()}] "
                                               "Review the modules and tell me what to change."}]
    t0 = time.perf_counter()
    async with open_model_session(endpoint, instructions=INSTRUCTIONS, tools=TOOLS) as s:
        for i in range(turns):
            r = await s.turn(items)
            rows.append(Turn(bytes_sent=r.bytes_sent, bytes_received=r.bytes_received,
                             elapsed_s=r.elapsed_s, model_s=model_time(server.sim, r.usage),
                             resent=r.resent_full_context))
            items = [{"type": "function_call_output", "call_id": c.call_id, "output": outputs[i]}
                     for c in r.function_calls]
    e2e = time.perf_counter() - t0
    if len(rows) != turns or any(t.resent for t in rows):
        raise SystemExit(f"{mode}: expected {turns} turns without resends, got {len(rows)}")
    return Rollout(turns=rows, e2e_s=e2e)


@attrs.frozen
class ModeResult:
    mode: str
    sessions: int
    turns: int
    bytes_first: float  # median over sessions of turn 1's bytes sent
    bytes_last: float  # ... of turn T's
    overhead_first_ms: float
    overhead_last_ms: float  # median over turns T-4..T
    overhead_mean_ms: float
    model_total_s: float  # median simulated model time of a rollout
    e2e_s: float  # one session: median rollout time; concurrent: wall time of all sessions
    client_cpu_s: float
    server_cpu_s: float


async def run_mode(server: Server, mode: str, turns: int, sessions: int, repeats: int,
                   outputs: list[list[str]]) -> ModeResult:
    rollouts: list[Rollout] = []
    walls: list[float] = []
    cpu0, scpu0 = time.process_time(), server.cpu_s()
    for rep in range(repeats):
        done: list[Rollout] = []

        async def one(k: int, rep: int = rep, done: list[Rollout] = done) -> None:
            done.append(await rollout(server, mode, turns, k + rep * sessions,
                                      outputs[k % len(outputs)]))

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(sessions):
                nursery.start_soon(one, k)
        walls.append(time.perf_counter() - t0)
        rollouts += done
    cpu, scpu = time.process_time() - cpu0, server.cpu_s() - scpu0
    med = statistics.median
    return ModeResult(
        mode=mode, sessions=sessions, turns=turns,
        bytes_first=med(r.turns[0].bytes_sent for r in rollouts),
        bytes_last=med(r.turns[-1].bytes_sent for r in rollouts),
        overhead_first_ms=1000 * med(r.turns[0].overhead_s for r in rollouts),
        # One turn is one sample of a noisy clock: take the last five turns of each rollout.
        overhead_last_ms=1000 * med(t.overhead_s for r in rollouts for t in r.turns[-5:]),
        overhead_mean_ms=1000 * med(statistics.fmean(t.overhead_s for t in r.turns)
                                    for r in rollouts),
        model_total_s=med(sum(t.model_s for t in r.turns) for r in rollouts),
        e2e_s=med(r.e2e_s for r in rollouts) if sessions == 1 else med(walls),
        client_cpu_s=cpu / repeats, server_cpu_s=scpu / repeats,
    )


def report(title: str, results: dict[str, ModeResult]) -> None:
    print(f"\n== {title}")
    print(f"{'mode':15} {'bytes t1':>9} {'bytes tN':>10} {'ovh t1 ms':>9} {'ovh@tN ms':>9} "
          f"{'ovh avg':>8} {'model s':>8} {'e2e s':>8} {'cli cpu':>8} {'srv cpu':>8}")
    for r in results.values():
        print(f"{r.mode:15} {r.bytes_first:9.0f} {r.bytes_last:10.0f} {r.overhead_first_ms:9.2f} "
              f"{r.overhead_last_ms:9.2f} {r.overhead_mean_ms:8.2f} {r.model_total_s:8.3f} "
              f"{r.e2e_s:8.3f} {r.client_cpu_s:8.2f} {r.server_cpu_s:8.2f}")
    for ws in WS_MODES:
        for http in HTTP_MODES:
            a, b = results[ws], results[http]
            print(f"  {http} / {ws}: bytes@tN x{b.bytes_last / a.bytes_last:.1f}, "
                  f"overhead@tN x{b.overhead_last_ms / max(a.overhead_last_ms, 1e-6):.1f}, "
                  f"e2e x{b.e2e_s / a.e2e_s:.2f} ({100 * (1 - a.e2e_s / b.e2e_s):.0f}% less time)")


async def bench(args: argparse.Namespace, servers: dict[str, Server]) -> dict[str, Any]:
    turn_counts = [int(t) for t in args.turns.split(",")]
    hi, lo = max(turn_counts), min(turn_counts)
    default_turns = [lo] if args.quick else turn_counts
    conc_rates = ("zero",) if args.quick else ("zero", "default")
    n_out = max(*turn_counts, args.concurrent_turns)
    outputs = [[tool_output(s, i) for i in range(n_out)] for s in range(8)]
    table: dict[tuple[str, int, int], dict[str, ModeResult]] = {}
    print("columns: bytes t1/tN = bytes the client sent in turn 1 / turn T (WebSocket frame\n"
          "  payloads; HTTP request head + body); ovh = a turn's elapsed time minus its simulated\n"
          "  model time (ttft + prefill x uncached + decode x output, from the server's rates and\n"
          "  the turn's usage); ovh@tN = median of turns T-4..T; ovh avg = mean over the rollout;\n"
          "  model s = simulated model time of a rollout; e2e s = one rollout's wall time (median),\n"
          "  or with many sessions the wall time until all finish; cpu = CPU seconds per repeat.\n"
          "  Medians over sessions and repeats. Ratios are HTTP / WebSocket.")
    plan = [("zero", turns, 1, args.repeats) for turns in turn_counts]
    plan += [("default", turns, 1, max(1, args.repeats // 2)) for turns in default_turns]
    plan += [(rates, args.concurrent_turns, args.sessions, 1) for rates in conc_rates]
    for rates, turns, sessions, repeats in plan:
        server = servers[rates]
        results: dict[str, ModeResult] = {}
        # Many sessions saturate both cores, so other load on the machine moves the wall time:
        # two passes, forward then reverse order, and the faster pass of each mode counts.
        passes = 2 if sessions > 1 else 1
        for n in range(passes):
            for mode in (list(MODES) if n % 2 == 0 else list(reversed(MODES))):
                # One short warm-up rollout per mode: first-use costs (imports, DNS, caches) are
                # not what the benchmark is about.
                await run_mode(server, mode, 2, 1, 1, outputs)
                res = await run_mode(server, mode, turns, sessions, repeats, outputs)
                if mode not in results or res.e2e_s < results[mode].e2e_s:
                    results[mode] = res
        what = "model time zero" if rates == "zero" else (
            f"sim default rates: ttft {server.sim.ttft_s * 1000:.0f} ms, prefill "
            f"{server.sim.prefill_s_per_token * 1e6:.0f} us/token uncached, decode "
            f"{server.sim.decode_s_per_token * 1000:.1f} ms/token")
        report(f"{sessions} session(s) x {turns} turns, {what}"
               + (f", median of {repeats}" if repeats > 1 else "")
               + (f", faster of {passes} passes" if passes > 1 else ""), results)
        table[(rates, turns, sessions)] = results
    zhi = table[("zero", hi, 1)]
    dlo = table[("default", lo, 1)]
    conc = table[("zero", args.concurrent_turns, args.sessions)]
    ws, ka = "ws-msgpack", "http-keepalive"
    summary: dict[str, Any] = {
        "turns": turn_counts,
        f"bytes_ratio_http_vs_ws_turn{hi}": round(zhi[ka].bytes_last / zhi[ws].bytes_last, 1),
        f"overhead_ratio_http_vs_ws_turn{hi}":
            round(zhi[ka].overhead_last_ms / zhi[ws].overhead_last_ms, 1),
        f"overhead_ratio_http_new_vs_ws_turn{hi}":
            round(zhi["http-new"].overhead_last_ms / zhi[ws].overhead_last_ms, 1),
        f"e2e_speedup_zero_model_{hi}_turns": round(zhi[ka].e2e_s / zhi[ws].e2e_s, 2),
        f"e2e_speedup_pct_default_rates_{lo}_turns":
            round(100 * (dlo[ka].e2e_s / dlo[ws].e2e_s - 1), 1),
        f"e2e_time_saved_pct_default_rates_{lo}_turns":
            round(100 * (1 - dlo[ws].e2e_s / dlo[ka].e2e_s), 1),
    }
    if ("default", hi, 1) in table:
        dhi = table[("default", hi, 1)]
        summary[f"e2e_speedup_pct_default_rates_{hi}_turns"] = round(
            100 * (dhi[ka].e2e_s / dhi[ws].e2e_s - 1), 1)
    summary.update({
        "concurrent_sessions": args.sessions,
        "concurrent_turns": args.concurrent_turns,
        "concurrent_e2e_speedup_zero_model": round(conc[ka].e2e_s / conc[ws].e2e_s, 2),
        "concurrent_bytes_ratio_last_turn": round(conc[ka].bytes_last / conc[ws].bytes_last, 1),
        # CPU seconds (client + server) for the same work: less moved by other load than wall time.
        "concurrent_cpu_ratio_http_vs_ws":
            round((conc[ka].client_cpu_s + conc[ka].server_cpu_s)
                  / (conc[ws].client_cpu_s + conc[ws].server_cpu_s), 2),
        f"ws_json_vs_msgpack_overhead_turn{hi}":
            round(zhi["ws-json"].overhead_last_ms / zhi[ws].overhead_last_ms, 2),
        "quick": args.quick,
    })
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and turns (< 60 s)")
    ap.add_argument("--turns", default="20,50", help="rollout lengths (default 20,50)")
    ap.add_argument("--sessions", type=int, default=100, help="concurrent sessions (default 100)")
    ap.add_argument("--concurrent-turns", type=int, default=None,
                    help="turns per concurrent session (default: the largest --turns; "
                         "10 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="single-session repeats")
    ap.add_argument("--serve", choices=("zero", "default"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_main(args.serve)
        return 0
    turns = [int(t) for t in args.turns.split(",")]
    if args.concurrent_turns is None:
        args.concurrent_turns = 10 if args.quick else max(turns)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 6
    servers: dict[str, Server] = {}
    t0 = time.perf_counter()
    try:
        for rates in ("zero", "default"):
            servers[rates] = start_server(rates)
        summary = trio.run(bench, args, servers)
    finally:
        for s in servers.values():
            s.proc.terminate()
            s.proc.wait(timeout=10)
    summary["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
