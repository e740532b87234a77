"""Agents benchmark through the full stack: `orchestrator run` (supervisor, embedded bus and sim
model), a worker process, the agent loop, the shell tool, the model link.

1. Rollout: one task whose agent makes TURNS tool-calling turns and then answers. Each call runs
   the shell tool: the command `true`, as the issue specifies, then the numbers 1000 to 1200,
   one per line (~1,000 tokens of output, so the context grows by ~1,000 tokens a turn, as in
   OpenAI's published scenario), printed by the same shell with its builtins. Two modes,
   measured in the same run, sim model time zero (`--sim-zero`):
     ws    WebSocket + connection cache (msgpack): each turn sends only the new items
     http  HTTP, full context every turn (JSON)
   The figure is the attempt's time as the orchestrator journals it (lease sent -> result
   journaled), so it covers bus hops, the worker, the loop, the shell and the model link, and
   not process start-up. `e2e_speedup_zero_model_50_turns_full_stack` = http / ws.
   The same rollouts with the output printed by `seq 1000 1200` instead (byte for byte the
   same output, from a second process: its fork and exec make every turn of both modes
   ~0.4-0.5 ms longer here) run alongside and are reported as `..._seq_tool`: the ratio falls as
   any fixed per-turn cost (a slower tool, a real model) grows, and this shows by how much.

2. Cancel: AGENTS agents (half mid model response: a 10^5-token answer at 1 ms/token; half
   mid tool: `sleep 60` in the shell), on 4 worker processes, against a sim model server in
   its own process (so its stats can be read). When all are under way, the cancel request is
   written to the journal (what `orchestrator cancel RUN` does; the supervisor polls requests
   every 0.25 s, CONTROL_POLL_S) or SIGINT is sent to `orchestrator run`; the figure is the time
   from then until no worker or tool process remains (polling /proc every 5 ms: processes
   whose command line names the run's state directory, or whose working directory is in it),
   `cancel_all_ms_100_agents` (the journal request). The model server's stats confirm that
   nothing is generating any more.

Run: `python bench/agents.py --quick` (under a minute: one rollout per mode, one cancel per
way) or without --quick (5 rollouts per mode, interleaved, and 3 cancels per way, medians:
one rollout of ~0.1 s caught by another process on the 2 shared cores moved a median of 3).
The last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.journal import Journal  # noqa: E402

# ~1,000 tokens of output, the same bytes both ways: the shell's own builtins (the headline),
# or a second process, `seq` (the sensitivity figure)
TOOL_CMDS = {
    "builtin": "true; i=1000; while [ $i -le 1200 ]; do echo $i; i=$((i+1)); done",
    "seq": "true; seq 1000 1200",
}
TOOL_CMD = TOOL_CMDS["builtin"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SWITCHBOARD_TOKEN", None)
    return env


def _orch(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def _run_id(err: pathlib.Path) -> str | None:
    first = err.read_text().split("\n", 1)[0] if err.exists() else ""
    return first.split()[1].rstrip(":") if first.startswith("run ") else None


# ------------------------------------------------------------------ rollout


def rollout_graph(turns: int, mode: str, cmd: str = TOOL_CMD) -> str:
    model = ('transport = "ws"\nencoding = "msgpack"' if mode == "ws"
             else 'transport = "http"\nencoding = "json"')
    step = json.dumps({"call": {"name": "shell", "arguments": {"cmd": cmd}}})
    steps = ",\n  ".join([step] * turns + [json.dumps({"text": "done"})])
    # TOML inline tables from JSON: keys as bare words, values as JSON strings
    steps = steps.replace('{"call": {"name": "shell", "arguments": {"cmd": ',
                          "{call = {name = \"shell\", arguments = {cmd = ")
    steps = steps.replace('{"text": "done"}', '{text = "done"}')
    return f"""
[run]
name = "bench-rollout-{mode}"
timeout = "10m"

[model]
provider = "sim"
{model}

[agents.worker]
instructions = "Run the tool until the work is done."
tools = ["shell"]
max_turns = {turns + 5}
script = [
  {steps}
]

