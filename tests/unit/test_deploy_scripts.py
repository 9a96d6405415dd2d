"""The deployment scripts and units: syntax, shellcheck, systemd-analyze, and an installer
run into a temporary prefix with a fake systemctl (nothing on the system is touched)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedmpq.keys_cli import main as keys_main
from fedmpq.wire.signing import load_key_file

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def test_scripts_exist_and_are_executable():
    assert {p.name for p in SCRIPTS} >= {"install-agent.sh", "make-credentials.sh"}
    assert all(p.stat().st_mode & stat.S_IXUSR for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project as a wheel, built from a copy so the checkout gets no build/ directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "fedmpq", "edge_client", "coordinator"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    for extra in ("README.md", "LICENSE"):
        if (ROOT / extra).exists():
            shutil.copy(ROOT / extra, src / extra)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (built,) = (tmp / "dist").glob("fedmpq-*.whl")
    return built


@pytest.fixture(scope="module")
def install(tmp_path_factory, wheel):
    """Run install-agent.sh into a temporary prefix; systemctl is a fake that logs calls."""
    tmp = tmp_path_factory.mktemp("install")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "systemctl.log"}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    base = [
        "bash", str(DEPLOY / "install-agent.sh"),
        "--prefix", str(tmp / "opt"), "--config-dir", str(tmp / "etc"),
        "--state-dir", str(tmp / "var"), "--unit-dir", str(tmp / "units"),
        "--user", user, "--system-site-packages", "--pip-args", "--no-deps",
        "--source", str(wheel),
    ]  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True)

    url = "mqtt://pi-01:secret@broker.lan:1883"
    keyless = run("--broker", url, "--client-id", "pi-01")
    assert keyless.returncode == 2 and "--keys-file" in keyless.stderr  # keys are the default
    assert keys_main(["--out", str(tmp / "keys.toml"), "--device-dir", str(tmp), "pi-01"]) == 0
    first = run("--broker", url, "--client-id", "pi-01", "--keys-file", str(tmp / "pi-01.toml"))
    assert first.returncode == 0, first.stderr
    return tmp, run


def test_installer_writes_venv_config_and_unit(install):
    tmp, _ = install
    fedmpq = tmp / "opt" / "venv" / "bin" / "fedmpq"
    out = subprocess.run([str(fedmpq), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fedmpq ")
    config = tmp / "etc" / "agent.env"
    assert "FEDMPQ_BROKER=mqtt://pi-01:secret@broker.lan:1883" in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640  # the password is not world-readable
    keys = tmp / "etc" / "keys.toml"
    assert f"FEDMPQ_KEYS={keys}" in config.read_text()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o640
    unit = (tmp / "units" / "fedmpq-agent.service").read_text()
    assert f"ExecStart={fedmpq} agent" in unit
    assert "Restart=on-failure" in unit
    assert f"EnvironmentFile={config}" in unit
    calls = (tmp / "systemctl.log").read_text().splitlines()
    assert calls == ["daemon-reload", "enable fedmpq-agent.service", "restart fedmpq-agent.service"]


def test_installer_is_idempotent_and_keeps_the_config(install):
    tmp, run = install
    again = run()  # no broker/client id: taken from the existing agent.env
    assert again.returncode == 0, again.stderr
    assert "FEDMPQ_CLIENT_ID=pi-01" in (tmp / "etc" / "agent.env").read_text()
    missing = subprocess.run(
        ["bash", str(DEPLOY / "install-agent.sh"), "--no-systemd", "--prefix", str(tmp / "x"),
         "--config-dir", str(tmp / "empty")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2 and "--broker" in missing.stderr


def test_installed_unit_passes_systemd_analyze(install):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not available on this machine")
    tmp, _ = install
    unit = tmp / "units" / "fedmpq-agent.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_shipped_units_pass_systemd_analyze(tmp_path):
    """The shipped units, with ExecStart pointed at an executable that exists here."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not available on this machine")
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/fedmpq/venv/bin/fedmpq", "/bin/true"))
        result = subprocess.run(
            ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{unit.name}: {result.stderr}"


def test_uninstall_removes_service_and_venv(install):
    tmp, run = install
    result = run("--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert not (tmp / "units" / "fedmpq-agent.service").exists()
    assert not (tmp / "opt" / "venv").exists()
    assert not (tmp / "etc" / "agent.env").exists()
    assert not (tmp / "etc" / "keys.toml").exists()
    assert "disable --now fedmpq-agent.service" in (tmp / "systemctl.log").read_text()


def _fake_uname(tmp: Path, machine: str) -> dict[str, str]:
    """An environment whose ``uname -m`` says ``machine`` (the installer's only arch probe)."""
    bin_dir = tmp / f"bin-{machine}"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "uname").write_text(
        f'#!/bin/sh\n[ "$1" = -m ] && echo {machine} || /bin/uname "$@"\n'
    )
    (bin_dir / "uname").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _dry_run(tmp: Path, machine: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY / "install-agent.sh"), "--dry-run", "--source", "/src", *args],
        env=_fake_uname(tmp, machine), capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("machine", ["aarch64", "x86_64"])
