"""The results table of docs/benchmarks.md and the README's timings, made from the newest JSON
file of each benchmark on each CPU model it ran on.

python bench/report.py            # print the tables and the README's timings
python bench/report.py --goals    # print only the goals table: each goal, met or missed, by machine
python bench/report.py --write    # put them into docs/benchmarks.md and README.md (between markers)
python bench/report.py --check    # exit 1 when either holds something else
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from common import REPO, RESULTS
from cores import ONE_CORE, ONE_CORE_TOLERANCE

DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin (bench/report.py --write) -->", "<!-- results:end -->"
GOALS_BEGIN, GOALS_END = "<!-- goals:begin (bench/report.py --write) -->", "<!-- goals:end -->"
README = REPO / "README.md"
README_BEGIN = "<!-- timings:begin (bench/report.py --write) -->"
README_END = "<!-- timings:end -->"


FLOOR_MARGIN = 1.01  # a cores-bench trial this close to the slowest counts as held at its rate


def newest_each_kind(prefix: str) -> list[dict]:
    """The newest result file of a benchmark for each machine kind it ran on, newest first:
    each kind keeps its own row."""
    by_kind: dict[str, dict] = {}
    for path in sorted(RESULTS.glob(f"{prefix}-2*.json"), reverse=True):
        result = json.loads(path.read_text()) | {"file": path.name}
        by_kind.setdefault(kind_of(result), result)
    return list(by_kind.values())


def kind_of(result: dict) -> str:
    """The machine kind a result file records: the CPU model, and the hardware bfloat16 it has
    where recorded. Virtual machines name both AMD EPYC generations "AMD EPYC"; their flags
    tell them apart (avx512_bf16 on the one with AVX-512, none on the one without)."""
    return described(result.get("machine", {}))


def described(machine: dict, cores: bool = False) -> str:
    """'CPU (bf16 flags)', with ', N cores' inside the brackets when `cores`."""
    flags = machine.get("bf16_flags")
    notes = [] if flags is None else [" ".join(flags) or "no bf16 flags"]
    if cores and machine.get("cpus"):
        notes.append(f"{machine['cpus']} cores")
    return machine.get("cpu", "CPU not recorded") + (f" ({', '.join(notes)})" if notes else "")


def machine_of(result: dict) -> str:
    """The machine kind and date a result file records."""
    return f"{kind_of(result)}, {result.get('machine', {}).get('date', '?')[:10]}"


SERVER_LABELS = {  # bench/serving.py's servers
    "1_worker": "1 worker",
    "1_worker_in_thread": "1 worker, model calls in a thread (`--no-model-process`)",
    "1_worker_tensorflow": "1 worker, model calls on TensorFlow (`--runtime tensorflow`)",
    "2_worker": "2 workers",
}


def _beyond_16_clients(ratios: dict, workers: str) -> str:
    """48 clients over 1, and the 16-client ratio scaled to every core busy, where measured."""
    most = ratios.get(f"{workers}_48_over_1_client_throughput")
    ceiling = ratios.get(f"{workers}_16_over_1_client_throughput_all_cores_busy")
    if most is None or ceiling is None:
        return ""
    return f"; 48 clients / 1 client {most:.2f}x; 16 clients with every core busy {ceiling:.2f}x"


def latency_ms(load: dict, percentile: str) -> str:
    """A load's latency percentile: unrounded where the file has it, else locust's whole ms."""
    exact = load.get(f"{percentile}_ms_exact")
    return f"{exact:.1f} ms" if exact is not None else f"{load[f'{percentile}_ms']:.0f} ms"


def equal_fit(overhead: dict, side: str) -> str:
    """'; at equal fit R (fixed cost F s against P s)' where the file times the fits."""
    if "ratio_at_equal_fit" not in overhead:
        return ""
    fixed = overhead["median_fixed_seconds"]
    return (
        f"; at equal fit {overhead['ratio_at_equal_fit'][side]:.2f} (fixed cost "
        f"{fixed[side]:.0f} s against the plain script's {fixed['plain']:.0f} s)"
    )


def cores_row(cores: dict) -> str:
    """The cores bench: how many trials with both cores ran no faster than one core (the
    `one_core` trials' rate; in older files, the run's slowest rate), and each setting's CPU
    utilisation in the trials that ran faster than that."""
    trials_of = cores["trials"]
    reference = cores["summary"].get("at_one_core_rate")
    if reference:
        rate = reference["one_core_images_per_s"]
        limit, label = rate * (1 + ONE_CORE_TOLERANCE), f"the one-core rate ({rate:.0f} images/s)"
        trials_of = {name: rows for name, rows in trials_of.items() if name != ONE_CORE}
    else:
        rate = min(t["images_per_s"] for rows in trials_of.values() for t in rows)
        limit, label = rate * FLOOR_MARGIN, "the run's slowest rate (within 1%)"
    trials = [trial for rows in trials_of.values() for trial in rows]
    slow = [t for t in trials if t["images_per_s"] <= limit]
    parts = []
    for setting, rows in trials_of.items():
        above = [t["cpu_utilisation"] for t in rows if t["images_per_s"] > limit]
        shares = ", ".join(f"{100 * share:.0f}%" for share in above) or "none"
        parts.append(f"{setting} {shares}")
    return (
        f"| training steps ({cores['settings']['steps']}, `digit_cnn` float32): trials at "
        f"{label}; CPU utilisation of the others by thread setting | "
        f"{len(slow)} of {len(trials)}; {'; '.join(parts)} | `python bench/cores.py` | "
        f"`{cores['file']}` ({machine_of(cores)}) |"
    )


@dataclass(frozen=True)
class Goal:
    """A speed or accuracy goal: what it asks, the benchmark that measures it, the figure read
    from that benchmark's file (None where an older file lacks it) and its bound."""

    asks: str
    prefix: str
    figure: Callable[[dict], float | None]
    bound: float
    at_least: bool
    shown: Callable[[float], str]

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound


