"""Accuracy per uplink bit: FedMPQ and FedLQ against float32 FedAvg, fixed precision and QSGD.

10 clients with average-bit budgets ``[2,2,4,4,4,6,6,6,8,8]`` (mean 5) or uniform 4,
Dirichlet label skew alpha 0.5 and 0.1, every policy; rounds run in-process through the
real coordinator and agent code (``benchmarks/round_driver.py``).  Emulated time: each
client computes at 10 GFLOPS (``fedmpq.resources.training_seconds``), downloads at
10 Mbit/s and uploads at 1 Mbit/s; a round takes as long as its slowest client.

    python -m benchmarks.accuracy_per_bit --quick     # CI smoke test, < 5 min on 2 cores
    python -m benchmarks.accuracy_per_bit             # the full setting (~25 min)
    python -m benchmarks.accuracy_per_bit --fashion-mnist DIR --cifar10 DIR \
        --only-dataset --alphas 0.5 --settings hetero --train-samples 15000

Every policy quantizes with the same observer (``--observer``, default ``mse``).
``--cifar10`` takes the binary batches or ``train/``/``test/`` class folders (JPEGs).
Writes ``accuracy_per_bit.{json,md}`` and PNG plots into ``--out``
(default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.round_driver import SimDevice, register, run_round
from coordinator.config import RunConfig, TrainingConfig
from coordinator.engine import RoundEngine
from fedmpq.data.datasets import subset
from fedmpq.data.partition import partition
from fedmpq.quant_spec import OBSERVER_MSE, OBSERVERS
from fedmpq.wire.messages import DeviceProfile

RESULTS = Path(__file__).parent / "results"
CLIENTS = 10
BUDGETS = {"hetero": [2, 2, 4, 4, 4, 6, 6, 6, 8, 8], "uniform4": [4] * CLIENTS}
POLICIES: dict[str, dict[str, Any]] = {
    "float32": {"name": "float32"},
    "fixed": {"name": "fixed", "use_budget": True},
    "qsgd": {"name": "qsgd"},
    "fedlq": {"name": "fedlq", "every": 5},
    "fedmpq": {"name": "fedmpq"},
}
PROFILE = DeviceProfile(
    total_ram=4 * 2**30,
    available_ram=2 * 2**30,
    cpu_count=4,
    cpu_freq_mhz=1500.0,
    load_avg=0.0,
    gflops=10.0,
    platform="linux",
    arch="aarch64",
    uplink_bps=1e6,
    downlink_bps=10e6,
    profile_name="bench-1mbit",
)


@dataclass(frozen=True)
class Run:
    dataset: str
    model: str
    alpha: float
    setting: str
    policy: str
    rounds: int
    epochs: int
    train_samples: int  # 0: the whole training split
    observer: str = OBSERVER_MSE
    seed: int = 0


def run_one(run: Run) -> dict[str, Any]:
    """One federated run; returns its per-round history."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(
            run_id=f"apb-{run.policy}",
            model=run.model,
            dataset=run.dataset,
            rounds=run.rounds,
            min_clients=CLIENTS,
            out_dir=tmp,
            publish_onnx=False,
            seed=run.seed,
            observer=run.observer,
            policy=dict(POLICIES[run.policy]),
            budgets=[float(b) for b in BUDGETS[run.setting]],
            training=TrainingConfig(epochs=run.epochs, batch_size=32, learning_rate=0.05),
        )
        coordinator = RoundEngine(config)
        train = coordinator.workload.data.train
        if run.train_samples:
            pick = np.random.default_rng(run.seed).permutation(len(train.y))[: run.train_samples]
            train = subset(train, np.sort(pick))
        parts = partition(
            np.asarray(train.y), CLIENTS, "dirichlet", alpha=run.alpha, seed=run.seed, min_size=10
        )
        devices = {}
        for i, idx in enumerate(parts):
            x, y = subset(train, idx).tensors()
            devices[f"device-{i:04d}"] = SimDevice(f"device-{i:04d}", x, y, PROFILE, seed=i)
        register(coordinator, list(devices.values()))
        _, accuracy = coordinator.evaluate()
        history: list[dict[str, Any]] = [
            {
                "round": 0,
                "accuracy": accuracy,
                "uplink_bytes": 0,
                "emulated_round_s": 0.0,
                "emulated_upload_s": 0.0,
            }
        ]
        started = time.perf_counter()
        for r in range(1, run.rounds + 1):
            row = run_round(coordinator, devices, r)
            history.append(
                {
                    k: row[k]
                    for k in (
                        "round",
                        "accuracy",
                        "loss",
                        "uplink_bytes",
                        "client_bits",
                        "sent_bits",
                        "emulated_round_s",
                        "emulated_upload_s",
                    )
                }
            )
    return {"run": run.__dict__, "history": history, "wall_s": time.perf_counter() - started}


