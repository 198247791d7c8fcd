"""Slowdown of each pipeline stage beside a competing CPU-bound process, with and without the thread policy (issue 11).

Measured per model (ResNet-20/56 from ``../shared``) and task:

- ``cmi``, ``mipp``: method scoring through the public API, ``compress(path, arch=..., data=train.npz,
  eval_data=None, normalize="cifar", method=..., target=0.33, epochs=0, bench_batches=(), bn_recalib=0)``; the time
  is the report's ``timings["compress"]`` (the scoring and channel removal; the data is loaded beforehand);
- ``train``: SGD steps (momentum 0.9) on a random batch of 128 (the default ``--batch-size``);
- ``evaluate``: forward passes without gradients on a random batch of 250;

each at fixed thread counts (1, and torch's default: the old behaviour, one thread per physical core) and, for the
stages whose count :class:`compressor.threads.ThreadPolicy` decides at run time (``train``, ``evaluate``), under the
policy itself (``threads=None``: it probes the machine in the measuring process just before the stage; the count it
chose is recorded). Each row's ``roles`` say which setting is the ``policy`` and which the old ``torch_default``.
Conditions: ``quiet``, and ``contended``: beside a competitor, a separate process running a loop of 512x512 float32
matmuls on ``--competitor-threads`` torch threads (default: one per CPU), started before and stopped after each
contended measurement (it also stops itself after ``--cap`` + 10 minutes).

Reported per (model, task, setting): seconds quiet and contended, the process CPU seconds (CPU above wall x threads
means threads spinning while they wait), ``slowdown = contended / quiet`` against the goal of under 2x. A measurement
still running at its cap (``cap_s``: ``--cap`` seconds, 180, for a quiet one; for a contended one 3x its quiet
seconds, at least 30 and at most ``--cap``: a 3x slowdown already misses the goal) is stopped: its seconds are
``null``, ``seconds_at_least`` gives the time it had run (for scoring: the whole ``compress()`` call, export
included, as the cap covers the call) and the slowdown is a lower bound (``"bound": "at_least"``) against the quiet
run's time for the same span.
Each measurement runs in a fresh process (imports and data loading untimed) and records the machine's 1-minute load
average and the CPUs busy over the second before it starts (the load average lags: after a contended measurement it
stays high for a minute), and ``others_during``: the CPUs used by processes other than the measuring one and the
competitor over its lifetime (the machine is shared: a quiet row with ``others_during`` well above 0 was not quiet).
Before each quiet measurement the script waits up to ``--wait-quiet`` seconds (10) for fewer than 0.3 CPUs to be busy
(``waited_s``).

Usage::

    python -m benchmarks.contention                             # cmi and mipp on ResNet-20 and ResNet-56
    python -m benchmarks.contention --quick                     # ResNet-20 only
    python -m benchmarks.contention --tasks train,evaluate      # the probed stages (SGD steps, forward passes)
    python -m benchmarks.contention --model resnet56 --tasks mipp --cap 400

Writes ``benchmarks/results/contention.json`` for the default run; other runs add the model and tasks to the name
(``contention-resnet20.json``, ``contention-train-evaluate.json``), or ``--out``. Durations on 2 CPUs: the
default run 18.6 min, ``--tasks train,evaluate`` 5.4 min.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._child import write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = {"resnet20": "models/cifar10-resnet/resnet20-12fca82f.th",
          "resnet56": "models/cifar10-resnet/resnet56-4bfd9763.th"}
TRAIN = "data/cifar10/train.npz"
TASKS = ("cmi", "mipp", "train", "evaluate")
DEFAULT_TASKS = ("cmi", "mipp")
STAGE_OF = {"cmi": "score", "mipp": "score", "train": "train", "evaluate": "evaluate"}
STEPS = {"train": {"resnet20": 8, "resnet56": 3}, "evaluate": {"resnet20": 8, "resnet56": 3}}
BATCH = {"train": 128, "evaluate": 250}
GOAL = 2.0
CAP_FACTOR = 3.0
ROW_KEYS = ("model", "task", "stage", "setting", "roles", "condition", "threads", "seconds", "seconds_at_least",
            "cpu_seconds", "load_1min", "others_busy_cores", "others_during", "timed_out")
COMPETITOR = """
import sys, time, torch
threads, seconds = int(sys.argv[1]), float(sys.argv[2])
torch.set_num_threads(threads)
a, b = torch.randn(512, 512), torch.randn(512, 512)
a @ b
print("ready", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    a @ b
"""


# ----------------------------------------------------------------------------------------------- pure helpers


def slowdown(quiet: dict[str, Any], contended: dict[str, Any]) -> dict[str, Any]:
    """``contended / quiet`` seconds of one (model, task, setting), rounded to 2 decimals.

    A contended run stopped at its cap gives a lower bound (``bound="at_least"``): the time it had run over the quiet
    run's time for the same span (for scoring the whole ``compress()`` call, ``wall_seconds_call``, since the cap
    covers the call). A run that did not finish quiet, or failed, gives no ratio.

    >>> slowdown({"seconds": 10.0}, {"seconds": 15.0})
    {'slowdown': 1.5, 'bound': 'exact', 'meets_goal': True}
    >>> slowdown({"seconds": 10.0, "wall_seconds_call": 12.0}, {"seconds": None, "seconds_at_least": 120.0})
    {'slowdown': 10.0, 'bound': 'at_least', 'meets_goal': False}
    """
    q = quiet.get("seconds")
    if not q:
        return {"slowdown": None, "bound": None, "meets_goal": None}
    if contended.get("seconds") is not None:
        ratio, bound = contended["seconds"] / q, "exact"
    elif contended.get("seconds_at_least") is not None:
        ratio, bound = contended["seconds_at_least"] / (quiet.get("wall_seconds_call") or q), "at_least"
    else:
        return {"slowdown": None, "bound": None, "meets_goal": None}
    ratio = round(ratio, 2)
    known = bound == "exact" or ratio >= GOAL  # a lower bound under the goal says nothing
    return {"slowdown": ratio, "bound": bound, "meets_goal": ratio < GOAL if known else None}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and task: each setting's threads, quiet and contended seconds and slowdown, and which is which.

    ``{model: {task: {"settings": {setting: {threads, quiet_s, contended_s, slowdown, bound, meets_goal, roles}},
    "before": <torch_default's setting>, "after": <the policy's setting>}}}``.
    """
    cells: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["task"], row["setting"]), {})[row["condition"]] = row
    summary: dict[str, Any] = {}
    for (model, task, setting), pair in cells.items():
        quiet, contended = pair.get("quiet"), pair.get("contended")
        some = quiet or contended or {}
        entry: dict[str, Any] = {
            "threads": {c: r.get("threads") for c, r in pair.items()}, "roles": some.get("roles", []),
            "quiet_s": quiet and quiet["seconds"],
            "contended_s": contended and (contended["seconds"] or contended["seconds_at_least"])}
        if quiet and contended:
            entry.update(slowdown(quiet, contended))
        cell = summary.setdefault(model, {}).setdefault(task, {"settings": {}})
        cell["settings"][setting] = entry
        for role, name in (("torch_default", "before"), ("policy", "after")):
            if role in entry["roles"]:
                cell[name] = setting
    return summary


