"""The report of ``benchmarks/accuracy_per_bit.py``: table rows, the markdown table, the
weight-norm ratios, accuracy plots and per-layer bit heat maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: Policies whose per-layer bits get a heat map (seed 0): the adaptive ones.
HEATMAP_POLICIES = ("fedmpq", "fedmpq-faithful", "fedlq", "fedlq4", "fedmpq4")


def summarise(result: dict[str, Any], target: float, reference_seed: int) -> dict[str, Any]:
    """Table row of one run: accuracies, up- and downlink bytes, bits, planes dropped, rounds
    and emulated seconds to ``target`` (set by the float32 run of ``reference_seed``)."""
    hist = result["history"]
    rounds = hist[1:]
    cumulative = np.cumsum([h["uplink_bytes"] for h in hist])
    downlink = sum(h.get("downlink_bytes", 0) for h in hist)
    hit = next((i for i, h in enumerate(hist) if h["accuracy"] >= target), None)
    # Emulated seconds: every round lasts as long as its slowest client's compute,
    # download (task + model) and upload on the benchmark's links.
    elapsed = np.cumsum([h["emulated_round_s"] for h in hist])
    run = result["run"]
    sizes = result["layer_sizes"]
    sent = [
        np.mean([sum(b[n] * sizes[n] for n in sizes) / sum(sizes.values()) for b in bits])
        for bits in (h["sent_bits"].values() for h in rounds)
    ]
    return {
        **{k: run[k] for k in ("dataset", "alpha", "policy", "seed")},
        "final_acc": hist[-1]["accuracy"],
        "best_acc": max(h["accuracy"] for h in hist),
        "uplink_mb": float(cumulative[-1]) / 1e6,
        "downlink_mb": downlink / 1e6,
        "sent_bits": float(np.mean(sent)) if run["policy"] != "float32" else 32.0,
        "planes_dropped": [h.get("planes_dropped", 0) for h in rounds],
        "round_s": float(np.mean([h["emulated_round_s"] for h in rounds])),
        # The slowest client's compute, download and upload seconds, mean over rounds.
        "round_parts_s": [
            float(x)
            for x in np.mean([h.get("emulated_slowest_parts_s", [0.0] * 3) for h in rounds], axis=0)
        ],
        "rounds_to_target": hit,
        "time_to_target_s": None if hit is None else float(elapsed[hit]),
        "target_acc": target,
        "reference_seed": reference_seed,
        "wall_s": result["wall_s"],
    }


def add_time_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``time_ratio``: its float32 reference's emulated time to the target
    over its own (> 1: faster than float32), None when either never reached it."""
    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if r["policy"] == "float32"
                and (r["dataset"], r["alpha"], r["seed"])
                == (row["dataset"], row["alpha"], row["reference_seed"])
            ),
            None,
        )
        mine = row["time_to_target_s"]
        theirs = None if ref is None else ref["time_to_target_s"]
        row["time_ratio"] = None if not mine or theirs is None else theirs / mine


