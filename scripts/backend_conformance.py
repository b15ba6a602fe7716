"""ONNX's own node test cases through each backend wrapper and through its engine called
directly: does the wrapper lose anything its engine can do?

    python scripts/backend_conformance.py --out out/conformance.json \
        [--backends onnxruntime openvino tvm torch] [--sample N] [--seed S] [--timeout 60]

Each case (``onnx.backend.test.case.node.collect_testcases()``: a small model, its inputs
and expected outputs) is loaded and run through ``backends.get_backend(name)`` and through
the engine itself (onnxruntime.InferenceSession; OpenVINO ``Core().compile_model``; TVM
Relax ``from_onnx`` + ``tvm.compile``; ``onnx2torch.convert``), and both are compared with
the expected outputs at the case's tolerance, as onnx's runner does. Outcomes: ``pass``,
``refused`` (a typed ``UnsupportedOpsError``), ``error`` (another typed error),
``mismatch``, ``crash`` (an untyped exception, or the process died) and ``timeout``.
A *wrapper loss* is a case the engine passes and the wrapper does not; ``unsupported_ops``
must also answer (a list) on every case. The exit status is 1 when there is a loss, a
wrapper crash or an ``unsupported_ops`` that raised.

Cases run in worker subprocesses (one per backend, restarted after a crash or timeout),
so an engine that aborts the process costs one case, not the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import select
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnxruntime", "openvino", "tvm", "torch")
OUTCOMES = ("pass", "refused", "error", "mismatch", "crash", "timeout")
#: each wrapper as the conformance run configures it (the defaults, on the CPU)
OPTIONS: dict[str, dict[str, Any]] = {
    "onnxruntime": {},
    "openvino": {"device": "CPU", "precision": "f32"},
    "tvm": {"cache": False},
    "torch": {"device": "cpu"},
}


# --- the cases ----------------------------------------------------------------------


def collect_cases() -> list[Any]:
    """Every node test case onnx ships (its generators warn about overflows on purpose)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases(None) if c.kind == "node" and c.model is not None]


def sample_cases(cases: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """A fixed, seeded sample of ``n`` cases (all of them when ``n`` is None), in name order."""
    chosen = list(cases)
    if n is not None and n < len(chosen):
        chosen = random.Random(seed).sample(chosen, n)
    return sorted(chosen, key=lambda c: c.name)


def feeds_of(case: Any) -> dict[str, Any]:
    """The first data set's inputs, by graph input name (position, as onnx's runner maps them)."""
    inputs, _ = case.data_sets[0]
    constants = {t.name for t in case.model.graph.initializer}
    names = [i.name for i in case.model.graph.input if i.name not in constants]
    return dict(zip(names, (_value(v) for v in inputs), strict=False))


def expected_of(case: Any) -> list[Any]:
    return [_value(v) for v in case.data_sets[0][1]]


def _value(value: Any) -> Any:
    """A data set entry as numpy (cases of types numpy lacks keep them as TensorProto)."""
    import onnx
    from onnx import numpy_helper

    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):  # a numpy scalar: engines take 0-d arrays
        return np.asarray(value)
    return value


