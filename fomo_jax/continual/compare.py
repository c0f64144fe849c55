"""Compare continual runs made separately: one table, the trajectories, the per-dataset scores.

    fomo-jax compare runs/finetune runs/lora64 runs/ema_ties --out=runs/compare

Reads each run's `results.json` and `config.json` and writes to the output folder
`comparison.md` and `comparison.json` (per run: method, schedule, tasks, steps per task, final
and area-under-trajectory A_KA / A_ZS / GM), `trajectories.png` (A_ZS against A_KA over each
stream, the final full-test-set point starred) and `per_dataset.png` (each run's final score
on every dataset). Runs over different dataset sets are compared on the datasets they all
have: their metrics are recomputed from the per-dataset scores of those datasets alone, and
the table says so. Runs whose stream differs from the first run's are flagged.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from fomo_jax import evaluate as evaluate_lib

KEYS = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean")
SHORT = {"knowledge_accumulation": "A_KA", "zero_shot_retention": "A_ZS", "geometric_mean": "GM"}
AUT_NOTE = ("AUT: area under the trajectory (zero-shot point, then one point per evaluated "
            "task), normalized by the number of intervals.")  # fmt: skip


def compare_runs(run_dirs: list[str], out_dir: str) -> dict:
    """Compare the finished runs in `run_dirs`; write the table and figures to `out_dir`.

    Returns {"runs": {name: row}, "datasets": the datasets compared on, "notes": [...]}, the
    content of `comparison.json`. A run is named by its folder (by its path below the runs'
    common folder where two folder names coincide)."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    runs = dict(zip(run_names(run_dirs), (read_run(d) for d in run_dirs), strict=True))
    shared, notes = _shared_datasets(runs)
    recompute = bool(notes)  # some run has datasets the others lack
    rows = {name: _row(run, shared, recompute) for name, run in runs.items()}
    notes += _stream_notes(rows)
    comparison = dict(runs=rows, datasets=shared, notes=notes)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "comparison.json"), "w") as f:
        json.dump(comparison, f, indent=1)
    table = format_comparison(comparison)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(table)
    plot_trajectories(rows, os.path.join(out_dir, "trajectories.png"))
    plot_per_dataset(rows, shared, os.path.join(out_dir, "per_dataset.png"))
    logging.info("compare: %d runs -> %s", len(rows), out_dir)
    print(table)
    return comparison


# ------------------------------------------------------------------------------- reading


def read_run(run_dir: str) -> dict:
    """{"dir", "results", "config"} of a finished continual run, with clear errors."""
    paths = {name: os.path.join(run_dir, f"{name}.json") for name in ("results", "config")}
    for name, path in paths.items():
        if not os.path.isfile(path):
            what = " (the run has not finished)" if name == "results" else ""
            raise FileNotFoundError(f"{path} is missing{what}: {run_dir!r} is not a finished run")
    run = {"dir": run_dir}
    for name, path in paths.items():
        with open(path) as f:
            run[name] = json.load(f)
    missing = {"final", "trajectory", "per_dataset"} - set(run["results"])
    if missing:
        raise ValueError(f"{paths['results']} has no {sorted(missing)}: not a continual run's "
                         "results (a pretraining job's?)")  # fmt: skip
    return run


def run_names(run_dirs: list[str]) -> list[str]:
    """Folder names, or paths below the common folder where folder names coincide."""
    paths = [os.path.abspath(d) for d in run_dirs]
    if len(set(paths)) < len(paths):
        twice = sorted({d for d in paths if paths.count(d) > 1})
        raise ValueError(f"run directories given more than once: {twice}")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):
        common = os.path.commonpath(paths)
        names = [os.path.relpath(p, common) for p in paths]
    return names


def dataset_registry(config: dict) -> dict:
    """{key: DatasetInfo} of a run's benchmark (only the roles are used; they do not depend on
    the generated data, so the data need not be on this machine)."""
    from fomo_jax.data import fif_synth, registry

    benchmark = config["data"]["benchmark"]
    if benchmark == "fif_synth":
        return fif_synth.to_registry(fif_synth.specs())
    if benchmark == "fif":
        return dict(registry.DATASETS)
    raise ValueError(f"config.data.benchmark={benchmark!r}: expected 'fif_synth' or 'fif'")


# ------------------------------------------------------------------------------ comparing


def _shared_datasets(runs: dict) -> tuple[list[str], list[str]]:
    """The datasets every run was scored on (sorted), and notes on what some runs also have."""
    sets = {name: set(run["results"]["per_dataset"]["final_full"]) for name, run in runs.items()}
    shared = sorted(set.intersection(*sets.values()))
    if not shared:
        listed = {name: sorted(datasets) for name, datasets in sets.items()}
        raise ValueError(f"the runs share no dataset: {listed}")
    notes = []
    if any(s != set(shared) for s in sets.values()):
        notes.append(f"Compared on the {len(shared)} datasets all runs share; metrics are "
                     "recomputed from their per-dataset scores.")  # fmt: skip
        for name, datasets in sets.items():
            extra = sorted(datasets - set(shared))
            if extra:
                notes.append(f"Run {name} also has {len(extra)}: {', '.join(extra)}.")
    return shared, notes