def test_training_install_takes_torch_from_the_cpu_index(tmp_path, machine):
    run = _dry_run(tmp_path, machine)
    assert run.returncode == 0, run.stderr
    torch_line, package_line = run.stdout.splitlines()
    assert torch_line.endswith(
        f"{machine}: pip install  --index-url https://download.pytorch.org/whl/cpu torch"
    )
    assert package_line.endswith("pip install  /src[train]")


def test_armv7_needs_a_torch_wheel_or_inference_only(tmp_path):
    refused = _dry_run(tmp_path, "armv7l")
    assert refused.returncode == 2 and "--torch-wheel" in refused.stderr
    wheel = _dry_run(tmp_path, "armv7l", "--torch-wheel", "/w/torch-2.1-cp311-linux_armv7l.whl")
    assert wheel.stdout.splitlines()[0].endswith("pip install  /w/torch-2.1-cp311-linux_armv7l.whl")
    inference = _dry_run(tmp_path, "armv7l", "--inference-only")
    assert inference.returncode == 0 and inference.stdout.splitlines() == [
        "install-agent.sh: armv7l: pip install  /src"
    ]


def _stub_torch_index(root: Path) -> Path:
    """A PEP 503 file index holding one stub wheel, torch 2.13.0+cpu (as the CPU index names
    its builds), so the installer's pip command runs for real without a network."""
    wheel = root / "torch" / "torch-2.13.0+cpu-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    dist = "torch-2.13.0+cpu.dist-info"
    files = {
        "torch/__init__.py": "__version__ = '2.13.0+cpu'\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]))
    (wheel.parent / "index.html").write_text(
        '<html><body><a href="torch-2.13.0%2Bcpu-py3-none-any.whl">torch</a></body></html>'
    )
    return root


def _installed(venv: Path) -> dict[str, str]:
    """Distribution name -> version of what a venv holds."""
    (site,) = venv.glob("lib/python*/site-packages")
    return {
        d.name.split("-")[0].lower(): d.name[: -len(".dist-info")].split("-")[1]
        for d in site.glob("*.dist-info")
    }


@pytest.mark.parametrize("inference_only", [False, True], ids=["train", "inference-only"])
def test_aarch64_install_against_a_local_cpu_index(tmp_path, wheel, inference_only):
    env = _fake_uname(tmp_path, "aarch64")
    (tmp_path / "bin-aarch64" / "systemctl").write_text("#!/bin/sh\n")
    (tmp_path / "bin-aarch64" / "systemctl").chmod(0o755)
    index = _stub_torch_index(tmp_path / "index")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    run = subprocess.run(
        ["bash", str(DEPLOY / "install-agent.sh"),
         "--prefix", str(tmp_path / "opt"), "--config-dir", str(tmp_path / "etc"),
         "--state-dir", str(tmp_path / "var"), "--unit-dir", str(tmp_path / "units"),
         "--user", user, "--pip-args", "--no-deps", "--source", str(wheel),
         "--torch-index", index.as_uri(), "--broker", "mqtts://pi:pw@broker:8883",
         "--client-id", "pi", "--no-keys", *(["--inference-only"] if inference_only else [])],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    installed = _installed(tmp_path / "opt" / "venv")
    assert installed["fedmpq"] == "0.1.0"
    if inference_only:
        assert "torch" not in installed
        assert "fetch-model" in run.stdout
        assert not (tmp_path / "units" / "fedmpq-agent.service").exists()
    else:
        assert installed["torch"] == "2.13.0+cpu"  # from the CPU index, kept by fedmpq[train]
        assert f"--index-url {index.as_uri()} torch" in run.stdout
        assert (tmp_path / "units" / "fedmpq-agent.service").exists()


def test_wheel_needs_torch_only_for_training(wheel):
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in z.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    torch_lines = [r for r in requires if r.startswith("torch")]
    assert torch_lines and all('extra == "train"' in r for r in torch_lines)
    assert any(r.startswith("onnxruntime") and "extra" not in r for r in requires)


def test_make_credentials(tmp_path):
    if shutil.which("mosquitto_passwd") is None or shutil.which("openssl") is None:
        pytest.skip("needs openssl and mosquitto_passwd")
    out = tmp_path / "creds"
    script = str(DEPLOY / "make-credentials.sh")
    subprocess.run(["bash", script, "--out", str(out), "dev-1", "dev-2"], check=True)
    users = [line.split(":")[0] for line in (out / "fedmpq.passwd").read_text().splitlines()]
    assert users == ["coordinator", "dev-1", "dev-2"]
    coordinator = load_key_file(out / "keys" / "coordinator.toml")
    device = load_key_file(out / "keys" / "devices" / "dev-2.toml")
    assert sorted(coordinator.keys) == ["dev-1", "dev-2"] and coordinator.coordinator_private
    assert device.keys == {"dev-2": coordinator.keys["dev-2"]}
    assert device.coordinator_public == coordinator.coordinator_public
    assert stat.S_IMODE((out / "passwords" / "dev-1").stat().st_mode) == 0o600
    subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    password = (out / "passwords" / "dev-1").read_text()
    subprocess.run(["bash", script, "--out", str(out), "dev-3"], check=True)  # adds, keeps
    assert (out / "passwords" / "dev-1").read_text() == password
    assert "dev-3" in (out / "fedmpq.passwd").read_text()
    bad = subprocess.run(["bash", script, "--out", str(out), "a/b"], capture_output=True)
    assert bad.returncode == 2
