"""Owns the process-wide settings a long-running Switchboard process (orchestrator run, worker,
hub, model server) applies once, after its imports and before its event loop starts."""

from __future__ import annotations

import gc

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