def _restricted(per_dataset: dict, shared: list[str], roles: dict, where: str) -> dict:
    """A_KA / A_ZS / GM of `per_dataset` over the `shared` datasets alone."""
    unknown = [k for k in shared if k not in roles]
    if unknown:
        raise ValueError(f"{where}: datasets {unknown} are not in the benchmark's registry")
    return evaluate_lib.headline_metrics({k: per_dataset[k] for k in shared}, roles)


def _row(run: dict, shared: list[str], recompute: bool) -> dict:
    """One run's line: its own numbers, or (`recompute`) the same numbers over the `shared`
    datasets alone, for every run alike."""
    results, config = run["results"], run["config"]
    per_dataset = results["per_dataset"]
    if not recompute:
        final = {k: results["final"][k] for k in KEYS}
        trajectory = [{k: p[k] for k in KEYS} for p in results["trajectory"]]
        area = {k: results["area_under_trajectory"][k] for k in KEYS}
    else:
        roles = dataset_registry(config)
        where = os.path.join(run["dir"], "results.json")
        final = _restricted(per_dataset["final_full"], shared, roles, where)
        points = [per_dataset["zero_shot_full"], *per_dataset["tasks_subset"]]
        trajectory = [_restricted(p, shared, roles, where) for p in points]
        area = {k: evaluate_lib.area_under_trajectory([p[k] for p in trajectory]) for k in KEYS}
    return dict(
        dir=os.path.abspath(run["dir"]),
        method=config["method"],
        schedule=config["schedule"]["name"],
        num_tasks=config["num_tasks"],
        steps_per_task=results["steps_per_task"],
        stream=stream_of(config),
        final=final,
        area_under_trajectory=area,
        trajectory=trajectory,
        per_dataset_final={k: evaluate_lib.headline(per_dataset["final_full"][k]) for k in shared},
    )


def stream_of(config: dict) -> dict:
    """What makes two runs' streams the same: benchmark, stream file, number of tasks (and the
    generator's seed for fif_synth, whose stream order it draws). Data roots are left out: the
    same stream generated or copied to two folders is the same stream."""
    data = config["data"]
    stream = dict(
        benchmark=data["benchmark"],
        stream=os.path.basename(data.get("stream") or "random_sequence_1.json"),
        num_tasks=config["num_tasks"],
    )
    if data["benchmark"] == "fif_synth":
        stream["synth_seed"] = data.get("synth_seed")
    return stream


def _stream_notes(rows: dict) -> list[str]:
    (first, reference), *others = rows.items()
    notes = []
    for name, row in others:
        stream, ours = row["stream"], reference["stream"]
        differ = [f"{k} {v} vs {ours.get(k)}" for k, v in stream.items() if v != ours.get(k)]
        if differ:
            notes.append(f"Run {name} has a different stream from {first}: {'; '.join(differ)}.")
    return notes


# ------------------------------------------------------------------------------ writing


def format_comparison(comparison: dict) -> str:
    """The markdown table: per run, final and area-under-trajectory metrics; then the notes."""
    header = ["run", "method", "schedule", "tasks", "steps/task"]
    header += [f"final {SHORT[k]}" for k in KEYS] + [f"AUT {SHORT[k]}" for k in KEYS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in comparison["runs"].items():
        cells = [name, row["method"], row["schedule"], str(row["num_tasks"]),
                 str(row["steps_per_task"])]  # fmt: skip
        cells += [f"{row['final'][k]:.2f}" for k in KEYS]
        cells += [f"{row['area_under_trajectory'][k]:.2f}" for k in KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    datasets = comparison["datasets"]
    lines += ["", f"Datasets compared ({len(datasets)}): {', '.join(datasets)}."]
    lines += comparison["notes"] + [AUT_NOTE, ""]
    lines += [f"- {name}: {row['dir']}" for name, row in comparison["runs"].items()]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(rows: dict, path: str, title: str = "Runs") -> None:
    """A_ZS against A_KA over each run's trajectory; a star marks its final (full) point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = plt.get_cmap("tab20")
    for i, (name, row) in enumerate(rows.items()):
        color = colors(2 * i % 20 + i // 10)
        ka = [p["knowledge_accumulation"] for p in row["trajectory"]]
        zs = [p["zero_shot_retention"] for p in row["trajectory"]]
        ax.plot(ka, zs, "-o", ms=3, lw=1.2, label=name, color=color)
        if "final" in row:
            final = row["final"]
            ax.plot(final["knowledge_accumulation"], final["zero_shot_retention"], "*", ms=10,
                    color=color)  # fmt: skip
    ax.set(xlabel="A_KA: knowledge accumulation (%)", ylabel="A_ZS: zero-shot retention (%)",
           title=f"{title}: what is learned vs what is kept")  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_dataset(rows: dict, datasets: list[str], path: str) -> None:
    """Final accuracy (R@5 for retrieval) of every run on every compared dataset."""
    plt = _pyplot()
    grid = np.array([[row["per_dataset_final"][d] for row in rows.values()] for d in datasets])
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(rows), 0.9 + 0.35 * len(datasets)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_yticks(range(len(datasets)), datasets, fontsize=8)
    ax.set_xticks(range(len(rows)), list(rows), fontsize=8, rotation=30, ha="right")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                color="white" if value < 50 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="final accuracy / R@5 (%)")
    ax.set_title("Final score per dataset")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