def compare(expected: Sequence[Any], got: Sequence[Any], rtol: float, atol: float) -> str | None:
    """None when ``got`` matches (onnx runner's ``assert_similar_outputs``), else why not."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (ref, out) in enumerate(zip(expected, got, strict=True)):
        if isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
            if not isinstance(out, (list, tuple)) or not isinstance(ref, (list, tuple)):
                return f"output {i}: {type(out).__name__}, expected {type(ref).__name__}"
            why = compare(list(ref), list(out), rtol, atol)
            if why:
                return f"output {i}: {why}"
            continue
        if ref is None or out is None:
            if ref is not out:
                return f"output {i}: {out!r:.40}, expected {ref!r:.40}"
            continue
        why = _compare_array(np.asarray(ref), np.asarray(out), rtol, atol)
        if why:
            return f"output {i}: {why}"
    return None


def _compare_array(ref: np.ndarray, out: np.ndarray, rtol: float, atol: float) -> str | None:
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if ref.dtype == object:
        return None if np.array_equal(out, ref) else "string values differ"
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype}, expected {ref.dtype}"
    if ref.dtype.kind not in "biufc?":  # ml_dtypes (bfloat16, float8, float4, int4)
        rtol = max(rtol, 2**-6) if ref.dtype.name == "bfloat16" else rtol
        ref, out = ref.astype(np.float32), out.astype(np.float32)
    try:
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)
    except AssertionError as exc:
        lines = [ln for ln in str(exc).splitlines() if "Mismatched" in ln or "Max abs" in ln]
        return "values differ: " + "; ".join(ln.strip() for ln in lines)[:200]
    return None


# --- one case, in a worker ----------------------------------------------------------


def _outcome(exc: BaseException) -> str:
    from loom.core.errors import LoomError, UnsupportedOpsError

    if isinstance(exc, UnsupportedOpsError):
        return "refused"
    return "error" if isinstance(exc, LoomError) else "crash"


def attempt(fn: Any, expected: Sequence[Any], rtol: float, atol: float, *, engine: bool = False) -> dict[str, Any]:
    """Run ``fn() -> outputs`` and sort what happened. An engine's failures are all errors."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            got = fn()
    except Exception as exc:
        kind = "error" if engine else _outcome(exc)
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        return {"outcome": kind, "detail": detail, "seconds": round(time.perf_counter() - t0, 4)}
    why = compare(expected, got, rtol, atol)
    result = {"outcome": "mismatch" if why else "pass", "seconds": round(time.perf_counter() - t0, 4)}
    if why:
        result["detail"] = why
    return result


class Worker:
    """One backend's wrapper and engine in this process."""

    def __init__(self, backend: str) -> None:
        from backends import get_backend

        self.name = backend
        self.backend = get_backend(backend, **OPTIONS[backend])
        self.engine = ENGINES[backend]

    def wrapper_run(self, case: Any) -> list[Any]:
        block = self.backend.load(case.model, block_id=case.name)
        try:
            out = self.backend.run(block, feeds_of(case))
        finally:
            self.backend.release(block)
        return [out[o.name] for o in case.model.graph.output]

    def unsupported(self, case: Any) -> dict[str, Any]:
        try:
            ops = self.backend.unsupported_ops(case.model)
        except Exception as exc:
            return {"raised": f"{type(exc).__name__}: {exc}"[:300]}
        return {"ops": list(ops)} if ops else {}

    def case(self, case: Any) -> dict[str, Any]:
        expected = expected_of(case)
        wrapper = attempt(lambda: self.wrapper_run(case), expected, case.rtol, case.atol)
        wrapper.update(self.unsupported(case))
        emit({"start": case.name, "stage": "engine", "wrapper": wrapper})
        engine = attempt(lambda: self.engine(case), expected, case.rtol, case.atol, engine=True)
        return {"case": case.name, "op": op_of(case), "wrapper": wrapper, "engine": engine}


def op_of(case: Any) -> str:
    ops = [n.op_type for n in case.model.graph.node]
    return ops[0] if len(set(ops)) == 1 else (ops[-1] if ops else "?")


# --- the engines, called directly ---------------------------------------------------


def engine_ort(case: Any) -> list[Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds_of(case))


def engine_openvino(case: Any) -> list[Any]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model=case.model.SerializeToString(), weights=b"")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = feeds_of(case)
    inputs = {}  # the inputs the engine kept, by any of their names, the others in order
    named = {i: n for i, p in enumerate(compiled.inputs) for n in p.get_names() if n in feeds}
    rest = [n for n in feeds if n not in named.values()]
    for i, port in enumerate(compiled.inputs):
        inputs[port] = feeds[named[i] if i in named else rest.pop(0)]
    request = compiled.create_infer_request()
    result = request.infer(inputs, share_outputs=False)
    outs = []
    for i, out in enumerate(case.model.graph.output):
        port = next((p for p in compiled.outputs if out.name in p.get_names()), compiled.outputs[i])
        outs.append(_bits(np.asarray(result[port]), out, list(request.get_tensor(port).shape)))
    return outs