[[tasks]]
id = "rollout"
agent = "worker"
prompt = "Start. ({mode})"
"""


def run_rollout(tmp: pathlib.Path, turns: int, mode: str,
                cmd: str = TOOL_CMD) -> dict[str, Any]:
    d = pathlib.Path(tempfile.mkdtemp(prefix=f"rollout-{mode}-", dir=tmp))
    graph = d / "graph.toml"
    graph.write_text(rollout_graph(turns, mode, cmd))
    err = d / "err"
    t0 = time.perf_counter()
    with err.open("wb") as f:
        code = subprocess.run(_orch("run", str(graph), "--state-dir", str(d / "state"),
                                    "--progress", "none", "--workers", "1", "--sim-zero"),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=f,
                              timeout=600).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"rollout {mode} failed ({code}):\n{err.read_text()}")
    rid = _run_id(err)
    assert rid is not None
    j = Journal.open_readonly(d / "state" / "journal.sqlite")
    (a,) = j.attempts(rid)
    u = a["usage"]
    return {"mode": mode, "turns": u["turns"], "attempt_s": a["ended"] - a["started"],
            "run_wall_s": wall, "model_s": u["model_s"], "tools_s": u["tools_s"],
            "input_tokens": u["input_tokens"], "bytes_sent": u["bytes_sent"]}


# ------------------------------------------------------------------ cancel


def cancel_graph(n: int) -> str:
    half = n // 2
    tasks = "".join(f'\n[[tasks]]\nid = "talk{i}"\nagent = "talker"\n' for i in range(half))
    tasks += "".join(f'\n[[tasks]]\nid = "sleep{i}"\nagent = "sleeper"\n'
                     for i in range(n - half))
    return f"""
[run]
name = "bench-cancel"
max_concurrent = {n}
timeout = "10m"

[agents.talker]
instructions = "Talk."
tools = []
script = [{{text = "long", output_tokens = 100000}}]

[agents.sleeper]
instructions = "Sleep."
tools = ["shell"]
script = [{{call = {{name = "shell", arguments = {{cmd = "sleep 60"}}}}}}, {{text = "never"}}]
{tasks}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/switchboard/stats", timeout=5) as r:
        return dict(json.loads(r.read()))


