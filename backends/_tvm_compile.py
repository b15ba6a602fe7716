"""Compiling a block with TVM: ONNX -> Relax -> fused kernels -> schedules -> executable.

``Compiler`` holds one target's compile options; the schedules it applies (DLight's on
GPUs, sampled MetaSchedule points, a tuning log's records) are described, with measured
latencies, in docs/backends.md. ``unsupported`` lists the ops the ONNX frontend lacks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from backends._tvm_targets import MS_FILES, tvm_module
from backends.base import ModelSource, op_label, subgraphs
from loom.core.errors import BackendError, ModelError

#: ops the frontend handles outside its converter table (``If`` in ``_construct_nodes``)
_DIRECT_OPS = {"If", "Constant"}
#: ONNX domains whose ops the frontend looks up by type alone; any other domain is unsupported
_DOMAINS = {"", "com.microsoft"}
_SAMPLE_TRIES = 8
_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")


@dataclass
class Compiler:
    """How blocks are compiled for one target (all of it is part of the cache key)."""

    target: Any  # a tvm.target.Target
    target_text: str
    opt_level: int
    schedule: str
    batch_size: int | None
    seed: int
    tuning_log: Path | None
    tuning_hash: str | None

    def options(self) -> dict[str, Any]:
        """Everything besides the block that changes the compiled code: part of the cache key."""
        return {
            "opt_level": self.opt_level,
            "schedule": self.schedule,
            "batch_size": self.batch_size,
            "seed": self.seed if self.schedule == "sampled" else None,
            "tuning_log": self.tuning_hash,
        }

    def compile(
        self, src: ModelSource, proto: onnx.ModelProto, *, defaults_only: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """ONNX -> Relax -> fused, scheduled kernels -> a VM executable (``defaults_only``:
        no tuning log, no sampling; for the warm-up)."""
        tvm = tvm_module()
        mod = self.lower(src, proto)
        info: dict[str, Any] = {}
        try:
            with self.target, tvm.transform.PassContext(opt_level=self.opt_level):
                mod, info = self._apply_schedules(mod, defaults_only=defaults_only)
                executable = tvm.compile(mod, target=self.target)
        except Exception as exc:
            raise BackendError(
                f"{src.name}: TVM cannot compile it for {self.target_text}: {type(exc).__name__}: "
                f"{summary(exc)}"
            ) from exc
        return executable, info

    def lower(self, src: ModelSource, proto: onnx.ModelProto) -> Any:
        """ONNX -> Relax with the weights as constants -> legalized, fused TIR kernels.

        The fusion is what ``tvm.compile``'s own default pipeline for CPUs leaves out
        (it only legalizes), and what MetaSchedule's static-shape pipeline runs before
        applying a database: the kernels here are the ones tuning logs are keyed by.
        """
        tvm = tvm_module()
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        full = _full_model(src, proto)
        shapes = self._static_shapes(full, src.name)
        try:
            with warnings.catch_warnings():
                # the frontend warns about every symbolic input dim and checker complaint
                warnings.simplefilter("ignore")
                mod = from_onnx(full, shape_dict=shapes or None, keep_params_in_input=False)
        except Exception as exc:
            raise BackendError(
                f"{src.name}: TVM's Relax ONNX frontend cannot convert it: {type(exc).__name__}: "
                f"{summary(exc)}"
            ) from exc
        try:
            with self.target, tvm.transform.PassContext(opt_level=self.opt_level):
                return tvm.transform.Sequential(
                    [
                        relax.transform.DecomposeOpsForInference(),
                        relax.transform.CanonicalizeBindings(),
                        relax.transform.LegalizeOps(),
                        relax.transform.AnnotateTIROpPattern(),
                        relax.transform.FoldConstant(),
                        relax.transform.FuseOps(),
                        relax.transform.FuseTIR(),
                    ]
                )(mod)
        except Exception as exc:
            raise BackendError(
                f"{src.name}: TVM cannot lower it for {self.target_text}: {type(exc).__name__}: "
                f"{summary(exc)}"
            ) from exc

    def _apply_schedules(self, mod: Any, *, defaults_only: bool = False) -> tuple[Any, dict[str, Any]]:
        """Tuned schedules from the log, else sampled ones, else DLight's on GPUs."""
        from tvm import relax

        info: dict[str, Any] = {"kernels": _count_kernels(mod)}
        if self.tuning_log is not None and not defaults_only:
            ms = _meta_schedule(needs_intrinsics=_log_uses_intrinsics(self.tuning_log))
            database = ms.database.JSONDatabase(work_dir=str(self.tuning_log))
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            info["tuned"] = info["kernels"] - _count_unscheduled(mod)
        if self.schedule == "sampled" and not defaults_only:
            mod, info["sampled"] = self.sampled(mod)
        if "gpu" in self.target.keys:
            from tvm.s_tir import dlight as dl

            mod = dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
            )(mod)
        info["unscheduled"] = _count_unscheduled(mod)
        return mod, info

    def sampled(self, mod: Any, database: Any = None) -> tuple[Any, int]:
        """One post-processed point of MetaSchedule's design space per unscheduled kernel.

        Recorded in a database (in memory unless one is given) and applied like tuning
        records: the same machinery as a tuning log, minus the measuring. A kernel whose
        samples all fail the post-processors keeps its previous schedule.
        """
        from tvm import relax

        ms = _meta_schedule(needs_intrinsics=True)
        tasks = ms.relax_integration.extract_tasks(mod, self.target)
        if database is None:
            database = ms.database.MemoryDatabase()
        done = 0
        for task in tasks:
            kernel = task.dispatched[0]
            if _is_scheduled(kernel):
                continue
            context = ms.TuneContext(
                mod=kernel,
                target=self.target,
                space_generator="post-order-apply",
                search_strategy="replay-trace",
                task_name=task.task_name,
                rand_state=self.seed,
                num_threads=1,
            )
            for _ in range(_SAMPLE_TRIES):
                try:
                    sch = context.space_generator.generate_design_space(kernel)[0]
                    if not all(p.apply(sch) for p in context.space_generator.postprocs):
                        continue
                except Exception:  # a rule that cannot handle this kernel: try another sample
                    continue
                workload = database.commit_workload(kernel)
                database.commit_tuning_record(
                    ms.database.TuningRecord(sch.trace, workload, [1.0], self.target)
                )
                done += 1
                break
        with self.target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        return mod, done

    def _static_shapes(self, proto: onnx.ModelProto, name: str) -> dict[str, list[int]]:
        """Input shapes with the symbolic leading dim set to ``batch_size`` ({} when None)."""
        if self.batch_size is None:
            return {}
        shapes: dict[str, list[int]] = {}
        constants = {t.name for t in proto.graph.initializer}
        for value in proto.graph.input:
            if value.name in constants:
                continue
            dims = list(value.type.tensor_type.shape.dim)
            shape: list[int] = []
            for axis, dim in enumerate(dims):
                if dim.HasField("dim_value"):
                    shape.append(int(dim.dim_value))
                elif axis == 0:
                    shape.append(self.batch_size)
                else:
                    raise ModelError(
                        f"{name}: input {value.name!r} has a symbolic dimension "
                        f"{dim.dim_param or '?'!r} at axis {axis}; batch_size fixes only the "
                        f"leading one (leave batch_size unset, with the default schedule, to "
                        f"compile it with symbolic shapes)"
                    )
            shapes[value.name] = shape
        return shapes


