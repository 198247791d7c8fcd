"""The benchmark harness: every method on trained CIFAR-10 ResNets at the same targets and fine-tuning budget.

Usage::

    python -m benchmarks.run --suite smoke             # ResNet-20, a few configurations, minutes
    python -m benchmarks.run --suite cpu               # ResNet-20 and ResNet-56, every method and target
    python -m benchmarks.run --suite gpu               # the same grid with 30 epochs on CUDA
    python -m benchmarks.run --suite deploy --resume   # fp32 and INT8, ResNet-56 and torchvision models at 224
    taskset -c 0 python -m benchmarks.run --suite cpu-hour-screen --resume   # issue 13: 12 methods x 5 min, ~2 h
    taskset -c 0 python -m benchmarks.run --suite cpu-hour --resume   # then the 4 chosen from the screen x 60 min
    python -m benchmarks.run --render-only             # rebuild CSV, plots, docs/RESULTS.md, README from the JSON
    python -m benchmarks.run --suite cpu --models resnet56 --methods l1 --targets 0.5:macs --results-dir /tmp/b

Models and data come from ``../shared`` (``--shared DIR``, or ``--checkpoint NAME=PATH``, ``--train-data``,
``--eval-data``); a model whose files are absent is skipped with a message. The suites are defined in
:mod:`benchmarks._suites`. Each configuration runs in its own process (:mod:`benchmarks._child`), so its peak memory
is its own and a crash cannot stop the suite; a configuration that fails (e.g. an unreachable target) is recorded as
a failed row with its message. A method that is not registered in this checkout is skipped with a note.

Outputs: ``benchmarks/results/<suite>/results.json`` (written after every configuration, so an interrupted suite
keeps what finished; ``--resume`` reruns only what is missing or failed), ``results.csv``, the plots
``top1_vs_macs-<model>.png`` and ``latency_vs_macs-<model>.png``, ``docs/RESULTS.md`` (every suite found) and the
README block between ``<!-- results:start -->`` and ``<!-- results:end -->`` (the cpu suite, else gpu; smoke
results never go to the README unless ``--readme-suite smoke`` asks for them).

A partial run (``--models``, ``--methods``, ``--targets``) refuses to replace a stored results.json: give it its own
``--results-dir``. A CUDA suite checks for CUDA in PyTorch and onnxruntime before running anything.

Durations (2 CPU cores; see :mod:`benchmarks._suites`): ``smoke`` 2.5 to 4 min measured on a shared machine;
``cpu`` estimated at 1.5 h on idle cores and about 3 h when the cores are shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from . import _render
from ._child import atomic_write_text
from ._suites import (
    MODELS,
    REPO,
    SHARED,
    SUITES,
    Config,
    SelectionError,
    Suite,
    data_root,
    filter_grid,
    resolve_method,
    select_grid,
)

RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "RESULTS.md"
README = REPO / "README.md"
#: Budget fields added since results were first stored, with the value older runs had implicitly (``quantize``:
#: the INT8 stage did not exist), so that ``--resume`` still matches their budget.
LEGACY_BUDGET = {"quantize": "none", "budget_minutes": None, "eval_every_minutes": None, "distill": False}
BENCH_EXTRA = 'matplotlib is needed for the plots: pip install -e ".[bench]" (or pass --no-plots)'


def _parse_targets(text: str | None) -> list[tuple[float, str | None]] | None:
    """``0.5,0.33:default,0.5:macs`` -> [(0.5, None), (0.33, "default"), (0.5, "macs")]."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        value, _, metric = item.partition(":")
        try:
            target = float(value)
        except ValueError:
            raise SystemExit(f"--targets {text}: {value!r} is not a number; e.g. 0.5,0.33:default,0.5:macs") from None
        if metric not in ("", "default", "filters", "params", "macs"):
            raise SystemExit(f"--targets {text}: metric {metric!r} is not one of default, filters, params, macs")
        pairs.append((target, metric or None))
    return pairs