def settings_for(policy: int | None, torch_default: int) -> dict[str, dict[str, Any]]:
    """The settings to measure: 1 thread, torch's default, and the policy (``policy=None``: decided at run time).

    >>> settings_for(1, 2)
    {'threads_1': {'threads': 1, 'roles': ['policy']}, 'threads_2': {'threads': 2, 'roles': ['torch_default']}}
    >>> list(settings_for(None, 2))
    ['threads_1', 'threads_2', 'policy']
    """
    counts = {1, torch_default} if policy is None else {1, torch_default, policy}
    settings: dict[str, dict[str, Any]] = {f"threads_{n}": {"threads": n, "roles": []} for n in sorted(counts)}
    settings[f"threads_{torch_default}"]["roles"].append("torch_default")
    if policy is None:
        settings["policy"] = {"threads": None, "roles": ["policy"]}
    else:
        settings[f"threads_{policy}"]["roles"].insert(0, "policy")
    return settings


def check_payload(payload: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``payload`` has the results file's shape (top-level keys, row keys)."""
    missing = {"benchmark", "goal", "command", "settings", "machine", "rows", "summary"} - set(payload)
    if missing:
        raise ValueError(f"results lack {sorted(missing)}")
    for row in payload["rows"]:
        lacking = set(ROW_KEYS) - set(row)
        if lacking:
            raise ValueError(f"row {row.get('model')}/{row.get('task')} lacks {sorted(lacking)}")


# ----------------------------------------------------------------------------------------------- measurement (child)


def _arm_cap(task: dict[str, Any], threads: int | None) -> threading.Timer:
    """Start the cap: after ``task["cap"]`` seconds print a timed-out result and end the process at once."""
    started = time.perf_counter()

    def give_up() -> None:  # os.write: the ONNX export redirects sys.stdout while it runs
        line = json.dumps({"timed_out": True, "threads": threads,
                           "seconds_at_least": round(time.perf_counter() - started, 1)})
        os.write(1, f"result {line}\n".encode())
        os._exit(0)

    timer = threading.Timer(task["cap"], give_up)
    timer.daemon = True
    timer.start()
    return timer


def _score(task: dict[str, Any], policy: Any) -> dict[str, Any]:
    """Scoring through the public API; the data is loaded before the clock and the cap start."""
    from compressor import compress
    from compressor.data import load_dataset

    data = load_dataset(task["train"])
    with policy.apply("score") as threads:
        timer = _arm_cap(task, threads)
        wall, cpu = time.perf_counter(), time.process_time()
        report = compress(task["checkpoint"], arch=task["model"], data=data, eval_data=None, normalize="cifar",
                          method=task["task"], target=0.33, epochs=0, bench_batches=(), bn_recalib=0,
                          threads=task["threads"]).report
        cpu = time.process_time() - cpu
        timer.cancel()
    timings = report["timings"]
    return {"threads": threads, "seconds": round(timings["compress"], 2), "cpu_seconds_call": round(cpu, 2),
            "wall_seconds_call": round(time.perf_counter() - wall, 2), "timings": timings,
            "achieved": round(report["method"]["achieved"], 4)}


def _steps(task: dict[str, Any], policy: Any) -> dict[str, Any]:
    """``train``: SGD steps; ``evaluate``: forward passes under ``no_grad`` (one untimed warm-up step first)."""
    import torch

    from compressor import create_model

    kind, model = task["task"], create_model(task["model"])
    x, y = torch.randn(BATCH[kind], 3, 32, 32), torch.randint(0, 10, (BATCH[kind],))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        if kind == "train":
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)

    model.train(kind == "train")
    with policy.apply(kind) as threads:
        step()
        timer = _arm_cap(task, threads)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(STEPS[kind][task["model"]]):
            step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        timer.cancel()
    return {"threads": threads, "seconds": round(wall, 2), "cpu_seconds_call": round(cpu, 2),
            "steps": STEPS[kind][task["model"]], "batch": BATCH[kind]}


