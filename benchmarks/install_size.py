"""Installed size of a device's install: inference-only (``fedmpq``) and training
(``fedmpq[train]`` with torch's CPU build), on this machine and, from the wheels, on aarch64.

Run from the repository root::

    python -m benchmarks.install_size

* this machine: two fresh venvs, ``pip install fedmpq.whl`` and ``pip install torch==VERSION`` +
  ``pip install fedmpq.whl[train]`` (pip's configured indexes; the CPU wheel must be reachable), and
  the size of their ``site-packages``;
* aarch64: ``pip download --no-deps --platform manylinux..._aarch64`` of the same
  distributions, summing wheel sizes and their uncompressed contents (what installing them
  writes, bar ``.pyc`` files).  Where the CPU index cannot be reached the torch wheel comes
  from PyPI: its CUDA library is reported separately.

Prints a table and writes ``benchmarks/results/install_size.json``.  Needs network or local
mirrors for the wheels; takes a few minutes (torch is ~0.5 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "install_size.json"
AARCH64 = [
    "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
    "--platform", "manylinux2014_aarch64", "--only-binary=:all:", "--implementation", "cp",
]  # fmt: skip
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _wheel(tmp: Path) -> Path:
    """The project as a wheel, built from a copy (a build in place leaves ``build/`` and
    ``fedmpq.egg-info`` in the checkout, which then shadow real installs)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "fedmpq", "edge_client", "coordinator"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(tmp / "dist"), str(src)],
        check=True,
    )  # fmt: skip
    (built,) = (tmp / "dist").glob("fedmpq-*.whl")
    return built


def _venv_site_packages(tmp: Path, name: str, *installs: list[str]) -> dict[str, Any]:
    root = tmp / name
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    for args in installs:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True)
    (site,) = root.glob("lib/python*/site-packages")
    parts = {p.name: _tree_bytes(p) if p.is_dir() else p.stat().st_size for p in site.iterdir()}
    top = dict(sorted(parts.items(), key=lambda kv: -kv[1])[:6])
    return {"site_packages_bytes": _tree_bytes(site), "largest": top}


def _wheels(tmp: Path, name: str, requirements: list[str], extra: list[str]) -> dict[str, Any]:
    dest = tmp / name
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *AARCH64,
         "--python-version", py, "-d", str(dest), *extra, *requirements],
        check=True,
    )  # fmt: skip
    rows = {}
    for wheel in sorted(dest.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            unpacked = sum(i.file_size for i in z.infolist())
            cuda = sum(i.file_size for i in z.infolist() if "cuda" in Path(i.filename).name)
        rows[wheel.name] = {"wheel": wheel.stat().st_size, "installed": unpacked, "cuda": cuda}
    return rows


def _installed_requirements(python: Path) -> list[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    skip = ("pip==", "setuptools==", "fedmpq==")
    return [line for line in out.stdout.split() if not line.startswith(skip)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--torch", default="2.13.0", help="torch version")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedmpq-size-") as raw:
        tmp = Path(raw)
        wheel = _wheel(tmp)
        here = {
            "inference": _venv_site_packages(tmp, "inference", [str(wheel)]),
            "train": _venv_site_packages(
                tmp, "train", [f"torch=={args.torch}"], [f"{wheel}[train]"]
            ),
        }
        inference_reqs = _installed_requirements(tmp / "inference" / "bin" / "python")
        train_reqs = _installed_requirements(tmp / "train" / "bin" / "python")
        aarch64 = {"inference": _wheels(tmp, "a-inf", inference_reqs, [])}
        torch_reqs = [r for r in train_reqs if r not in inference_reqs]
        try:
            aarch64["train"] = _wheels(
                tmp,
                "a-cpu",
                torch_reqs,
                ["--index-url", CPU_INDEX, "--timeout", "20", "--retries", "1"],
            )
            aarch64["torch_source"] = CPU_INDEX  # type: ignore[assignment]
        except subprocess.CalledProcessError:
            plain = [r.split("+")[0] for r in torch_reqs]
            aarch64["train"] = _wheels(tmp, "a-pypi", plain, [])
            aarch64["torch_source"] = "configured indexes (CPU index unreachable)"  # type: ignore[assignment]
    mb = 1e6
    print(f"{sys.platform} {Path('/proc/sys/kernel/arch').read_text().strip()}: site-packages")
    for kind, row in here.items():
        print(f"  {kind:10s} {row['site_packages_bytes'] / mb:8.0f} MB  largest: "
              + ", ".join(f"{k} {v / mb:.0f}" for k, v in row["largest"].items()))  # fmt: skip
    print(f"aarch64 wheels (torch from {aarch64['torch_source']}):")
    for kind in ("inference", "train"):
        rows = aarch64[kind].values()
        print(f"  {kind:10s} download {sum(r['wheel'] for r in rows) / mb:6.0f} MB, "
              f"installed {sum(r['installed'] for r in rows) / mb:6.0f} MB, "
              f"of which CUDA libraries {sum(r['cuda'] for r in rows) / mb:.0f} MB")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"this_machine": here, "aarch64": aarch64}, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