def scheduling_row(trace: dict) -> str:
    """bench/scheduling.py's row: idle core time under concurrent clients, and how much of it
    a task woken or preempted onto the other, busy core waited beside."""
    medians, settings = trace["medians"], trace["settings"]
    served = " ".join(["digitflow serve", *settings.get("serve_options", [])])
    return (
        f"| {settings['clients']} single-image clients on `{served}`, scheduler "
        "trace: core time idle; idle while a task waited for the other core; wakeups queued on a "
        f"busy core while another was idle | {100 * medians['idle_share']:.1f}%; "
        f"{100 * medians['idle_beside_waiting_share']:.1f}%; "
        f"{100 * medians['wakeups_onto_busy_core_beside_idle_share']:.1f}% of wakeups, waiting "
        f"{medians['their_mean_wait_ms']:.2f} ms on average ({medians['requests_per_s']:.0f} "
        f"requests/s) | `python bench/scheduling.py` | `{trace['file']}` ({machine_of(trace)}) |"
    )


def _nested(*keys: str) -> Callable[[dict], float | None]:
    """Reads result[keys[0]][keys[1]]...; None where a level is missing."""

    def read(result: dict) -> float | None:
        value: object = result
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return read


def _minutes(result: dict) -> float | None:
    seconds = _nested("wall_seconds")(result)
    return None if seconds is None else seconds / 60


def _three_seed_accuracy(result: dict) -> float | None:
    return result["test_accuracy_mean"] if len(result.get("runs", [])) >= 3 else None


GOALS = (
    Goal(
        "`digit_cnn` test accuracy, mean of 3 seeds, at least 0.996",
        "accuracy-digit_cnn",
        _three_seed_accuracy,
        0.996,
        True,
        lambda value: f"{value:.4f}",
    ),
    Goal(
        "`digit_cnn` training time (mean of the seeds) at most 4x the plain tutorial's 10-epoch "
        "fit, same run",
        "accuracy-digit_cnn",
        _nested("ratio_train_seconds_mean_over_tutorial_fit"),
        4.0,
        False,
        lambda value: f"{value:.2f}x",
    ),
    Goal(
        "training uses at least 90% of the cores, sampled over the fit",
        "accuracy-digit_cnn",
        _nested("cpu_utilisation_mean"),
        0.90,
        True,
        lambda value: f"{100 * value:.1f}%",
    ),
    Goal(
        "tutorial configuration through the flow on a running Prefect server, at most 1.10x "
        "the plain script (at equal fit)",
        "overhead",
        _nested("ratio_at_equal_fit", "flow_server"),
        1.10,
        False,
        lambda value: f"{value:.2f}x",
    ),
    Goal(
        "tutorial configuration through `dvc repro`, at most 1.20x the plain script (at equal fit)",
        "overhead",
        _nested("ratio_at_equal_fit", "dvc"),
        1.20,
        False,
        lambda value: f"{value:.2f}x",
    ),
    Goal(
        "`make run` from a fresh clone, install included, in about 10 minutes (counted as at "
        "most 12)",
        "make-run",
        _minutes,
        12.0,
        False,
        lambda value: f"{value:.2f} min",
    ),
    Goal(
        "no-op flow run on a running Prefect server in at most 3 s",
        "noop",
        _nested("median_seconds", "flow_run_server"),
        3.0,
        False,
        lambda value: f"{value:.2f} s",
    ),
    Goal(
        "`digitflow serve`, 1 worker: 16 single-image clients get at least 4x one client's "
        "requests/s",
        "serving",
        _nested("ratios", "1_worker_16_over_1_client_throughput"),
        4.0,
        True,
        lambda value: f"{value:.2f}x",
    ),
    Goal(
        "`digitflow serve`, 1 worker: p99 at 16 clients at most 10x one client's p50",
        "serving",
        _nested("ratios", "1_worker_16_client_p99_over_1_client_p50"),
        10.0,
        False,
        lambda value: f"{value:.1f}x",
    ),
    Goal(
        "64-image batches at least 1.25x `mlflow models serve` of the same model",
        "serving",
        _nested("ratios", "batch64_digitflow_over_mlflow"),
        1.25,
        True,
        lambda value: f"{value:.2f}x",
    ),
    Goal(
        "no failed request under load",
        "serving",
        _nested("failed_requests"),
        0,
        False,
        lambda value: f"{value:.0f} failed",
    ),
)


