"""The Dockerfile against the code: the gateway image installs only the serving set (no torch), the
GPU target swaps in the GPU wheel, runs as non-root on the gateway's port and probe, copies every package."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml
from deploy_checks import app_routes, check_env, default_port
from kustomize_lite import REPO

pytestmark = pytest.mark.quick

DOCKERFILE = REPO / "Dockerfile"


def dockerfile_stages(text: str) -> list[dict]:
    """[{name, base, instrs: [(INSTR, args)]}], continuation lines joined, ARG defaults applied."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args: dict[str, str] = {}
    stages: list[dict] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), parts[0])
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            stages.append({"name": name, "base": base, "instrs": []})
        elif stages:
            stages[-1]["instrs"].append((instr, rest.strip()))
    return stages


def ancestry(stages: list[dict], name: str) -> list[dict]:
    """The stage and every stage it builds on (FROM) or copies from (COPY --from)."""
    by_name = {s["name"]: s for s in stages}
    seen: list[str] = []

    def visit(n: str) -> None:
        if n in seen or n not in by_name:
            return
        seen.append(n)
        s = by_name[n]
        visit(s["base"])
        for instr, rest in s["instrs"]:
            m = re.search(r"--from=(\S+)", rest) if instr == "COPY" else None
            if m:
                visit(m.group(1))

    visit(name)
    return [by_name[n] for n in seen]