def norm_ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Smallest and largest per-layer weight-norm ratio of each run to fixed's (same data,
    alpha, seed): a layer shrunk by the lasso shows in ``min``, one grown in ``max``."""
    out = {}
    for res in results:
        run = res["run"]
        ref = next(
            (
                r
                for r in results
                if r["run"]["policy"] == "fixed"
                and all(r["run"][k] == run[k] for k in ("dataset", "alpha", "seed"))
            ),
            None,
        )
        if ref is None or run["policy"] == "float32":
            continue
        ratios = [
            res["layer_norms"][n] / max(ref["layer_norms"][n], 1e-12) for n in ref["layer_norms"]
        ]
        key = f"{run['policy']} a={run['alpha']} s={run['seed']}"
        out[key] = {"min": float(min(ratios)), "max": float(max(ratios))}
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], extra: dict[str, Any]) -> str:
    lines = [
        "# Accuracy per uplink bit",
        "",
        f"Settings: {json.dumps(meta)}",
        "",
        "| data | alpha | seed | policy | final acc | best acc | avg wire bits sent "
        "| uplink MB | downlink MB | planes dropped per round "
        "| emulated s per round: compute + down + up (slowest client, mean) | rounds to target "
        "| emulated s to target (up + down + compute) | time-to-target ratio vs float32 "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hit = "—" if r["rounds_to_target"] is None else str(r["rounds_to_target"])
        secs = "—" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        ratio = "—" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x"
        parts = " + ".join(f"{x:.2f}" for x in r["round_parts_s"])
        lines.append(
            f"| {r['dataset']} | {r['alpha']} | {r['seed']} | {r['policy']} "
            f"| {r['final_acc']:.4f} | {r['best_acc']:.4f} | {r['sent_bits']:.2f} "
            f"| {r['uplink_mb']:.2f} | {r['downlink_mb']:.2f} "
            f"| {' '.join(map(str, r['planes_dropped']))} | {r['round_s']:.2f}: {parts} "
            f"| {hit} | {secs} | {ratio} "
            f"| {r['wall_s']:.0f} |"
        )
    lines += ["", "Per-layer weight-norm ratio to fixed, smallest / largest (final model):", ""]
    lines += [f"- {k}: {v['min']:.3f} / {v['max']:.3f}" for k, v in extra["norm_ratios"].items()]
    lines += ["", *fedmpq_checks(rows, extra["norm_ratios"])]
    if extra.get("client_cost"):
        cost = extra["client_cost"]
        lines += [
            "",
            f"Client CPU per task ({cost['model']}, {cost['samples']} samples, "
            f"{cost['wire_bits']} wire bits, thread_time): fixed {cost['cpu_s']['fixed']:.2f} s, "
            f"fedmpq {cost['cpu_s']['fedmpq']:.2f} s, ratio {cost['ratio']:.2f}x",
        ]
    return "\n".join(lines) + "\n"


def fedmpq_checks(rows: list[dict[str, Any]], norms: dict[str, dict[str, float]]) -> list[str]:
    """Issue 13's checks per data set and alpha, as a markdown table: FedMPQ's final accuracy
    (mean over the seeds run) against fixed's and its frozen allocation's, bits sent,
    rounds in which planes dropped, late slip (final < best - 1 point) and the norm ratios."""
    out = [
        "FedMPQ against fixed precision (accuracy: mean of the seeds run; slip: final below"
        " best - 1 point; norms: smallest / largest per-layer ratio to fixed's):",
        "",
        "| data | alpha | fedmpq final | fixed final | fedmpq-frozen final | bits sent fedmpq"
        " / fixed | rounds with planes dropped | late slip (seeds) | norm ratio (seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def mean(values: list[float]) -> str:
        return f"{100 * float(np.mean(values)):.1f}%" if values else "—"

    for dataset, alpha in sorted({(r["dataset"], r["alpha"]) for r in rows}, key=lambda k: -k[1]):
        by = {
            p: [r for r in rows if (r["dataset"], r["alpha"], r["policy"]) == (dataset, alpha, p)]
            for p in ("fedmpq", "fixed", "fedmpq-frozen")
        }
        if not by["fedmpq"] or not by["fixed"]:
            continue
        mpq = by["fedmpq"]
        dropped = [
            f"s{r['seed']} {sum(d > 0 for d in r['planes_dropped'])}/{len(r['planes_dropped'])}"
            for r in mpq
        ]
        slips = [
            f"s{r['seed']} {'yes' if r['final_acc'] < r['best_acc'] - 0.01 else 'no'}" for r in mpq
        ]
        ratios = [
            f"s{r['seed']} {n['min']:.2f}/{n['max']:.2f}"
            for r in mpq
            if (n := norms.get(f"fedmpq a={alpha} s={r['seed']}"))
        ]
        out.append(
            f"| {dataset} | {alpha} | {mean([r['final_acc'] for r in mpq])} "
            f"| {mean([r['final_acc'] for r in by['fixed']])} "
            f"| {mean([r['final_acc'] for r in by['fedmpq-frozen']])} "
            f"| {np.mean([r['sent_bits'] for r in mpq]):.2f} / "
            f"{np.mean([r['sent_bits'] for r in by['fixed']]):.2f} "
            f"| {', '.join(dropped)} "
            f"| {', '.join(slips)} | {', '.join(ratios)} |"
        )
    return out


def plot(
    results: list[dict[str, Any]], out: Path, paper_budgets: list[int], wire_budgets: list[int]
) -> list[Path]:
    """Accuracy vs cumulative uplink MB per data/alpha; per-layer bit heat maps of FedMPQ
    (the clients' budgets: ``paper_budgets`` magnitude planes, ``wire_budgets`` wire bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for res in results:
        groups.setdefault((res["run"]["dataset"], res["run"]["alpha"]), []).append(res)
    for (dataset, alpha), group in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for res in group:
            run = res["run"]
            hist = res["history"]
            mb = np.cumsum([h["uplink_bytes"] for h in hist]) / 1e6
            label = run["policy"] + (f" (seed {run['seed']})" if run["seed"] else "")
            ax.plot(mb, [h["accuracy"] for h in hist], marker=".", label=label)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(f"{dataset}, alpha={alpha}, budgets {paper_budgets} planes")
        ax.set_xlabel("cumulative uplink MB")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"accuracy_per_bit_{_slug(dataset)}_a{alpha}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        for res in group:
            if res["run"]["policy"] in HEATMAP_POLICIES and not res["run"]["seed"]:
                written.append(_heatmap(res, out, plt, paper_budgets, wire_budgets))
    return written


def _heatmap(
    res: dict[str, Any], out: Path, plt: Any, paper_budgets: list[int], wire_budgets: list[int]
) -> Path:
    """Wire bits sent per layer (rows) and round (columns), one panel per budget."""
    run = res["run"]
    rounds = res["history"][1:]
    layers = list(res["layer_norms"])
    clients = sorted(rounds[0]["sent_bits"])
    picks: dict[tuple[int, int], str] = {}
    for cid, wire, paper in zip(clients, wire_budgets, paper_budgets, strict=False):
        picks.setdefault((wire, paper), cid)
    fig, axes = plt.subplots(1, len(picks), figsize=(3.0 * len(picks), 0.3 * len(layers) + 2))
    axes = np.atleast_1d(axes)
    for ax, ((wire, paper), cid) in zip(axes, sorted(picks.items()), strict=True):
        grid = np.array([[h["sent_bits"].get(cid, {}).get(n, 0) for h in rounds] for n in layers])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=8)
        ax.set_title(f"{cid[-2:]}: budget {paper} planes = {wire} wire bits", fontsize=8)
        ax.set_xlabel("round")
        ax.set_xticks(range(len(rounds)), [str(h["round"]) for h in rounds], fontsize=6)
        ax.set_yticks(
            range(len(layers)), layers if ax is axes[0] else [""] * len(layers), fontsize=6
        )
    fig.colorbar(im, ax=list(axes), label="wire bits sent")
    fig.suptitle(
        f"{run['policy']}: bits per layer per round, {run['dataset']}, alpha={run['alpha']}"
    )
    path = out / f"bits_heatmap_{run['policy']}_{_slug(run['dataset'])}_a{run['alpha']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")