def goals_table() -> str:
    """Each goal on each machine kind with a result file for it: the figure, met or missed."""
    rows = [
        "| goal | machine (date) | measured | verdict | result file |",
        "| --- | --- | --- | --- | --- |",
    ]
    for goal in GOALS:
        for result in newest_each_kind(goal.prefix):
            value = goal.figure(result)
            if value is None:
                continue
            verdict = "met" if goal.met(value) else "**missed**"
            rows.append(
                f"| {goal.asks} | {machine_of(result)} | {goal.shown(value)} | {verdict} "
                f"| `{result['file']}` |"
            )
    return "\n".join(rows) + "\n"


def table() -> str:
    """One row per figure: value, the command that measures it, its result file and machine."""
    rows = [
        "| figure | value | command | result file (machine, date) |",
        "| --- | --- | --- | --- |",
    ]
    for preset in ("seed_cnn", "digit_cnn"):
        for result in newest_each_kind(f"accuracy-{preset}"):
            runs = len(result["runs"])
            against = ""
            if "tutorial_reference" in result:
                against = (
                    f" = {result['ratio_train_seconds_mean_over_tutorial_fit']:.2f}x the plain "
                    f"tutorial's 10-epoch fit ({result['tutorial_reference']['fit_seconds']:.0f} s, "
                    f"same run); CPU utilisation over the fit "
                    f"{100 * result['cpu_utilisation_mean']:.1f}%"
                )
            rows.append(
                f"| `{preset}` test accuracy ({runs} seeds) | {result['test_accuracy_mean']:.4f} ± "
                f"{result['test_accuracy_std']:.4f}; training {result['train_seconds_mean']:.0f} s mean, "
                f"{result['train_seconds_max']:.0f} s max{against} "
                f"| `python bench/accuracy.py --preset {preset} --seeds 1 2 3` | `{result['file']}` ({machine_of(result)}) |"
            )
    for make_run in newest_each_kind("make-run"):
        rows.append(
            f"| `make run` from a fresh clone, install included | {make_run['wall_minutes']:.1f} "
            f"minutes ({make_run['wall_seconds']:.0f} s; the pipeline {make_run['pipeline_seconds']:.0f} s, "
            f"training {make_run['train_seconds']:.0f} s for {make_run['epochs_run']} epochs at "
            f"{100 * make_run['train_cpu_utilisation']:.1f}% CPU); test accuracy "
            f"{make_run['test_accuracy']:.4f}, {make_run['decision']}; after the first epoch: "
            f'"{make_run["forecast"]}" | `python bench/make_run.py` | `{make_run["file"]}` '
            f"({machine_of(make_run)}) |"
        )
    for overhead in newest_each_kind("overhead"):
        medians = overhead["median_seconds"]
        rows.append(
            f"| pipeline overhead, Prefect flow / plain script | {overhead['ratio_flow_over_plain']:.2f} "
            f"({medians['flow']:.0f} s / {medians['plain']:.0f} s){equal_fit(overhead, 'flow')} "
            f"| `python bench/overhead.py` | `{overhead['file']}` ({machine_of(overhead)}) |"
        )
        if "flow_server" in medians:
            rows.append(
                f"| pipeline overhead, Prefect flow on a running server / plain script | "
                f"{overhead['ratio_flow_server_over_plain']:.2f} ({medians['flow_server']:.0f} s / "
                f"{medians['plain']:.0f} s){equal_fit(overhead, 'flow_server')} | same | same |"
            )
        rows.append(
            f"| pipeline overhead, `dvc repro -f` / plain script | {overhead['ratio_dvc_over_plain']:.2f} "
            f"({medians['dvc']:.0f} s / {medians['plain']:.0f} s){equal_fit(overhead, 'dvc')} "
            "| same | same |"
        )
    for throughput in newest_each_kind("throughput"):
        rates = throughput["median_samples_per_second"]
        rows.append(
            f"| training throughput, pipeline input path / numpy arrays | {throughput['ratio_pipeline_over_numpy']:.2f} "
            f"({rates['pipeline']:.0f} / {rates['numpy']:.0f} samples/s); with augmentation on: "
            f"{throughput['ratio_augmented_over_numpy']:.2f} | `python bench/throughput.py` | `{throughput['file']}` ({machine_of(throughput)}) |"
        )
    for cores in newest_each_kind("cores"):
        rows.append(cores_row(cores))
    for noop in newest_each_kind("noop"):
        medians = noop["median_seconds"]
        server = f" / {medians['flow_run_server']:.1f} s" if "flow_run_server" in medians else ""
        rows.append(
            f"| no-op `dvc repro` / flow run / flow run on a running server | {medians['dvc_repro']:.1f} s / "
            f"{medians['flow_run']:.1f} s{server} | `python bench/noop.py` | `{noop['file']}` ({machine_of(noop)}) |"
        )
    for validation in newest_each_kind("validation"):
        rows.append(
            f"| `digitflow validate`, 70,000 images | {validation['median_command_wall_seconds']:.1f} s "
            f"({validation['median_validation_seconds']:.1f} s after imports) | `python bench/validation_cost.py` "
            f"| `{validation['file']}` ({machine_of(validation)}) |"
        )
    for serving in newest_each_kind("serving"):
        if "load" not in serving:
            continue
        where = f"| `python bench/serving.py` | `{serving['file']}` ({machine_of(serving)}) |"
        servers = [key for key in SERVER_LABELS if key in serving["load"]]
        for workers in servers:
            load, ratios = serving["load"][workers], serving["ratios"]
            one, many = load["1 client x1"], load["16 clients x1"]
            rows.append(
                f"| `digitflow serve`, {SERVER_LABELS[workers]}: 16 clients / 1 client, one "
                f"image per request | {ratios[f'{workers}_16_over_1_client_throughput']:.2f}x "
                f"({many['requests_per_s']:.0f} / {one['requests_per_s']:.0f} requests/s); p99 at 16 "
                f"clients {latency_ms(many, 'p99')} = "
                f"{ratios[f'{workers}_16_client_p99_over_1_client_p50']:.1f}x the 1-client p50 "
                f"({latency_ms(one, 'p50')}){_beyond_16_clients(ratios, workers)}; "
                f"{serving['failed_requests']} failed requests "
                + (where if workers == servers[0] else "| same | same |")
            )
        rates = serving["batch64_median_images_per_second"]
        rows.append(
            f"| 64-image batches: `digitflow serve` / `mlflow models serve`, same model "
            f"| {serving['ratios']['batch64_digitflow_over_mlflow']:.2f}x "
            f"({rates['digitflow_serve']:.0f} / {rates['mlflow_models_serve']:.0f} images/s) "
            "| same | same |"
        )
    for logging in newest_each_kind("prediction-log"):
        on, off = (
            logging["single_image_latency_ms"]["log_on"],
            logging["single_image_latency_ms"]["log_off"],
        )
        ratios = logging["ratios_log_on_over_off"]
        if "sixteen_clients_throughput" in ratios:
            loads = logging["sixteen_clients"]
            rows.append(
                "| 16 single-image clients, prediction log on / off | "
                f"{ratios['sixteen_clients_throughput']:.2f} "
                f"({loads['log_on']['requests_per_s']:.0f} / "
                f"{loads['log_off']['requests_per_s']:.0f} requests/s) "
                f"| `python bench/prediction_log.py` | `{logging['file']}` ({machine_of(logging)}) |"
            )
        rows.append(
            f"| one image over HTTP, prediction log on / off | p50 {ratios['p50']:.2f} ({on['p50']:.1f} / "
            f"{off['p50']:.1f} ms), p99 {ratios['p99']:.2f} ({on['p99']:.1f} / {off['p99']:.1f} ms); "
            f"{logging['prediction_log']['written']} rows written, {logging['prediction_log']['failed']} failed "
            f"| `python bench/prediction_log.py` | `{logging['file']}` ({machine_of(logging)}) |"
        )
    for trace in newest_each_kind("scheduling"):
        rows.append(scheduling_row(trace))
    for monitor in newest_each_kind("monitor"):
        scans, canvas = monitor["false_alarms"]["scan"], monitor["false_alarms"]["canvas"]
        turned = monitor["detection_rotated_90"]
        rows.append(
            f"| `digitflow monitor` on {monitor['logged_predictions']:,} logged predictions "
            f"({monitor['compared_rows']:,} compared) / plain `predict` of them | "
            f"{monitor['monitor_median_s']:.1f} s / {monitor['plain_predict_median_s']:.1f} s | "
            f"`python bench/monitor.py` | `{monitor['file']}` ({machine_of(monitor)}) |"
        )
        rows.append(
            f"| drift false alarms, windows of {monitor['window']} MNIST test digits (scans / "
            f"page canvas); alarms on the same windows turned 90 degrees | "
            f"{scans['alarms']} of {scans['windows']} / {canvas['alarms']} of {canvas['windows']}; "
            f"{turned['alarms']} of {turned['windows']} | same | same |"
        )
    for sweep in newest_each_kind("sweep"):
        medians = sweep["median_seconds"]
        rows.append(
            f"| 4-trial sweep, 1 Dask worker / 2 workers | {medians['workers_1']:.0f} s / {medians['workers_2']:.0f} s "
            f"(speed-up {sweep['speed_up_2_over_1']:.2f}) | `python bench/sweep.py` | `{sweep['file']}` ({machine_of(sweep)}) |"
        )
    return "\n".join(rows) + "\n"