def child(task: dict[str, Any]) -> None:
    """Run one measurement under ``ThreadPolicy(task["threads"])``; print ``result <json>``."""
    from compressor.threads import ThreadPolicy

    policy = ThreadPolicy(task["threads"])
    result = _score(task, policy) if task["task"] in ("cmi", "mipp") else _steps(task, policy)
    print("result " + json.dumps({"timed_out": False, **result}), flush=True)


# ----------------------------------------------------------------------------------------------- orchestration


def machine_state(sample_s: float = 1.0) -> dict[str, Any]:
    """1-minute load average now, and CPUs busy (with anything: this process is idle) over the next ``sample_s``."""
    from compressor.threads import busy_cores, read_cpu_times

    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    before = read_cpu_times()
    time.sleep(sample_s)
    after = read_cpu_times()
    busy = busy_cores(before, after, os.cpu_count() or 1) if before and after else None
    return {"load_1min": load, "others_busy_cores": busy}


def wait_quiet(limit_s: float, *, threshold: float = 0.3) -> dict[str, Any]:
    """Sample :func:`machine_state` until fewer than ``threshold`` CPUs are busy, for at most ``limit_s`` seconds;
    return the last sample with ``waited_s``."""
    start = time.perf_counter()
    state = machine_state()
    while (state["others_busy_cores"] or 0.0) >= threshold and time.perf_counter() - start < limit_s:
        state = machine_state()
    return {**state, "waited_s": round(time.perf_counter() - start, 1)}


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (``/proc/<pid>/stat`` fields 14 and 15); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def competitor(threads: int, seconds: float) -> Iterator[subprocess.Popen]:
    """A CPU-bound neighbour: ``threads`` torch threads multiplying 512x512 matrices until stopped (or ``seconds``)."""
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(threads), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the competing process did not start")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _measure(task: dict[str, Any], neighbour: subprocess.Popen | None) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; return its result (a crash becomes ``error``) and ``others_during``:
    machine-wide busy CPUs over its lifetime less its own CPU time and the neighbour's, per second."""
    from compressor.threads import busy_cores, read_cpu_times

    cmd = [sys.executable, "-m", "benchmarks.contention", "--child", json.dumps(task)]
    stat0, wall0, ru0 = read_cpu_times(), time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    nb0 = process_cpu_seconds(neighbour.pid) if neighbour else 0.0
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=task["cap"] + 300)
    stat1, wall, ru1 = read_cpu_times(), time.perf_counter() - wall0, resource.getrusage(resource.RUSAGE_CHILDREN)
    nb1 = process_cpu_seconds(neighbour.pid) if neighbour else 0.0
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) + ((nb1 or 0.0) - (nb0 or 0.0))
    during = (round(max(0.0, busy_cores(stat0, stat1, os.cpu_count() or 1) - own / wall), 2)
              if stat0 and stat1 else None)
    for line in done.stdout.splitlines():
        if line.startswith("result "):
            return {**json.loads(line[len("result "):]), "others_during": during}
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}, no output"])[-1]
    return {"timed_out": False, "seconds": None, "threads": task["threads"], "error": tail, "others_during": during}


