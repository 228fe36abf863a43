"""The garbage-collection policy of `digitflow` processes (gcpolicy.py)."""

from __future__ import annotations

import gc
import weakref

from digitflow.gcpolicy import freeze_long_lived, long_lived_imports


def test_no_collection_inside_and_the_heap_is_frozen_after() -> None:
    gc.unfreeze()
    try:
        with long_lived_imports():
            assert not gc.isenabled()
            made = [[] for _ in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(made)
    finally:
        gc.unfreeze()


def test_the_collector_stays_off_when_it_was_off() -> None:
    gc.disable()
    try:
        with long_lived_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_what_a_process_keeps_is_frozen_and_its_garbage_collected_first() -> None:
    class Node:
        me: object

    gc.unfreeze()
    try:
        kept = [[] for _ in range(1000)]
        cycle = Node()
        cycle.me = cycle  # garbage only a collection frees
        garbage = weakref.ref(cycle)
        del cycle
        freeze_long_lived()
        assert gc.get_freeze_count() >= len(kept)
        assert garbage() is None  # collected first, not frozen with the rest
    finally:
        gc.unfreeze()