def _log_uses_intrinsics(folder: Path) -> bool:
    """Whether tuning records tensorize (their intrinsics must be registered to replay them)."""
    try:
        return "tensorize" in (folder / MS_FILES[1]).read_text().lower()
    except OSError:
        return True


def _meta_schedule(*, needs_intrinsics: bool) -> Any:
    """``tvm.s_tir.meta_schedule``; the tensor intrinsics too when asked (a one-time ~30 s)."""
    tvm_module()
    if needs_intrinsics:
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the intrinsics)
    from tvm.s_tir import meta_schedule

    return meta_schedule


def _is_scheduled(mod: Any) -> bool:
    """Whether a kernel (a one-function IRModule) already has a schedule."""
    return any(_is_prim(f) and _scheduled(f) for _, f in mod.functions_items())


def _scheduled(func: Any) -> bool:
    """The mark DLight and MetaSchedule leave on a kernel they scheduled (``tirx.`` in 0.27,
    ``tir.`` before)."""
    attrs = func.attrs
    return attrs is not None and any(k in attrs and bool(attrs[k]) for k in _SCHEDULED_ATTRS)


def _is_prim(func: Any) -> bool:
    from tvm import tirx

    return isinstance(func, tirx.PrimFunc)


def _count_kernels(mod: Any) -> int:
    return sum(1 for _, f in mod.functions_items() if _is_prim(f))


def _count_unscheduled(mod: Any) -> int:
    return sum(1 for _, f in mod.functions_items() if _is_prim(f) and not _scheduled(f))


def inline(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Model-local functions inlined: the frontend only knows ops, not local functions."""
    if not proto.functions:
        return proto
    from onnx import inliner

    return inliner.inline_local_functions(proto)


def unsupported(proto: onnx.ModelProto) -> list[str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | _DIRECT_OPS
    bad: set[str] = set()

    def visit(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            if domain not in _DOMAINS or node.op_type not in known:
                bad.add(op_label(domain, node.op_type))
            for g in subgraphs(node):  # If/Loop/Scan bodies
                visit(g.node)

    visit(proto.graph.node)
    return sorted(bad)


def _full_model(src: ModelSource, proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its weights (``src.proto`` is read without external data)."""
    if isinstance(src.data, str):
        uses_external = any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in src.proto.graph.initializer
        )
        if uses_external:
            return inline(onnx.load(src.data))
    return proto


def summary(exc: BaseException) -> str:
    """TVM errors carry a long C++ traceback; the first non-empty line says what happened."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("Traceback", "  File"))]
    return lines[-1].strip() if lines else type(exc).__name__