def readme_timings() -> str:
    """The README's timings: a row per machine kind, training from its newest `digit_cnn`
    accuracy file and serving from its newest serving file, each figure linked to its file."""
    trained = {
        kind_of(result): result
        for result in newest_each_kind("accuracy-digit_cnn")
        if "tutorial_reference" in result
    }
    served = {kind_of(result): result for result in newest_each_kind("serving") if "load" in result}
    rows = [
        "| Machine | `digit_cnn` training, mean of the seeds | x the tutorial's fit "
        "| test accuracy | `serve`: one image, p50 | 16 clients |",
        "|---|---|---|---|---|---|",
    ]
    for kind in sorted(trained.keys() | served.keys()):
        machine = (trained.get(kind) or served[kind])["machine"]
        training = ["not measured"] * 3
        if kind in trained:
            result = trained[kind]
            training = [
                f"[{result['train_seconds_mean'] / 60:.1f} min](bench/results/{result['file']})",
                f"{result['ratio_train_seconds_mean_over_tutorial_fit']:.1f}x",
                f"{result['test_accuracy_mean']:.4f}",
            ]
        serving = ["not measured"] * 2
        if kind in served:
            load = served[kind]["load"]["1_worker"]
            serving = [
                f"[{latency_ms(load['1 client x1'], 'p50')}](bench/results/{served[kind]['file']})",
                f"{load['16 clients x1']['requests_per_s']:.0f} requests/s",
            ]
        rows.append("| " + " | ".join([described(machine, cores=True), *training, *serving]) + " |")
    return "\n".join(rows) + "\n"


def with_table(document: str, rows: str, begin: str = BEGIN, end: str = END) -> str:
    """document with the text between the markers replaced by rows."""
    head, rest = document.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{rows}{end}{tail}"


def main(argv: list[str]) -> int:
    if "--goals" in argv:
        print(goals_table())
        return 0
    targets = [
        (DOC, goals_table(), GOALS_BEGIN, GOALS_END),
        (DOC, table(), BEGIN, END),
        (README, readme_timings(), README_BEGIN, README_END),
    ]
    stale = 0
    for document, text, begin, end in targets:
        current = document.read_text()
        wanted = with_table(current, text, begin, end)
        if "--write" in argv:
            document.write_text(wanted)
        elif "--check" in argv:
            if wanted != current:
                print(f"{document} is stale: run `python bench/report.py --write`")
                stale = 1
        else:
            print(text)
    return stale


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