def env_of(stage_chain: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for s in stage_chain:
        for instr, rest in s["instrs"]:
            if instr == "ENV":
                for tok in shlex.split(rest):
                    k, _, v = tok.partition("=")
                    env[k] = v
    return env


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(DOCKERFILE.read_text())


def pip_installs(chain: list[dict]) -> list[list[str]]:
    """The package arguments of every ``pip install`` along a chain of stages."""
    return [args for stage in chain for verb, args, _ in pip_commands(stage) if verb == "install"]


def test_dockerfile_gateway_installs_only_the_serving_dependencies(stages: list[dict]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base, "pyproject's base dependencies (the serving set) must not include torch"
    final = stages[-1]
    assert final["name"] == "gateway", "the gateway must be the last (default) build target"
    installs = pip_installs(ancestry(stages, "gateway"))
    assert installs, "the gateway image installs nothing with pip?"
    for specs in installs:
        assert specs == ["."], f"the gateway image must `pip install .` without extras, found {specs}"
    # the load-test image adds exactly the `load` extra, itself free of torch
    for specs in pip_installs(ancestry(stages, "loadtest")):
        for spec in specs:
            for extra in re.findall(r"\[([^\]]+)\]", spec):
                for e in extra.split(","):
                    assert "torch" not in " ".join(project["optional-dependencies"][e.strip()]).lower()


def pip_commands(stage: dict) -> list[tuple[str, list[str], list[str]]]:
    """(verb, arguments, options) of every ``pip install|uninstall`` in one stage's RUN lines, in order."""
    out = []
    for instr, rest in stage["instrs"]:
        if instr != "RUN":
            continue
        cmd: list[str] = []
        for tok in [*shlex.split(rest), "&&"]:
            if tok not in ("&&", ";", "||"):
                cmd.append(tok)
                continue
            if len(cmd) > 1 and cmd[0].endswith("pip") and cmd[1] in ("install", "uninstall"):
                out.append((cmd[1], [t for t in cmd[2:] if not t.startswith("-")],
                            [t for t in cmd[2:] if t.startswith("-")]))
            cmd = []
    return out


def test_dockerfile_gpu_target_swaps_onnxruntime_for_the_gpu_wheel(stages: list[dict]) -> None:
    """`gateway-gpu`: the `gpu` extra installed, then both ONNX Runtime wheels removed and the GPU
    wheel put back alone at the extra's pin (both own the package `onnxruntime`); otherwise the
    gateway image, with CTRSERVE_BACKEND_PROVIDER=cuda. The test environment never gets the extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [spec] = project["optional-dependencies"]["gpu"]
    m = re.fullmatch(r"onnxruntime-gpu(\[[a-z,]+\])?==([0-9.]+)", spec)
    assert m, f"the gpu extra must pin onnxruntime-gpu exactly, found {spec!r}"
    assert any(d.startswith("onnxruntime==") for d in project["dependencies"]), "the base set pins the CPU wheel"
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert "gpu" not in re.findall(r"\[([^\]]+)\]", dev)[0].split(","), "dev must not pull onnxruntime-gpu"
    by_name = {s["name"]: s for s in stages}
    assert {"build-gpu", "gateway-gpu"} <= set(by_name) and stages[-1]["name"] == "gateway"
    assert by_name["build-gpu"]["base"] == "build", "build-gpu starts from the serving set"
    cmds = pip_commands(by_name["build-gpu"])
    assert cmds[0][:2] == ("install", [".[gpu]"]), cmds
    last_uninstall = max(i for i, c in enumerate(cmds) if c[0] == "uninstall")
    assert {"onnxruntime", "onnxruntime-gpu"} <= set(cmds[last_uninstall][1]), cmds
    assert "-y" in cmds[last_uninstall][2]
    assert cmds[last_uninstall + 1:] == [("install", [f"onnxruntime-gpu=={m.group(2)}"], ["--no-deps"])], \
        f"after removing both wheels only the GPU wheel at the extra's pin {m.group(2)} goes back: {cmds}"
    checks = " ".join(rest for instr, rest in by_name["build-gpu"]["instrs"] if instr == "RUN")
    assert "CUDAExecutionProvider" in checks and "'onnxruntime'" in checks, "the build checks what it installed"
    gpu = by_name["gateway-gpu"]
    copies = [rest for instr, rest in gpu["instrs"] if instr == "COPY"]
    assert copies == ["--from=build-gpu /opt/venv /opt/venv"], copies
    env_gpu, env_cpu = env_of(ancestry(stages, "gateway-gpu")), env_of(ancestry(stages, "gateway"))
    assert env_gpu.pop("CTRSERVE_BACKEND_PROVIDER") == "cuda" and "CTRSERVE_BACKEND_PROVIDER" not in env_cpu
    assert {k: v for k, v in env_gpu.items() if not k.startswith("NVIDIA_")} == env_cpu
    check_env(env_of(ancestry(stages, "gateway-gpu")), "Dockerfile ENV (gateway-gpu)")
    same = ("USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT")
    assert [i for i in gpu["instrs"] if i[0] in same] == [i for i in stages[-1]["instrs"] if i[0] in same]


def test_dockerfile_runs_as_non_root_and_serves(stages: list[dict]) -> None:
    from ctrserve.cli import app as cli_app

    final = stages[-1]
    instrs = final["instrs"]
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users, "the gateway stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    entry = [yaml.safe_load(rest) for instr, rest in instrs if instr == "ENTRYPOINT"][-1]
    assert entry[:2] == ["ctrserve", "serve"]
    assert "serve" in {c.name or c.callback.__name__ for c in cli_app.registered_commands}
    env = env_of(ancestry(stages, "gateway"))
    settings = check_env(env, "Dockerfile ENV")
    from ctrserve.service.settings import ServerSettings

    port = settings[ServerSettings].port
    assert port == default_port(), "the image moves the gateway off its default port"
    assert settings[ServerSettings].host == "0.0.0.0", "inside a container the gateway must bind 0.0.0.0"
    exposed = [int(p.split("/")[0]) for instr, rest in instrs if instr == "EXPOSE" for p in rest.split()]
    assert exposed == [port], f"EXPOSE {exposed} but the gateway listens on {port}"
    health = " ".join(rest for instr, rest in instrs if instr == "HEALTHCHECK")
    paths = re.findall(r"(/[a-z]+)'?, timeout", health) or re.findall(r"'(/\w+)'", health)
    assert paths == ["/healthz"] and "/healthz" in app_routes(), f"HEALTHCHECK must probe /healthz: {health}"
    assert "CTRSERVE_SERVER_PORT" in health and "urllib" in health and "curl" not in health


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them(stages: list[dict]) -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied: set[str] = set()
    for s in ancestry(stages, "gateway"):
        for instr, rest in s["instrs"]:
            if instr == "COPY" and "--from" not in rest:
                copied.update(rest.split()[:-1])
    needed = set(tool["package-dir"].values()) | {"pyproject.toml", "README.md"}
    assert needed <= copied, f"the build stage does not copy {sorted(needed - copied)} (pip install . needs them)"
    ignored = [ln.strip().rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for must in (".venv", "work", ".git", "tests"):
        assert must in ignored, f".dockerignore must exclude {must}"
    assert not needed & set(ignored), f".dockerignore excludes what the build copies: {needed & set(ignored)}"


def test_serving_entry_point_imports_without_torch() -> None:
    """What the image runs, in a process where the training-only packages cannot be imported."""
    blocked = ["torch", "pandas", "sklearn", "matplotlib", "onnx", "onnxscript", "pytriton", "locust"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "from typer.testing import CliRunner\nfrom ctrserve.cli import app\n"
            "r = CliRunner().invoke(app, ['serve', '--help'])\n"
            "assert r.exit_code == 0, r.output\nimport ctrserve.service.app\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"`ctrserve serve` needs a training-only package:\n{res.stderr[-2000:]}"