def _bits(arr: np.ndarray, value_info: Any, shape: list[int]) -> np.ndarray:
    """An engine's bit container (float16 for bf16, uint8 for float8, packed 4-bit) read as
    the declared type, as any caller of the engine has to."""
    import onnx

    from backends.base import as_declared

    want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))
    return as_declared(arr, want, shape)


def engine_tvm(case: Any) -> list[Any]:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(case.model, keep_params_in_input=False)
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.asarray(v), tvm.cpu()) for v in feeds_of(case).values()]
    result = vm["main"](*args)
    leaf = hasattr(result, "numpy") or type(result).__name__ == "Shape"  # R.Shape: a tuple of ints
    values = [result] if leaf else list(result)
    return [v.numpy() if hasattr(v, "numpy") else np.asarray(v, dtype=np.int64) for v in values]


def engine_torch(case: Any) -> list[Any]:
    from backends import _torch_convert as conv

    torch, onnx2torch = conv.require()
    module = onnx2torch.convert(case.model)
    args = [torch.from_numpy(np.array(v)) for v in feeds_of(case).values()]
    with torch.inference_mode():
        result = module(*args)
    values = result if isinstance(result, (list, tuple)) else [result]
    return [v.detach().numpy() if hasattr(v, "detach") else np.asarray(v) for v in values]


ENGINES = {"onnxruntime": engine_ort, "openvino": engine_openvino, "tvm": engine_tvm, "torch": engine_torch}


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main(backend: str, cases_file: str) -> int:
    """Read case names on stdin, one a line; print a start line and a result line for each."""
    sys.path.insert(0, str(ROOT))
    with open(cases_file, "rb") as f:
        cases = {c.name: c for c in pickle.load(f)}
    worker = Worker(backend)
    emit({"ready": backend})
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        emit({"start": name, "stage": "wrapper"})
        emit(worker.case(cases[name]))
    return 0


# --- the parent: workers, time-boxes, the report --------------------------------------


class _Child:
    """A worker subprocess fed one case at a time, with a deadline per case."""

    def __init__(self, backend: str, cases_file: str) -> None:
        cmd = [sys.executable, "-u", __file__, "--worker", backend, "--cases-file", cases_file]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=ROOT, bufsize=0, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        self.buffer = b""

    def read(self, deadline: float) -> dict[str, Any] | None:
        """The next message; None when the worker died or the deadline passed.

        Lines are split here from raw reads: a buffered reader may hold a line that
        ``select`` cannot see.
        """
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    return json.loads(line)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(5)


def _lost(name: str, op: str, stage: str, outcome: str, wrapper: dict[str, Any] | None) -> dict[str, Any]:
    """The record of a case whose worker died or ran out of time in ``stage``."""
    failed = {"outcome": outcome, "detail": f"the worker process: {outcome} in the {stage} stage"}
    if stage == "wrapper":
        skipped = {"outcome": "error", "detail": f"not run: the wrapper stage ended in a {outcome}"}
        return {"case": name, "op": op, "wrapper": failed, "engine": skipped}
    return {"case": name, "op": op, "wrapper": wrapper or {"outcome": "unknown"}, "engine": failed}