def default_name(models: list[str], tasks: list[str]) -> str:
    """The results file's name: ``contention.json`` for the default run, else suffixed with the model and tasks.

    >>> default_name(["resnet20", "resnet56"], ["cmi", "mipp"]), default_name(["resnet20"], ["train", "evaluate"])
    ('contention.json', 'contention-resnet20-train-evaluate.json')
    """
    parts = ([] if len(models) == len(MODELS) else models) + ([] if tuple(tasks) == DEFAULT_TASKS else tasks)
    return "-".join(["contention", *parts]) + ".json"


def contended_cap(quiet: dict[str, Any], cap: float) -> float:
    """The contended run's cap: ``CAP_FACTOR`` x the quiet run's capped span (30 s at least), never above ``cap``.

    A slowdown of ``CAP_FACTOR`` already misses the 2x goal by far; the rest would be waiting.

    >>> contended_cap({"seconds": 4.0}, 120.0), contended_cap({"seconds": 15.0, "wall_seconds_call": 18.0}, 120.0)
    (30.0, 54.0)
    >>> contended_cap({"seconds": None, "seconds_at_least": 120.0}, 120.0)
    120.0
    """
    seconds = quiet.get("wall_seconds_call") or quiet.get("seconds") or quiet.get("seconds_at_least") or cap
    return float(min(cap, max(30.0, CAP_FACTOR * seconds)))


def measure(task: dict[str, Any], condition: str, competitor_threads: int) -> dict[str, Any]:
    """One row: the machine's state just before, then the measurement, quiet or beside the competitor."""
    row: dict[str, Any] = {k: task[k] for k in ("model", "task", "setting", "roles")}
    row.update(stage=STAGE_OF[task["task"]], condition=condition, cap_s=task["cap"], seconds=None,
               seconds_at_least=None, cpu_seconds=None)
    if condition == "contended":
        with competitor(competitor_threads, task["cap"] + 600) as neighbour:
            row.update(machine_state())
            result = _measure(task, neighbour)
    else:
        row.update(wait_quiet(task["wait_quiet"]))
        result = _measure(task, None)
    row.update({k: v for k, v in result.items() if k != "cpu_seconds_call"}, cpu_seconds=result.get("cpu_seconds_call"))
    shown = row["seconds"] if row["seconds"] is not None else f">={row['seconds_at_least']}"
    shown = f"failed: {row['error']}" if row.get("error") else shown
    print(f"{row['model']:9s} {row['task']:9s} {row['setting']:10s} threads={row['threads']} {condition:9s} "
          f"load={row['load_1min']} busy={row['others_busy_cores']} others_during={row['others_during']} -> "
          f"{shown} s (cpu {row['cpu_seconds']})", file=sys.stderr, flush=True)
    return row


