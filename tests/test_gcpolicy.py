"""The garbage-collection policy of `digitflow` processes (gcpolicy.py)."""

from __future__ import annotations

import gc

from digitflow.gcpolicy import long_lived_imports


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
