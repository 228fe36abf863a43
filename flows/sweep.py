"""The sweep flow: trials fanned out through Prefect's Dask task runner, then the best one
registered through the normal promotion path.

    digitflow sweep [--workers 2] [--dask-address tcp://HOST:PORT]
"""

from __future__ import annotations

from pathlib import Path

from digitflow.config import load_params, paths, set_environment_defaults

set_environment_defaults()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402

from digitflow import locking, pipeline, sweep  # noqa: E402


@task(name="trial", cache_policy=NO_CACHE)
def trial(root: str, parent_run_id: str, index: int, overrides: dict, threads: int) -> dict:
    """Train and log one trial (in a Dask worker)."""
    return sweep.run_trial(root, parent_run_id, index, overrides, threads).to_dict()


def sweep_flow(workers: int, dask_address: str | None):
    """The sweep flow bound to a Dask cluster: a local one with `workers` processes, or one at
    dask_address."""
    if dask_address:
        runner = DaskTaskRunner(address=dask_address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
        )

    @flow(name="digitflow-sweep", task_runner=runner, log_prints=True)
    def digitflow_sweep(root: str = ".", trials: int | None = None) -> dict:
        """Prepare the data (DVC stages validate, preprocess), fan out the trials, pick the best."""
        root = str(Path(root).resolve())
        logger = get_run_logger()
        project = paths(Path(root))
        params = load_params(project.params)
        with locking.pipeline_lock(Path(root), wait_s=None):
            for stage in ("validate", "preprocess"):
                pipeline.run_stage_here(project, stage)
            settings = params.sweep.model_copy(update={"trials": trials or params.sweep.trials})
            overrides = sweep.trials(settings)
            parent = sweep.start_parent(project, params, overrides)
            logger.info(
                "sweep %s: %d trials on %s",
                parent,
                len(overrides),
                dask_address or f"{workers} local workers",
            )
            threads = 1 if dask_address else sweep.threads_per_trial(workers)
            futures = [
                trial.submit(root, parent, index, choice, threads)
                for index, choice in enumerate(overrides)
            ]
            try:
                results = [sweep.TrialResult(**future.result()) for future in futures]
            except Exception:
                sweep.abandon(project, params, parent)
                raise
            outcome = sweep.finish(project, params, parent, results)
        logger.info(
            "best trial %s: val accuracy %.4f, test %.4f, %s",
            outcome["best"]["run_id"],
            outcome["best"]["val_accuracy"],
            outcome["test_accuracy"],
            outcome["decision"],
        )
        return outcome

    return digitflow_sweep
