"""The device check: on a CPU + CUDA machine, install sparseloom from carried wheels, run the
GPU tests, profile the zoo's blocks on the CPU and the GPU, and run a short serving
benchmark; every result as JSON in one folder.

    make device-check                      # $OUT when set, else out/device-check
    python scripts/device_check.py --wheels out/device-wheels --out out/device-check

Steps (each timed, its status and figures in ``<out>/summary.json``, its details in
``<out>/<step>.json``):

1. ``install`` (with ``--wheels``): a venv that sees the running Python's packages (the
   target's torch with CUDA, onnx, onnxruntime, numpy), the carried wheels and the project
   installed into it with ``pip install --no-index --find-links <wheels> --no-deps``
   (scripts/device_wheels.py made them), then an import check; the check re-runs itself
   in that venv;
2. ``tests``: the GPU tests (``-k "gpu or real or cuda"`` in the files that hold them),
   which skip with their reason where there is no GPU;
3. ``profile``: ``loom profile`` of the embedded zoo (``zoo/``) on profiles/gpu-host.yaml:
   onnxruntime on CPU cores, PyTorch on CUDA;
4. ``fit`` and ``bench``: estimators fitted on that dataset, then ``loom bench`` of
   sparseloom against sv-lo-np and av-p on the same seeded trace.

Without a CUDA GPU it runs the same steps with the GPU processor on the CPU (PyTorch,
``device: cpu``) and says so (``"mode": "cpu"`` in every JSON, and on stdout); the
profile's cores are fitted to the machine's when it has fewer than the profile names.
Not run: the OpenVINO and TVM processors (not carried: hundreds of MB), the "edge zoo"
(it does not exist yet), and the ``ort-plain`` / ``openvino-throughput`` peers of the
benchmark (they do not exist yet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import venv
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "gpu-host.yaml"
POLICIES = ("sparseloom", "sv-lo-np", "av-p")
TEST_FILES = ("tests/test_tensorrt_cuda.py", "tests/test_torch_backend.py", "tests/test_tensorrt.py",
              "tests/test_gpu_host.py")  # fmt: skip
NOT_RUN = {
    "processors": "openvino and tvm: not carried (hundreds of MB); gpu-host.yaml names neither",
    "zoo": "the edge zoo does not exist yet: the embedded zoo (zoo/) is profiled",
    "peers": "ort-plain and openvino-throughput do not exist yet: sparseloom, sv-lo-np, av-p only",
}
LOOM = "import sys; from loom.cli import main; sys.exit(main())"
#: the plots need matplotlib, which the carried wheels leave out by default
NO_PLOTS = (
    "import sys, importlib.util\n"
    "if importlib.util.find_spec('matplotlib') is None:\n"
    "    import loom.serving.plots as p\n"
    "    p.plot_latency_cdf = p.plot_violations_by_policy = p.plot_timeline = lambda *a, **k: None\n"
    "    print('plots skipped: matplotlib is not installed', flush=True)\n"
    "from loom.cli import main; sys.exit(main())\n"
)


def say(text: str) -> None:
    print(f"[device-check] {text}", flush=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command from the repository root: return code, seconds, the output's tail."""
    say("$ " + " ".join(c if len(c) < 80 else c[:77] + "..." for c in cmd))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {timeout:.0f} s)"
        out = out if isinstance(out, str) else out.decode("utf-8", "replace")
    seconds = round(time.perf_counter() - t0, 2)
    tail = out[-4000:]
    if rc:
        say(f"exit {rc} after {seconds} s:\n{tail[-1500:]}")
    return {"cmd": cmd, "rc": rc, "seconds": seconds, "output_tail": tail}


# --- 1. install from carried wheels ----------------------------------------------------------


