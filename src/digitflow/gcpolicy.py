"""Fewer full garbage collections in a `digitflow` process.

Starting a command imports Prefect, DVC, pydantic models and the project: about a million
long-lived objects. Python runs a full collection, which scans every one of them, each time the
heap has grown by a quarter and ten younger collections have run: four of them while a no-op
`digitflow run` starts, and all collections together took 0.44-0.54 s of its 2.6-3.5 s on the
2-vCPU AMD machine. Imports make almost no garbage cycles, so waiting for a hundred younger
collections instead of ten loses nothing: the same runs spent 0.12-0.15 s collecting
(bench/noop.py measures the whole run). Young collections are left as they are.

Importing a flow file (Prefect and the project) leaves about 200,000 objects, of which a
collection could free some 6,000, yet it ran about half of a no-op run's young collections
(482 and 44 in the two younger generations before, 244 and 22 after; 0.11-0.13 s of collecting
before, 0.05 s after): the collector is off while a flow file is imported, and what it built
is frozen afterwards, out of every later collection's sight (the few cycles among them are
kept).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

FULL_COLLECTION_EVERY = 100
"""Younger (generation 1) collections between two full ones; Python's default is 10."""


def fewer_full_collections() -> None:
    """Keep Python's thresholds for generations 0 and 1; raise the one for full collections."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def freeze_long_lived() -> None:
    """Once a process has loaded what it keeps for its whole life (a server's model, its model
    process's, the log writer's database libraries): collect the garbage there is, then move
    every object alive out of the collector's sight (gc.freeze). Left in, each full collection
    walks them all (over 400 ms measured in the server), pausing whatever the process serves."""
    gc.collect()
    gc.freeze()


@contextmanager
def long_lived_imports() -> Iterator[None]:
    """No collection while the block runs (it imports); then every object alive is frozen
    (gc.freeze), out of later collections' sight. The collector's state before is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()
