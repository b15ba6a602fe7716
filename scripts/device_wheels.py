"""Download the wheels a CPU + CUDA machine lacks to install sparseloom with no package index.

    python scripts/device_wheels.py --python 3.11 --out out/device-wheels      (make device-wheels)

The target (the device machine of issue 14) has PyTorch with CUDA, onnx, onnxruntime (CPU
build) and numpy installed and reaches no package index. So the set carried is this
project's dependencies (pyproject.toml, plus pytest for the GPU tests) and everything they
need, minus what those four packages bring, plus onnx2torch (installed with --no-deps: its
torchvision is not wanted) and setuptools (the build backend, for ``pip install -e .``).
Left out: openvino and apache-tvm (hundreds of MB; the device check skips those
processors), and by default matplotlib with what only it needs (pillow, fonttools,
kiwisolver, contourpy, ...: 23 MiB of the 69 MiB the full set weighs for Python 3.11):
it only draws the plots, which the device check skips (``--with-plots`` carries it). So
the check installs the wheels and the project with ``--no-deps`` and then imports what it
needs. typing_extensions is carried although torch brings one: pydantic needs a
newer one than an older torch install may have, and pip takes it only where needed.

Versions are pinned to the ones installed here (the versions the tests ran with), and
fetched with ``pip download --only-binary=:all: --no-deps --python-version ... --platform
...`` for the target's Python and platforms. ``manifest.json`` in the folder lists every
wheel with its size and the total.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

#: what the target already has (and everything those packages depend on)
PROVIDED = ("torch", "onnx", "onnxruntime", "numpy")
#: optional engines too large to carry; the device check skips their processors
LEFT_OUT = ("openvino", "openvino-telemetry", "apache-tvm", "apache-tvm-ffi")
#: only the plots need it (imported inside the plotting functions); 23 MiB with its deps
PLOTS = ("matplotlib",)
#: carried beyond the closure: see the module docstring
EXTRA = ("onnx2torch", "setuptools", "typing-extensions")
ROOTS_EXTRA = ("pytest",)  # from the dev extra: the device check runs the GPU tests
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: str, env: dict[str, str]) -> list[str]:
    """The names ``dist`` requires on the target (markers evaluated for its Python, no extras)."""
    out = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            out.append(norm(req.name))
    return out


def closure(roots: list[str], env: dict[str, str]) -> set[str]:
    seen: set[str] = set()
    todo = [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += requirements(name, env)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is required but not installed here: install the project first (make venv)") from None
    return seen


def carried_set(python: str, *, plots: bool = False) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({name: version installed here}, why-not lists) for the target's Python version."""
    env = dict(default_environment())
    env.update(python_version=python, python_full_version=f"{python}.0")
    left_out = [*LEFT_OUT, *(() if plots else PLOTS)]
    roots = [r for r in requirements("sparseloom", env) if r not in {norm(n) for n in left_out}]
    wanted = closure(roots + list(ROOTS_EXTRA), env)
    provided = closure(list(PROVIDED), env)
    names = (wanted - provided - {norm(n) for n in left_out}) | {norm(n) for n in EXTRA}
    pins = {n: metadata.version(n) for n in sorted(names)}
    return pins, {"provided_by_target": sorted(wanted & provided), "left_out": left_out}


def download(pins: dict[str, str], out: Path, python: str, platforms: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
           "--python-version", python, "-d", str(out)]  # fmt: skip
    for p in platforms:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in pins.items()]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    ap.add_argument("--python", default=here, help=f"the target's Python, major.minor (default {here}: this one)")
    ap.add_argument("--platform", action="append", help=f"pip platform tag, repeatable (default {list(DEFAULT_PLATFORMS)})")
    ap.add_argument("--out", default="out/device-wheels")
    ap.add_argument("--with-plots", action="store_true", help="carry matplotlib too (+23 MiB)")
    a = ap.parse_args()
    platforms = a.platform or list(DEFAULT_PLATFORMS)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pins, why = carried_set(a.python, plots=a.with_plots)
    stale = [p for p in out.glob("*.whl") if norm(p.name.split("-")[0]) not in pins]
    for p in stale:  # wheels of an earlier set would be installed too: keep exactly this set
        p.unlink()
    download(pins, out, a.python, platforms)
    wheels = sorted(out.glob("*.whl"))
    sizes = {p.name: p.stat().st_size for p in wheels}
    total = sum(sizes.values())
    manifest = {
        "python": a.python, "platforms": platforms, "pins": pins, **why,
        "wheels": sizes, "total_bytes": total, "total_mib": round(total / 2**20, 2),
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "install": "pip install --no-index --find-links <this folder> --no-deps <every wheel>; "
                   "pip install --no-index --find-links <this folder> --no-deps -e .",
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.2f} MiB in {out} (for Python {a.python}, {platforms})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