def parent_site_dirs() -> list[str]:
    """The running Python's package folders (a venv's, or the system's)."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


def install(wheels: Path, where: Path) -> dict[str, Any]:
    """A venv at ``where`` that sees this Python's packages, the wheels and the project in it."""
    t0 = time.perf_counter()
    venv.create(where, system_site_packages=True, with_pip=True, clear=True)
    py = where / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # --system-site-packages reaches the base interpreter's packages only; a .pth file adds
    # the running Python's (a venv's, where the check is started from one), after the venv's own
    Path(site, "_device_check_parent.pth").write_text("\n".join(parent_site_dirs()) + "\n")
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    base = [str(py), "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps",
            "--disable-pip-version-check", "-q"]  # fmt: skip
    steps = [run(base + files, timeout=240), run(base + ["-e", str(ROOT)], timeout=180)]
    # onnx2torch through the backend, which imports it without torchvision where that is unusable
    probe = ("import importlib.metadata as m, scipy, xgboost, pydantic, yaml, psutil, torch, onnx, onnxruntime, "
             "loom.api; from backends import _torch_convert as c; c.require(); print({p: m.version(p) for p in "
             "('torch','onnx','onnxruntime','numpy','scipy','xgboost-cpu','pydantic','onnx2torch','sparseloom')})")  # fmt: skip
    steps.append(run([str(py), "-c", probe], timeout=120))
    manifest = wheels / "manifest.json"
    return {
        "ok": all(s["rc"] == 0 for s in steps), "venv": str(where), "wheels": len(files),
        "wheels_mib": round(sum(Path(f).stat().st_size for f in files) / 2**20, 2),
        "manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
        "parent_site": parent_site_dirs(), "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


# --- facts, and the profile for this machine -------------------------------------------------


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                             "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}  # fmt: skip
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []  # fmt: skip
    except Exception as exc:  # torch missing or broken: CPU mode, and say why
        facts["torch"], facts["gpus"] = f"not usable: {type(exc).__name__}: {exc}", []
    facts["mode"] = "gpu" if facts["gpus"] else "cpu"
    return facts


def profile_for(facts: dict[str, Any], out: Path) -> tuple[Path, list[str]]:
    """profiles/gpu-host.yaml as it runs here, written to ``out``, and every change made to it."""
    import yaml

    data = yaml.safe_load(PROFILE.read_text())
    changes: list[str] = []
    cpus = int(facts["cpus"] or 1)
    procs = {p["name"]: p for p in data["processors"]}
    ort, gpu = procs["cpu-ort"], procs["gpu-torch"]
    if facts["mode"] == "cpu":
        gpu["options"]["device"] = "cpu"
        gpu["kind"] = "cpu"
        gpu.pop("characteristics", None)
        gpu["source"] = "CPU MODE (no CUDA GPU here): PyTorch on the CPU in the GPU processor's place"
        changes.append("gpu-torch: device cuda -> cpu, kind gpu -> cpu, datasheet characteristics dropped (no CUDA GPU)")
    if max(ort["cores"] + gpu["cores"]) >= cpus:
        k = max(1, min(len(ort["cores"]), cpus - 1))
        ort["cores"], ort["options"]["intra_op_threads"] = list(range(k)), k
        gpu["cores"] = [k % cpus]
        changes.append(f"cores fitted to this machine's {cpus}: cpu-ort {ort['cores']} ({k} threads), "
                       f"gpu-torch {gpu['cores']}; the runtime's threads share them")  # fmt: skip
    data["name"] = "gpu-host" if not changes else f"gpu-host-{facts['mode']}-mode"
    path = out / "device-profile.yaml"
    path.write_text(f"# profiles/gpu-host.yaml as run by scripts/device_check.py; changes: {changes}\n"
                    + yaml.safe_dump(data, sort_keys=False))  # fmt: skip
    return path, changes


# --- 2-4. tests, profile, fit, bench --------------------------------------------------------


def run_tests(out: Path) -> dict[str, Any]:
    xml = out / "tests.xml"
    files = [f for f in TEST_FILES if (ROOT / f).is_file()]
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", "gpu or real or cuda",
                  f"--junitxml={xml}", *files], timeout=240)  # fmt: skip
    cases: list[dict[str, Any]] = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status, why = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    status, why = ("skipped" if tag == "skipped" else "failed"), (el.get("message") or "")[:400]
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                          "seconds": float(case.get("time") or 0), "reason": why})  # fmt: skip
        xml.unlink()
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "skipped")}
    return {**result, "ok": result["rc"] == 0, "counts": counts, "cases": cases}