def _split(text: str | None) -> list[str] | None:
    return [v for v in text.split(",") if v] if text else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), help="suite to run (with --render-only: to re-plot)")
    parser.add_argument("--render-only", action="store_true",
                        help="do not run anything: rebuild CSV, plots, RESULTS.md and README from stored JSON")
    parser.add_argument("--models", help="comma-separated subset of the suite's models")
    parser.add_argument("--methods", help="comma-separated subset of the suite's methods")
    parser.add_argument("--targets", help="subset of targets: 0.5 (any metric), 0.5:macs, 0.33:default")
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder with models/ and data/ (../shared)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="checkpoint of model NAME (repeatable), instead of the one under --shared")
    parser.add_argument("--train-data", type=Path, help="training data instead of the CIFAR-10 one under --shared")
    parser.add_argument("--eval-data", type=Path, help="evaluation data instead of the one under --shared")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: the suite's, else ORT's own)")
    parser.add_argument("--resume", action="store_true",
                        help="keep successful rows of the existing results.json that used the same budget")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where <suite>/results.json etc. go")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the generated results page (docs/RESULTS.md)")
    parser.add_argument("--readme", type=Path, default=README, help="README whose results block is regenerated")
    parser.add_argument("--readme-suite", help="suite shown in the README (default: cpu, else gpu, if stored)")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    args = parser.parse_args(argv)
    if not args.render_only and args.suite is None:
        parser.error(f"--suite is required ({', '.join(sorted(SUITES))}), unless --render-only")
    return args


def display_path(path: Path | str) -> str:
    """A path as it should appear in a recorded command: relative to the repo when inside it or ../shared."""
    resolved = Path(path).resolve()
    for base, shown in ((REPO, ""), (REPO.parent, "../")):
        try:
            return shown + str(resolved.relative_to(base))
        except ValueError:
            continue
    return str(path)


def recorded_command(argv: list[str]) -> str:
    """The command line as recorded in results.json: paths shown relative to the repo (``../shared/...``)."""
    shown = [display_path(a) if os.sep in a and os.path.exists(a) else a for a in argv]
    return "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in shown)


def _checkpoint_overrides(items: list[str]) -> dict[str, Path]:
    found = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            raise SystemExit(f"--checkpoint {item!r}: expected NAME=PATH with NAME one of {', '.join(MODELS)}")
        found[name] = Path(path)
    return found


