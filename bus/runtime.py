"""Owns the process-wide settings a long-running Switchboard process (orchestrator run, worker,
hub, model server) applies once, after its imports and before its event loop starts."""

from __future__ import annotations

import gc

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX (Windows): no such limit to raise
    resource = None  # type: ignore[assignment]

# CPython starts a young-generation collection every 700 net allocations of container objects.
# A trio service allocates thousands a millisecond (tasks, cancel scopes, frames, dicts) and
# frees nearly all of them by reference counting, so most of those collections find nothing:
# on the orchestrator bench (2,000 one-turn tasks, two workers) the orchestrator process ran
# ~480 collections for ~0.18 s; at 20,000 it ran 6 for ~0.02 s. Cyclic garbage (exceptions
# and their tracebacks, mostly) now waits for up to 20,000 allocations instead of 700: a few
# MB at most, the older generations' ratios are unchanged.
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, classes, functions: never garbage, so no later
    full collection walks them again) and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 and gen0 < GC_GEN0_THRESHOLD:  # 0: collection is off; leave it so
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


# macOS refuses a soft limit above OPEN_MAX (10240) even when the hard limit is unlimited.
_DARWIN_OPEN_MAX = 10_240


def raise_open_files_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit, as Go and most servers
    do at start. Every bus peer, model WebSocket and sim-server connection holds one: with the
    common default of 1,024, an orchestrator holding 1,000 agent sessions on the embedded sim
    model runs out ("Too many open files"). Returns the soft limit now (None: no such limit)."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        for target in (want, min(want, _DARWIN_OPEN_MAX)):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return target
            except (ValueError, OSError):
                continue
    return soft


def tune_process() -> None:
    """What a long-running command applies once, just before its event loop: the collector
    (tune_gc) and the open-files limit (raise_open_files_limit)."""
    tune_gc()
    raise_open_files_limit()