def block_figures(dataset: Path) -> dict[str, Any]:
    """Per task and processor: blocks measured, their median latencies (sum and median)."""
    import csv
    import statistics

    rows = list(csv.DictReader((dataset / "blocks.csv").open()))
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        cell = table.setdefault(r["task"], {}).setdefault(r["processor"], {"ok": 0, "failed": 0, "ms": []})
        if r["status"] == "ok":
            cell["ok"] += 1
            cell["ms"].append(float(r["latency_ms_median"]))
        else:
            cell["failed"] += 1
    for procs in table.values():
        for cell in procs.values():
            ms = cell.pop("ms")
            cell["median_block_ms"] = round(statistics.median(ms), 4) if ms else None
            cell["sum_block_ms"] = round(sum(ms), 3)
    return table


def run_profile(profile: Path, out: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    dataset = work / "dataset"
    result = run([sys.executable, "-c", LOOM, "profile", "--device", str(profile), "--out", str(dataset),
                  "--partitions", a.partitions, "--warmup", str(a.warmup), "--repeats", str(a.repeats),
                  "--config-samples", str(a.config_samples), "--no-resume"], timeout=300)  # fmt: skip
    found = result["rc"] == 0 and (dataset / "blocks.csv").is_file()
    if found:
        meta = json.loads((dataset / "meta.json").read_text())
        result.update(blocks=block_figures(dataset), link_calibration=meta.get("link_calibration"),
                      counts=meta.get("counts"), wall_s_total=meta.get("wall_s_total"))  # fmt: skip
    return {**result, "ok": found, "dataset": str(dataset)}


def run_fit(profile: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    result = run([sys.executable, "-c", LOOM, "fit", "--device", str(profile), "--data", str(work / "dataset"),
                  "--partitions", a.partitions, "--samples", str(a.fit_samples), "--out", str(work / "estimates")],
                 timeout=240)  # fmt: skip
    return {**result, "ok": result["rc"] == 0, "estimates": str(work / "estimates")}


def run_bench(profile: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    config.update(device=str(profile), estimators=str(work / "estimates"), partitions=a.partitions)
    path = work / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-c", NO_PLOTS, "bench", str(path), "--duration", str(a.duration), "--out", str(work / "bench")]
    for p in POLICIES:
        cmd += ["--policy", p]
    result = run(cmd, timeout=60 + 3 * (a.duration + 40))
    report = work / "bench" / "report.json"
    if result["rc"] == 0 and report.is_file():
        result["report"] = json.loads(report.read_text())
    return {**result, "ok": "report" in result, "config": config, "policies": list(POLICIES)}


# --- the whole check ------------------------------------------------------------------------


def figures(steps: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of every step, for summary.json and stdout."""
    out: dict[str, Any] = {}
    if "tests" in steps:
        out["tests"] = steps["tests"].get("counts")
    prof = steps.get("profile", {})
    if prof.get("blocks"):
        out["median_block_ms"] = {t: {p: c["median_block_ms"] for p, c in procs.items()}
                                  for t, procs in prof["blocks"].items()}  # fmt: skip
        out["link_calibration"] = prof.get("link_calibration")
    report = steps.get("bench", {}).get("report")
    if report:
        keys = ("slo_violation_rate", "goodput_rps", "throughput_rps", "p50_ms", "p99_ms", "utilization")
        out["bench"] = {r["policy"]: {k: r.get(k) for k in keys} for r in report["runs"]}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/device-check",
                    help="results folder (default: $OUT when set, else out/device-check)")  # fmt: skip
    ap.add_argument("--wheels", help="install from this folder of wheels (scripts/device_wheels.py) first")
    ap.add_argument("--venv", default="out/device-check-venv", help="where the install goes (kept out of --out)")
    ap.add_argument("--work", default="out/device-check-work", help="dataset, estimates, bench traces and plots")
    ap.add_argument("--partitions", default="out/partitions")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--config-samples", type=int, default=4, help="random placed configs per task")
    ap.add_argument("--fit-samples", type=int, default=10, help="stitched configs measured per task")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of serving per policy")
    ap.add_argument("--skip", action="append", default=[], choices=["tests", "profile", "bench"])
    ap.add_argument("--installed", help=argparse.SUPPRESS)  # the install step's JSON, once re-run in the venv
    return ap.parse_args(argv)


def reexec_in_venv(a: argparse.Namespace, out: Path, started: float) -> None:
    """Install, then run the rest of the check with the venv's Python (never returns on success)."""
    result = install(Path(a.wheels), Path(a.venv).resolve())
    result["started"] = started
    path = out / "install.json"
    write_json(path, result)
    if not result["ok"]:
        say(f"install from {a.wheels} FAILED; see {path}")
        raise SystemExit(1)
    say(f"installed {result['wheels']} wheels ({result['wheels_mib']} MiB) in {result['seconds']} s")
    py = str(Path(a.venv).resolve() / "bin" / "python")
    args = [x for x in sys.argv[1:] if not x.startswith("--wheels")]
    if "--wheels" in sys.argv:  # "--wheels DIR" as two arguments
        i = sys.argv.index("--wheels")
        args = sys.argv[1:i] + sys.argv[i + 2 :]
    os.execv(py, [py, str(Path(__file__).resolve()), *args, "--out", str(out), "--installed", str(path)])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out, work = Path(a.out).resolve(), (ROOT / a.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if a.wheels and not a.installed:
        reexec_in_venv(a, out, started)
    steps: dict[str, Any] = {}
    if a.installed:
        steps["install"] = json.loads(Path(a.installed).read_text())
        started = steps["install"].pop("started", started)
    facts = machine_facts()
    mode_line = ("GPU mode: " + ", ".join(facts["gpus"])) if facts["mode"] == "gpu" else (
        "CPU MODE: no CUDA GPU here; the GPU processor (PyTorch) runs on the CPU, figures are CPU figures")
    say(mode_line)
    profile, changes = profile_for(facts, out)
    plan = [("tests", lambda: run_tests(out)), ("profile", lambda: run_profile(profile, out, work, a)),
            ("fit", lambda: run_fit(profile, work, a)), ("bench", lambda: run_bench(profile, work, a))]  # fmt: skip
    for name, step in plan:
        if name in a.skip or (name == "fit" and "bench" in a.skip):
            continue
        if name in ("fit", "bench") and not steps.get("profile", {}).get("ok", "profile" in a.skip):
            steps[name] = {"ok": False, "skipped": "the profile step failed"}
        else:
            say(f"{name} ...")
            steps[name] = {"mode": facts["mode"], **step()}
        write_json(out / f"{name}.json", steps[name])
    summary = {
        "mode": facts["mode"], "mode_line": mode_line, "machine": facts, "profile": str(profile),
        "profile_changes": changes, "not_run": NOT_RUN, "figures": figures(steps),
        "steps": {k: {"ok": v.get("ok"), "seconds": v.get("seconds")} for k, v in steps.items()},
        "ok": all(v.get("ok") for v in steps.values()), "seconds": round(time.time() - started, 1),
    }  # fmt: skip
    write_json(out / "summary.json", summary)
    say(json.dumps(summary["figures"], indent=1, default=str))
    say(f"{mode_line}\n[device-check] {'OK' if summary['ok'] else 'FAILED'} in {summary['seconds']} s; "
        f"results in {out}")  # fmt: skip
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
