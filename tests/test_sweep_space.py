"""The sweep's search space: grid and seeded random trials, and overrides re-validated."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from digitflow.config import ConfigError, load_params
from digitflow.sweep import apply, trials


def _space(params, method: str, count: int, space: dict | None = None):
    update = {"method": method, "trials": count}
    if space is not None:
        update["space"] = space
    return params.sweep.model_copy(update=update)


def test_grid_is_every_combination_once(params) -> None:
    space = {"train.batch_size": [64, 128], "model.dropout": [0.1, 0.2, 0.3]}
    grid = trials(_space(params, "grid", 1, space))
    assert len(grid) == 6
    assert {(t["train.batch_size"], t["model.dropout"]) for t in grid} == {
        (b, d) for b in (64, 128) for d in (0.1, 0.2, 0.3)
    }


def test_random_draws_are_seeded_and_distinct_when_possible(params) -> None:
    first = trials(_space(params, "random", 4))
    assert first == trials(_space(params, "random", 4))
    assert len({tuple(sorted(t.items())) for t in first}) == 4
    other_seed = params.sweep.model_copy(update={"method": "random", "trials": 4, "seed": 9})
    assert trials(other_seed) != first
    many = trials(_space(params, "random", 100, {"train.batch_size": [64, 128]}))
    assert len(many) == 100 and {t["train.batch_size"] for t in many} == {64, 128}


def test_overrides_apply_with_the_sweep_epochs(params) -> None:
    applied = apply(params, {"train.learning_rate": 0.002, "model.filters": 16})
    assert applied.train.learning_rate == 0.002 and applied.model.filters == 16
    assert applied.train.epochs == params.sweep.epochs
    assert apply(params, {"train.epochs": 7}).train.epochs == 7


def test_an_override_out_of_range_is_refused(params) -> None:
    with pytest.raises(ValidationError, match="dropout"):
        apply(params, {"model.dropout": 1.5})


def test_space_keys_must_name_model_or_train(tmp_path, params) -> None:
    import yaml

    params_file = tmp_path / "params.yaml"
    raw = params.model_dump(by_alias=True)
    raw["sweep"]["space"] = {"serve.port": [1, 2]}
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="sweep.space key 'serve.port' must be"):
        load_params(params_file)