def model_files(name: str, args: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    """The checkpoint and data of model ``name``, or a reason to skip it (a file or a package is missing).

    A model without a checkpoint (random weights) on synthetic data has no files; it needs the package its
    ``--arch`` factory imports (torchvision, see :mod:`benchmarks.torchvision_models`).
    """
    spec = MODELS[name]
    if spec.checkpoint is None:
        from . import torchvision_models

        if not torchvision_models.available():
            return {}, f"{name}: torchvision is not installed ({torchvision_models.INSTALL})"
        return {"checkpoint": "", "train": "", "eval": ""}, None
    root = data_root(spec.data, args.shared)
    shared_data = spec.data.root == "shared"
    files = {
        "checkpoint": _checkpoint_overrides(args.checkpoint).get(name, root / spec.checkpoint),
        "train": args.train_data if shared_data and args.train_data else root / spec.data.train,
        "eval": args.eval_data if shared_data and args.eval_data else root / spec.data.eval,
    }
    for what, path in files.items():
        if not Path(path).exists():
            hint = {"checkpoint": f"--shared DIR or --checkpoint {name}=PATH", "train": "--shared DIR or --train-data",
                    "eval": "--shared DIR or --eval-data"}[what]
            return {}, f"{name}: {what} {display_path(path)} not found (pass {hint})"
    return {k: str(Path(v).resolve()) for k, v in files.items()}, None


def unsupported_round_to(configs: tuple[Config, ...]) -> dict[int | str, str]:
    """A skip reason for each ``round_to`` of ``configs`` that this checkout's CompressConfig refuses (``auto``
    before it exists)."""
    from compressor.config import CompressConfig
    from compressor.errors import InputError

    reasons: dict[int | str, str] = {}
    for value in dict.fromkeys(c.round_to for c in configs if c.round_to is not None):
        try:
            CompressConfig(round_to=value).validate()  # type: ignore[arg-type]  # "auto" where supported
        except (InputError, TypeError, ValueError) as exc:
            reasons[value] = f"--round-to {value}: not accepted by this checkout's CompressConfig ({exc})"
    return reasons


def method_metrics(methods: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Default target metric of each registered method, and a skip reason for each method that is not registered."""
    from compressor.errors import UnknownNameError
    from compressor.methods import build_method

    metrics, skipped = {}, {}
    for method in methods:
        try:
            metrics[method] = build_method(resolve_method(method)[0]).default_metric
        except UnknownNameError:
            skipped[method] = f"{method}: not registered in this checkout (compressor.list_methods())"
    return metrics, skipped


def check_device(device: str) -> None:
    """A CUDA suite needs CUDA in both PyTorch and onnxruntime; say so once instead of failing every row."""
    if device != "cuda":
        return
    import onnxruntime
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("this suite fine-tunes on CUDA, but no CUDA device is available to PyTorch; "
                         "run --suite cpu on this machine")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise SystemExit("this suite benchmarks on CUDA, but onnxruntime has no CUDA provider; "
                         'pip uninstall onnxruntime && pip install -e ".[gpu,bench]"')


def make_job(config: Config, metric: str, files: dict[str, str], suite: Suite, threads: int | None) -> dict[str, Any]:
    spec = MODELS[config.model]
    budget = suite.budget.to_dict()
    if threads is not None:
        budget["threads"] = threads
    method, options = resolve_method(config.method)
    job = {"key": config.key(metric), "model": config.model, "arch": spec.arch, "normalize": spec.data.normalize,
           "method": config.method, "compress_method": method, "method_options": options,
           "target": config.target, "metric": metric, "budget": budget, **files}
    if config.round_to is not None:
        job["round_to"] = config.round_to
    if spec.overrides:
        job["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.overrides}
    if spec.checkpoint is None:
        job.update(latency_only=spec.latency_only, synthetic={"image_size": spec.data.image_size})
    return job


def run_config(job: dict[str, Any], timeout_s: int) -> dict[str, Any]:
    """Run one job in a fresh interpreter; a crash or timeout becomes a failed row."""
    base = {"key": job["key"], "model": job["model"], "method": job["method"], "target": job["target"],
            "target_metric": job["metric"]}
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        job_path, row_path = Path(tmp) / "job.json", Path(tmp) / "row.json"
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks._child", str(job_path), str(row_path)],
                                  cwd=REPO, env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {**base, "status": "failed", "error": f"timed out after {timeout_s} s (killed)",
                    "wall_s": round(time.perf_counter() - start, 2)}
        if row_path.exists():
            row: dict[str, Any] = json.loads(row_path.read_text())
            row["process_s"] = round(time.perf_counter() - start, 2)
            return row
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with code {proc.returncode}"
        return {**base, "status": "failed", "error": f"the configuration's process {how} without a result "
                f"(out of memory?); its stderr is above", "wall_s": round(time.perf_counter() - start, 2)}


def selected_suite(suite: Suite, results_dir: Path) -> Suite:
    """``suite`` with its grid chosen from the stored results of ``suite.selected_by`` (the ``cpu-hour`` rows from
    ``cpu-hour-screen``) and the choice in its notes; other suites unchanged. :class:`SelectionError` when the
    stored results cannot choose."""
    if suite.selected_by is None:
        return suite
    path = results_dir / suite.selected_by / "results.json"
    stored = json.loads(path.read_text()) if path.exists() else None
    grid, note = select_grid(stored, screen_name=suite.selected_by)
    return replace(suite, grid=grid, notes=(*suite.notes, note))


def _machine() -> dict[str, Any]:
    from compressor.report import machine

    info = machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str | None]:
    from compressor.report import versions

    found = versions()
    try:
        found["matplotlib"] = metadata.version("matplotlib")
    except metadata.PackageNotFoundError:
        found["matplotlib"] = None
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _previous_rows(path: Path, budget: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Successful rows of an earlier run of the same suite with the same budget (for ``--resume``), and the
    invocations that produced them (:func:`_invocation`)."""
    if not path.exists():
        return {}, []
    stored = json.loads(path.read_text())
    meta = stored.get("meta", {})
    if {**LEGACY_BUDGET, **(meta.get("budget") or {})} != budget:
        print(f"--resume: {display_path(path)} used another budget; running every configuration", file=sys.stderr)
        return {}, []
    rows = {r["key"]: r for r in stored.get("rows", []) if r.get("status") == "ok"}
    return rows, meta.get("invocations") or [_invocation(meta, len(rows))]


def _invocation(meta: dict[str, Any], ran: int) -> dict[str, Any]:
    """What one invocation of the harness contributed to a results.json: when, how long, which code, how many rows."""
    return {"command": meta.get("command"), "started": meta.get("started"), "duration_s": meta.get("duration_s"),
            "git": meta.get("git"), "configurations_run": ran}


def _progress(i: int, n: int, row: dict[str, Any]) -> str:
    head = f"[{i}/{n}] {row['key']}:"
    if row["status"] != "ok":
        return f"{head} FAILED: {row['error']}"
    pct = _render.pct
    speed = " ".join(f"b{k[len('speedup_b'):]} {v:.2f}x" for k, v in row.items() if k.startswith("speedup_b"))
    int8 = " ".join(f"b{k[len('int8_gain_b'):]} {row['speedup_int8_b' + k[len('int8_gain_b'):]]:.2f}x "
                    f"(over INT8 original {v:.2f}x)" for k, v in row.items() if k.startswith("int8_gain_b"))
    int8 = f", INT8 {int8}" if int8 else ""
    return (f"{head} top-1 {pct(row['top1_orig'])} -> {pct(row['top1_pruned'])} -> {pct(row['top1_finetuned'])}, "
            f"MACs /{row['mac_reduction']:.2f}, speedup {speed}{int8}, {row['wall_s']:.0f} s, "
            f"{row['peak_rss_mib']:.0f} MiB")


def _data_meta(model: str, files: dict[str, str]) -> dict[str, Any]:
    """How a model's files appear in results.json: relative paths, or what a random-weight model is built from."""
    spec = MODELS[model]
    if spec.checkpoint is None:
        size = spec.data.image_size
        return {"checkpoint": f"random weights (seed of the budget) of --arch {display_path(str(spec.arch))}",
                "train": f"seeded noise, {size}x{size}", "eval": "none (latency only)",
                "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.overrides}}
    return {k: display_path(v) for k, v in files.items()}


def run_suite(suite: Suite, configs: tuple[Config, ...], args: argparse.Namespace, command: str) -> Path | None:
    """Run ``configs`` one process each; write ``<results>/<suite>/results.json`` after every row. None: nothing ran."""
    notes: list[str] = []
    files: dict[str, dict[str, str]] = {}
    for model in dict.fromkeys(c.model for c in configs):
        found, reason = model_files(model, args)
        if reason:
            notes.append(f"skipped {reason}")
        else:
            files[model] = found
    metrics, skipped = method_metrics(list(dict.fromkeys(c.method for c in configs)))
    aligns = unsupported_round_to(configs)
    notes += [f"skipped {reason}" for reason in [*skipped.values(), *aligns.values()]]
    for note in notes:
        print(note, file=sys.stderr)
    check_device(suite.budget.device)
    jobs = [make_job(c, c.metric or metrics[c.method], files[c.model], suite, args.threads)
            for c in configs if c.model in files and c.method in metrics and c.round_to not in aligns]
    if not jobs:
        print(f"skipped: nothing to run in suite {suite.name} (see above)", file=sys.stderr)
        return None
    out = args.results_dir / suite.name / "results.json"
    budget = jobs[0]["budget"]
    done, earlier = _previous_rows(out, budget) if args.resume else ({}, [])
    meta = {"suite": suite.name, "description": suite.description, "command": command, "budget": budget,
            "timeout_s": suite.timeout_s, "notes": [*suite.notes, *notes], "started": _now(),
            "git": _git_revision(), "machine": _machine(), "versions": _versions(), "complete": False,
            "data": {m: _data_meta(m, f) for m, f in files.items()}}
    this = {"command": command, "started": meta["started"], "git": meta["git"]}
    rows: list[dict[str, Any]] = []
    start, ran = time.perf_counter(), 0
    for i, job in enumerate(jobs, 1):
        row = done.get(job["key"])
        if row is None:
            print(f"[{i}/{len(jobs)}] {job['key']} ...", file=sys.stderr, flush=True)
            row = run_config(job, suite.timeout_s)
            ran += 1
        rows.append(row)
        print(_progress(i, len(jobs), row), file=sys.stderr, flush=True)
        this.update(duration_s=round(time.perf_counter() - start, 1), configurations_run=ran)
        invocations = [*earlier, dict(this)]  # a resumed run: the first start, the sum of the durations
        meta.update(invocations=invocations, started=invocations[0]["started"],
                    duration_s=round(sum(v.get("duration_s") or 0.0 for v in invocations), 1))
        atomic_write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    meta.update(complete=True, finished=_now())
    atomic_write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return out


def render(args: argparse.Namespace, plot_suites: list[str] | None) -> list[Path]:
    """CSV and plots of ``plot_suites`` (None: every stored suite), then RESULTS.md and the README block."""
    stored = _render.load_results(args.results_dir)
    if not stored:
        print(f"nothing to render: no <suite>/results.json under {display_path(args.results_dir)}", file=sys.stderr)
        return []
    written = []
    for name, results in stored.items():
        if plot_suites is not None and name not in plot_suites:
            continue
        written.append(_render.write_csv(results, args.results_dir / name / "results.csv"))
        if not args.no_plots:
            from . import _plots

            written += _plots.plot_suite(results, args.results_dir / name)
    written.append(_render.write_results_page(stored, args.docs, args.results_dir))
    readme_suite = None if args.no_readme else _render.readme_suite(stored, args.readme_suite)
    if readme_suite is not None:
        written.append(_render.write_readme_block(readme_suite, stored[readme_suite], args.readme, args.docs))
    elif not args.no_readme:
        print("README left alone: no cpu or gpu results stored yet (pass --readme-suite to show another)",
              file=sys.stderr)
    return written


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(BENCH_EXTRA) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_plots:
        _check_matplotlib()  # before hours of work, not after
    if args.render_only:
        written = render(args, [args.suite] if args.suite else None)
        for path in written:
            print(f"wrote {display_path(path)}", file=sys.stderr)
        return 0 if written else 1
    try:
        suite = selected_suite(SUITES[args.suite], args.results_dir)
    except SelectionError as exc:
        print(f"--suite {args.suite}: {exc}", file=sys.stderr)
        return 2
    configs = filter_grid(suite, models=_split(args.models), methods=_split(args.methods),
                          targets=_parse_targets(args.targets))
    if args.list:
        if suite.selected_by:
            print(suite.notes[-1])
        for c in configs:
            align = "" if c.round_to is None else f" round-to {c.round_to}"
            print(f"{c.model} {c.method} {c.target:g} {c.metric or 'default'}{align}")
        return 0
    if not configs:
        print(f"no configuration of suite {suite.name} matches --models/--methods/--targets", file=sys.stderr)
        return 2
    stored = args.results_dir / suite.name / "results.json"
    if len(configs) < len(suite.grid) and stored.exists():
        print(f"a partial run (--models/--methods/--targets) would replace {display_path(stored)}; "
              "pass --results-dir DIR to write it elsewhere", file=sys.stderr)
        return 2
    command = recorded_command(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    try:
        out = run_suite(suite, configs, args, command)
    except KeyboardInterrupt:
        print("interrupted: the finished configurations are in results.json (rerun with --resume)", file=sys.stderr)
        return 130
    if out is None:
        return 0
    for path in [out, *render(args, [suite.name])]:
        print(f"wrote {display_path(path)}", file=sys.stderr)
    print(f"suite {suite.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