def run_backend(backend: str, cases: Sequence[Any], cases_file: str, timeout: float) -> list[dict[str, Any]]:
    """Every case through one backend, restarting the worker after a crash or timeout."""
    records: list[dict[str, Any]] = []
    child: _Child | None = None
    for case in cases:
        if child is None:
            child = _Child(backend, cases_file)
            ready = child.read(time.monotonic() + 120)
            if not ready or "ready" not in ready:
                child.kill()
                raise RuntimeError(f"{backend}: the worker did not start")
        assert child.proc.stdin is not None
        child.proc.stdin.write(case.name.encode() + b"\n")
        child.proc.stdin.flush()
        stage, deadline, record, wrapper = "wrapper", time.monotonic() + timeout, None, None
        while record is None:
            message = child.read(deadline)
            if message is None:
                outcome = "timeout" if child.proc.poll() is None else "crash"
                child.kill()
                record = _lost(case.name, op_of(case), stage, outcome, wrapper)
                child = None
            elif "start" in message:
                stage, deadline = message["stage"], time.monotonic() + timeout
                wrapper = message.get("wrapper", wrapper)
            elif "case" in message:
                record = message
        records.append(record)
    if child is not None:
        child.kill()
    return records


def wrapper_losses(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r for r in records
        if r["engine"]["outcome"] == "pass" and r["wrapper"]["outcome"] not in ("pass", "unknown")
    ]  # fmt: skip


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per backend: counts per outcome (wrapper and engine), losses by op, problems."""
    summary: dict[str, Any] = {}
    for backend, records in results.items():
        losses = wrapper_losses(records)
        summary[backend] = {
            "cases": len(records),
            "wrapper": dict(Counter(r["wrapper"]["outcome"] for r in records)),
            "engine": dict(Counter(r["engine"]["outcome"] for r in records)),
            "wrapper_losses": len(losses),
            "losses_by_op": dict(Counter(r["op"] for r in losses).most_common()),
            "loss_cases": [r["case"] for r in losses],
            "wrapper_crashes": [r["case"] for r in records if r["wrapper"]["outcome"] == "crash"],
            "unsupported_ops_raised": [r["case"] for r in records if "raised" in r["wrapper"]],
        }
    return summary


def table(summary: dict[str, Any]) -> str:
    head = f"{'backend':12} {'side':8} " + " ".join(f"{o:>8}" for o in OUTCOMES) + f" {'losses':>7}"
    lines = [head, "-" * len(head)]
    for backend, s in summary.items():
        for side in ("wrapper", "engine"):
            counts = " ".join(f"{s[side].get(o, 0):>8}" for o in OUTCOMES)
            loss = f" {s['wrapper_losses']:>7}" if side == "wrapper" else ""
            lines.append(f"{backend:12} {side:8} {counts}{loss}")
    for backend, s in summary.items():
        if s["losses_by_op"]:
            ops = ", ".join(f"{op} {n}" for op, n in s["losses_by_op"].items())
            lines.append(f"{backend} wrapper losses by op: {ops}")
        for key in ("wrapper_crashes", "unsupported_ops_raised"):
            if s[key]:
                lines.append(f"{backend} {key}: {len(s[key])} ({', '.join(s[key][:8])})")
    return "\n".join(lines)


def conformance(
    backends: Sequence[str], cases: Sequence[Any], *, timeout: float = 60.0, workdir: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Run ``cases`` through each backend (its worker subprocess); records per backend."""
    with tempfile.TemporaryDirectory(prefix="loom-conformance-", dir=workdir) as folder:
        cases_file = str(Path(folder) / "cases.pkl")
        with open(cases_file, "wb") as f:
            pickle.dump(list(cases), f)
        return {b: run_backend(b, cases, cases_file, timeout) for b in backends}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON report to write")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--sample", type=int, help="a seeded sample of N cases (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case and stage")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--cases-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.cases_file)
    if not args.out:
        parser.error("--out is required")
    t0 = time.perf_counter()
    cases = sample_cases(collect_cases(), args.sample, args.seed)
    results = conformance(args.backends, cases, timeout=args.timeout)
    summary = summarize(results)
    report = {"cases": len(cases), "sample": args.sample, "seed": args.seed,
              "seconds": round(time.perf_counter() - t0, 1), "summary": summary, "results": results}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(table(summary))
    bad = any(s["wrapper_losses"] or s["wrapper_crashes"] or s["unsupported_ops_raised"] for s in summary.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
