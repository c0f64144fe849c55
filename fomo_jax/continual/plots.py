"""Plots of a continual run: the A_KA-A_ZS trajectory, a per-dataset heatmap, every headline
metric along the stream (the VLM's text retention too), the schedule."""

from __future__ import annotations

import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_all(results: dict, learning_rates, directory: str) -> None:
    plt = _pyplot()
    trajectory = results["trajectory"] + [results["final"] | {"evaluation": "full"}]
    ka = [p["knowledge_accumulation"] for p in trajectory]
    zs = [p["zero_shot_retention"] for p in trajectory]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(ka, zs, "-o", color="tab:blue")
    labels = ["θ0"] + [f"T{i}" for i in range(len(trajectory) - 2)] + ["final"]
    for x, y, label in zip(ka, zs, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="A_KA: knowledge accumulation (%)", ylabel="A_ZS: zero-shot retention (%)",
           title="Continual pretraining: learned vs kept")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "ka_zs_trajectory.png"), dpi=120)
    plt.close(fig)

    columns = [results["per_dataset"]["zero_shot_full"], *results["per_dataset"]["tasks_subset"],
               results["per_dataset"]["final_full"]]  # fmt: skip
    names = sorted(columns[0])
    score = lambda v: v.get("accuracy", v.get("recall@5"))  # noqa: E731
    grid = np.array([[score(c[n]) for c in columns] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(columns), 0.9 + 0.35 * len(names)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks(range(len(columns)), labels, fontsize=8)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                color="white" if value < 50 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="accuracy / R@5 (%)")
    ax.set_title("Per dataset over the stream")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "per_dataset.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))  # every headline metric along the stream
    for key in results["final"]:
        ax.plot(range(len(trajectory)), [p[key] for p in trajectory], "-o", label=key)
    ax.set_xticks(range(len(trajectory)), labels, fontsize=8)
    ax.set(ylabel="%", title="Headline metrics over the stream (subsets; θ0 and final: full)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "metrics.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 2.5))
    ax.plot(np.arange(len(learning_rates)), learning_rates, color="tab:orange")
    ax.set(xlabel="step over the stream", ylabel="learning rate", title="Schedule used")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "learning_rate.png"), dpi=120)
    plt.close(fig)