def _ours(state: str) -> list[int]:
    """Live worker and tool processes of this run: their command line names the state dir
    (workers) or their working directory is inside it (tool processes)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
            if state.encode() in cmd and b" run " not in cmd.replace(b"\0", b" "):
                out.append(int(p))
                continue
            if os.readlink(f"/proc/{p}/cwd").startswith(state):
                out.append(int(p))
        except (OSError, IndexError):
            continue
    return out


def run_cancel(tmp: pathlib.Path, n: int, how: str, model_url: str) -> dict[str, Any]:
    d = pathlib.Path(tempfile.mkdtemp(prefix=f"cancel-{how}-", dir=tmp))
    graph = d / "graph.toml"
    graph.write_text(cancel_graph(n))
    state = str(d / "state")
    err = d / "err"
    before = _stats(model_url)
    with err.open("wb") as f:
        proc = subprocess.Popen(
            _orch("run", str(graph), "--state-dir", state, "--progress", "none",
                  "--workers", "4", "--capacity", str(n), "--model-url", model_url),
            env=_env(), stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 60
        half = n // 2
        while True:  # every agent under way: half generating, half in `sleep 60`
            st = _stats(model_url)
            sleeps = [p for p in _ours(state) if _comm(p) == "sleep"]
            if st["in_flight"] - before["in_flight"] >= half and len(sleeps) >= n - half:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"cancel bench: agents did not start:\n{err.read_text()}")
            time.sleep(0.05)
        pids_before = len(_ours(state))
        rid = _run_id(err)
        assert rid is not None
        t0 = time.perf_counter()
        if how == "journal":
            j = Journal.open(d / "state" / "journal.sqlite")
            j.add_request(rid, "cancel")
            j.close()
        else:
            proc.send_signal(signal.SIGINT)
        while _ours(state):
            time.sleep(0.005)
            if time.perf_counter() - t0 > 30:
                raise SystemExit("cancel bench: processes still there after 30 s")
        gone_ms = (time.perf_counter() - t0) * 1000
        code = proc.wait(timeout=30)
        exit_ms = (time.perf_counter() - t0) * 1000
        after = _stats(model_url)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"how": how, "agents": n, "processes_before": pids_before,
            "all_gone_ms": round(gone_ms, 1), "orchestrator_exit_ms": round(exit_ms, 1),
            "exit_code": code, "in_flight_after": after["in_flight"],
            "responses_cancelled": after["responses_cancelled"] - before["responses_cancelled"]}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition of each (< 60 s)")
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--agents", type=int, default=100)
    args = ap.parse_args()
    reps = 1 if args.quick else 5
    cancel_reps = 1 if args.quick else 3
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-agents-"))
    for tool, cmd in TOOL_CMDS.items():
        print(f"# {args.turns}-turn rollout ({tool}), shell `{cmd}` (~1,000 tokens out) per "
              "turn, sim model time zero; time = attempt as journaled (lease -> result)")
    rolls: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(reps):
        for tool, cmd in TOOL_CMDS.items():
            for mode in ("ws", "http"):
                r = run_rollout(tmp, args.turns, mode, cmd)
                rolls.setdefault((tool, mode), []).append(r)
                print(f"rollout {tool:7s} {mode:4s}: {r['attempt_s']:.3f} s for {r['turns']} "
                      f"turns (run wall {r['run_wall_s']:.2f} s, model {r['model_s']:.3f} s, "
                      f"tools {r['tools_s']:.3f} s, input tokens {r['input_tokens']}, "
                      f"bytes sent {r['bytes_sent']})", flush=True)
    medians = {k: statistics.median(r["attempt_s"] for r in v) for k, v in rolls.items()}
    ws, http = medians[("builtin", "ws")], medians[("builtin", "http")]
    speedup = http / ws
    seq_speedup = medians[("seq", "http")] / medians[("seq", "ws")]
    print(f"rollout speedup (http / ws): {speedup:.2f}x; with `seq` printing the output: "
          f"{seq_speedup:.2f}x")

    port = _free_port()
    model_url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen(
        _orch("model-server", "--port", str(port), "--ttft", "0", "--prefill", "0",
              "--decode", "0.001"), env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                _stats(model_url)
                break
            except OSError:
                time.sleep(0.05)
        print(f"# cancel with {args.agents} agents ({args.agents // 2} mid-response, "
              f"{args.agents - args.agents // 2} in `sleep 60`), 4 workers; includes the "
              "supervisor's 0.25 s control poll for the journal request")
        cancels: dict[str, list[dict[str, Any]]] = {"journal": [], "sigint": []}
        for _ in range(cancel_reps):
            for how in ("journal", "sigint"):
                c = run_cancel(tmp, args.agents, how, model_url)
                cancels[how].append(c)
                print(f"cancel {how:7s}: all worker/tool processes gone in "
                      f"{c['all_gone_ms']:.0f} ms ({c['processes_before']} before), "
                      f"orchestrator exited in {c['orchestrator_exit_ms']:.0f} ms "
                      f"(code {c['exit_code']}); server in_flight {c['in_flight_after']}, "
                      f"responses cancelled {c['responses_cancelled']}", flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=10)
    cancel_ms = statistics.median(c["all_gone_ms"] for c in cancels["journal"])
    sigint_ms = statistics.median(c["all_gone_ms"] for c in cancels["sigint"])
    print(json.dumps({
        "e2e_speedup_zero_model_50_turns_full_stack": round(speedup, 2),
        "rollout_ws_s": round(ws, 3), "rollout_http_s": round(http, 3),
        "e2e_speedup_zero_model_50_turns_full_stack_seq_tool": round(seq_speedup, 2),
        "rollout_ws_s_seq_tool": round(medians[("seq", "ws")], 3),
        "rollout_http_s_seq_tool": round(medians[("seq", "http")], 3),
        "turns": args.turns,
        "cancel_all_ms_100_agents": round(cancel_ms, 1),
        "cancel_all_ms_100_agents_sigint": round(sigint_ms, 1),
        "agents": args.agents,
        "in_flight_after_cancel": max(c["in_flight_after"] for v in cancels.values()
                                      for c in v),
        "targets": {"speedup_min": 3.0, "cancel_ms_max": 1000},
    }))


if __name__ == "__main__":
    main()