def payload_of(args: argparse.Namespace, rows: list[dict[str, Any]], default: int) -> dict[str, Any]:
    """The results file: settings, machine, rows and their summary."""
    import torch

    return {
        "benchmark": "contention", "goal": f"slowdown = contended / quiet < {GOAL}",
        "command": "python -m benchmarks.contention " + " ".join(args.argv),
        "settings": {"models": args.models, "tasks": args.tasks, "cap_seconds": args.cap,
                     "contended_cap": f"min(cap, max(30, {CAP_FACTOR:g} x quiet seconds))",
                     "wait_quiet_seconds": args.wait_quiet,
                     "competitor": f"{args.competitor_threads}-thread torch loop of 512x512 float32 matmuls",
                     "train": {"batch": BATCH["train"], "steps": STEPS["train"]},
                     "evaluate": {"batch": BATCH["evaluate"], "steps": STEPS["evaluate"]},
                     "score": "compress(..., target=0.33, epochs=0, bench_batches=(), bn_recalib=0), "
                              "normalize=cifar, 256 calibration images; seconds = timings['compress']",
                     "torch_default_threads": default},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "torch_parallel": torch.__config__.parallel_info().splitlines()[-1].strip()},
        "rows": rows, "summary": summarise(rows),
    }


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every (model, task, setting): quiet, then contended (interleaved, so that drifts in load hit both). The
    results file is rewritten after every pair, so an interrupted run keeps what it measured."""
    from compressor.threads import PROBED, ThreadPolicy, torch_default_threads

    default = torch_default_threads()
    rows: list[dict[str, Any]] = []
    for model in args.models:
        for kind in args.tasks:
            stage = STAGE_OF[kind]
            policy = None if stage in PROBED else ThreadPolicy().for_stage(stage)
            for setting, spec in settings_for(policy, default).items():
                task = {"model": model, "task": kind, "setting": setting, "roles": spec["roles"], "cap": args.cap,
                        "wait_quiet": args.wait_quiet,
                        "threads": spec["threads"], "checkpoint": str(args.shared / MODELS[model]),
                        "train": str(args.shared / TRAIN)}
                rows.append(measure(task, "quiet", args.competitor_threads))
                task["cap"] = contended_cap(rows[-1], args.cap)
                rows.append(measure(task, "contended", args.competitor_threads))
                write_json(out, {**payload_of(args, rows, default), "complete": False})
    return {**payload_of(args, rows, default), "complete": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), help="one model (default: both)")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(DEFAULT_TASKS),
                        help="a subset of cmi,mipp,train,evaluate (default: cmi,mipp)")
    parser.add_argument("--cap", type=float, default=180.0, help="seconds before a measurement is stopped (180)")
    parser.add_argument("--wait-quiet", type=float, default=10.0,
                        help="before a quiet measurement, wait up to this many seconds for the machine to be idle")
    parser.add_argument("--competitor-threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that a stopped run stops its competitor too
    if args.child:
        child(json.loads(args.child))
        return 0
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; choose from {','.join(TASKS)}")
    args.models = ["resnet20"] if args.quick else [args.model] if args.model else list(MODELS)
    for path in [args.shared / TRAIN, *(args.shared / MODELS[m] for m in args.models)]:
        if not path.exists():
            print(f"skipped: not found: {path} (the ../shared checkout)", file=sys.stderr)
            return 0
    out = args.out or RESULTS / default_name(args.models, args.tasks)
    args.argv = sys.argv[1:] if argv is None else argv
    start = time.perf_counter()
    payload = run(args, out)
    payload["wall_seconds"] = round(time.perf_counter() - start, 1)
    check_payload(payload)
    write_json(out, payload)
    print(json.dumps(payload["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