def summarise(result: dict[str, Any], target: float) -> dict[str, Any]:
    """Table row of one run: accuracies, uplink, rounds and emulated time to ``target``."""
    hist = result["history"]
    rounds = hist[1:]
    cumulative = np.cumsum([h["uplink_bytes"] for h in hist])
    elapsed = np.cumsum([h["emulated_round_s"] for h in hist])
    uploading = np.cumsum([h["emulated_upload_s"] for h in hist])
    hit = next((i for i, h in enumerate(hist) if h["accuracy"] >= target), None)
    bits = [np.mean(list(h["client_bits"].values())) for h in rounds]
    return {
        **{k: result["run"][k] for k in ("dataset", "alpha", "setting", "policy")},
        "final_acc": hist[-1]["accuracy"],
        "best_acc": max(h["accuracy"] for h in hist),
        "uplink_mb": float(cumulative[-1]) / 1e6,
        "uplink_mb_per_round": float(cumulative[-1]) / 1e6 / max(len(rounds), 1),
        "avg_bits": float(np.mean(bits)),
        "target_acc": target,
        "rounds_to_target": hit,
        "time_to_target_s": None if hit is None else float(elapsed[hit]),
        "upload_time_to_target_s": None if hit is None else float(uploading[hit]),
        # Of float32's round time, what no update size can remove (compute + download).
        "fixed_share": 1.0 - float(uploading[-1] / max(elapsed[-1], 1e-12)),
        "wall_s": result["wall_s"],
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Uplink and time-to-target of each row relative to float32 of the same data/alpha."""
    for row in rows:
        ref = next(
            r
            for r in rows
            if r["policy"] == "float32"
            and (r["dataset"], r["alpha"]) == (row["dataset"], row["alpha"])
        )
        row["uplink_reduction"] = ref["uplink_mb_per_round"] / max(
            row["uplink_mb_per_round"], 1e-12
        )
        for key, out in (
            ("time_to_target_s", "time_speedup"),
            ("upload_time_to_target_s", "upload_speedup"),
        ):
            t, t_ref = row[key], ref[key]
            row[out] = None if t is None or t_ref is None else t_ref / max(t, 1e-12)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    lines = [
        "# Accuracy per uplink bit",
        "",
        f"Settings: {json.dumps(meta)}",
        "",
        "| data | alpha | budgets | policy | final acc | best acc | avg bits | uplink MB "
        "| MB/round | uplink ÷ | target | rounds to target | time to target (s) | speedup "
        "| upload time to target (s) | upload speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['alpha']} | {r['setting']} | {r['policy']} "
            f"| {r['final_acc']:.4f} | {r['best_acc']:.4f} | {r['avg_bits']:.2f} "
            f"| {r['uplink_mb']:.2f} | {r['uplink_mb_per_round']:.3f} "
            f"| {r['uplink_reduction']:.1f}x | {r['target_acc']:.4f} "
            f"| {fmt(r['rounds_to_target'], 'd')} | {fmt(r['time_to_target_s'], '.1f')} "
            f"| {fmt(r['time_speedup'], '.2f')} | {fmt(r['upload_time_to_target_s'], '.1f')} "
            f"| {fmt(r['upload_speedup'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy vs cumulative uplink MB per data/alpha/budgets; FedMPQ/FedLQ bit heat maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for res in results:
        groups.setdefault((res["run"]["dataset"], res["run"]["alpha"]), []).append(res)
    for (dataset, alpha), group in sorted(groups.items()):
        fig, axes = plt.subplots(1, len(BUDGETS), figsize=(12, 4.5), sharey=True)
        for ax, setting in zip(axes, BUDGETS, strict=True):
            for res in group:
                run = res["run"]
                if run["setting"] != setting and run["policy"] != "float32":
                    continue
                hist = res["history"]
                mb = np.cumsum([h["uplink_bytes"] for h in hist]) / 1e6
                ax.plot(mb, [h["accuracy"] for h in hist], marker=".", label=run["policy"])
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_title(f"{dataset}, alpha={alpha}, budgets {setting}")
            ax.set_xlabel("cumulative uplink MB")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy")
        axes[-1].legend()
        fig.tight_layout()
        path = out / f"accuracy_per_bit_{_slug(dataset)}_a{alpha}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        for res in group:
            run = res["run"]
            if run["policy"] in ("fedmpq", "fedlq") and run["setting"] == "hetero":
                written.append(_heatmap(res, out, plt))
    return written


def _heatmap(res: dict[str, Any], out: Path, plt: Any) -> Path:
    run = res["run"]
    rounds = res["history"][1:]
    layers = list(next(iter(rounds[0]["sent_bits"].values())))
    layers = [n for n in layers if n.endswith("weight") and rounds[0]["sent_bits"]]
    clients = sorted(rounds[0]["sent_bits"])
    quantized = [
        n for n in layers if any(h["sent_bits"][c][n] <= 8 for h in rounds for c in clients)
    ]
    fig, axes = plt.subplots(1, len(quantized), figsize=(3.2 * len(quantized), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, quantized, strict=True):
        grid = np.array([[h["sent_bits"].get(c, {}).get(name, 0) for h in rounds] for c in clients])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=8, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(range(len(rounds)), [str(h["round"]) for h in rounds], fontsize=7)
    axes[0].set_yticks(
        range(len(clients)),
        [f"{c[-2:]} (b={b})" for c, b in zip(clients, BUDGETS["hetero"], strict=True)],
        fontsize=7,
    )
    axes[0].set_ylabel("client (budget)")
    fig.colorbar(im, ax=list(axes), label="bits sent")
    fig.suptitle(f"{run['policy']}: per-layer bits sent, {run['dataset']}, alpha={run['alpha']}")
    path = out / f"bits_heatmap_{run['policy']}_{_slug(run['dataset'])}_a{run['alpha']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (mlp, 3 rounds)")
    parser.add_argument("--rounds", type=int, help="rounds per run")
    parser.add_argument("--model", help="model name (default cnn; quick: mlp)")
    parser.add_argument("--alphas", type=float, nargs="+", help="Dirichlet alphas")
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=list(POLICIES))
    parser.add_argument("--fashion-mnist", metavar="DIR", help="full Fashion-MNIST idx files")
    parser.add_argument(
        "--cifar10", metavar="DIR", help="CIFAR-10: binary batches, or train/ test/ class folders"
    )
    parser.add_argument(
        "--observer",
        choices=sorted(OBSERVERS),
        default=OBSERVER_MSE,
        help="how symmetric scales are chosen, for every policy (default mse)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument(
        "--settings", nargs="+", choices=sorted(BUDGETS), default=list(BUDGETS), help="budgets"
    )
    parser.add_argument("--only-dataset", action="store_true", help="skip the shipped data set")
    parser.add_argument("--train-samples", type=int, help="subsample the training split")
    parser.add_argument(
        "--target-frac",
        type=float,
        default=0.95,
        help="target = this x float32 FedAvg's best accuracy (same data, alpha)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    quick = args.quick
    rounds = args.rounds or (3 if quick else 15)
    model = args.model or ("mlp" if quick else "cnn")
    alphas = args.alphas or ([0.5] if quick else [0.5, 0.1])
    samples = args.train_samples if args.train_samples is not None else (3000 if quick else 0)
    datasets = [] if args.only_dataset else ["fashion-mnist-small"]
    if args.fashion_mnist:
        datasets.append(f"idx:{args.fashion_mnist}")
    if args.cifar10:
        binary = (Path(args.cifar10) / "data_batch_1.bin").exists()
        datasets.append(f"{'cifar10-bin' if binary else 'folder'}:{args.cifar10}")
    if not datasets:
        parser.error("--only-dataset needs --fashion-mnist or --cifar10")
    if "float32" not in args.policies:
        parser.error("float32 is the reference of every ratio; keep it in --policies")
    runs = [
        Run(dataset, model, alpha, setting, policy, rounds, args.epochs, samples, args.observer)
        for dataset in datasets
        for alpha in alphas
        for setting in args.settings
        for policy in args.policies
        if not (policy == "float32" and setting != "hetero")  # float32 ignores budgets
    ]
    results = _run_all(runs, args.jobs)
    rows = []
    for res in results:
        run = res["run"]
        ref = next(
            r
            for r in results
            if r["run"]["policy"] == "float32"
            and (r["run"]["dataset"], r["run"]["alpha"]) == (run["dataset"], run["alpha"])
        )
        target = args.target_frac * max(h["accuracy"] for h in ref["history"])
        rows.append(summarise(res, target))
    rows.sort(key=lambda r: (r["dataset"], -r["alpha"], r["setting"], r["policy"]))
    add_ratios(rows)
    meta = {
        "quick": quick,
        "model": model,
        "rounds": rounds,
        "epochs": args.epochs,
        "observer": args.observer,
        "clients": CLIENTS,
        "budgets": BUDGETS,
        "train_samples": samples or "all",
        "target": f"{args.target_frac} x float32 best accuracy",
        "emulated": "10 GFLOPS compute, 10 Mbit/s down, 1 Mbit/s up; round = slowest client",
        "per_channel": True,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "accuracy_per_bit_quick" if quick else "accuracy_per_bit"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "table": rows, "runs": results}, indent=1)
    )
    table = markdown(rows, meta)
    (args.out / f"{stem}.md").write_text(table)
    plots = [] if quick else plot(results, args.out)
    print(table)
    for path in plots:
        print(f"plot: {path}")


def _run_all(runs: list[Run], jobs: int) -> list[dict[str, Any]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    results = []
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("federated runs", total=len(runs))
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(max(jobs, 1)) as pool:
            for res in pool.imap_unordered(run_one, runs):
                run = res["run"]
                progress.console.print(
                    f"{run['dataset']} a={run['alpha']} {run['setting']:8} {run['policy']:7} "
                    f"acc {res['history'][-1]['accuracy']:.4f} ({res['wall_s']:.0f} s)"
                )
                results.append(res)
                progress.advance(task)
    return results


if __name__ == "__main__":
    main()
