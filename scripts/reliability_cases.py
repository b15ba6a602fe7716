"""The catalogue of bad inputs and faults for ``scripts/bench_reliability.py``.

Each ``Case`` is a function of an empty scratch folder that builds its bad input there and
hands it to the sparseloom entry point that reads it. ``expect``: the ``LoomError`` subclass
the input must raise, and ``says``: substrings its message must hold (the file, field, op,
block or processor concerned); ``expect=None``: the input is valid, or the fault must be
handled (the function returns normally). A function raises ``SilentWrong`` when it sees a
wrong result accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from backends.base import Backend, LoadedBlock
from backends.null import NullBackend
from loom.app.config import load_slo_config
from loom.core.errors import (
    BackendError,
    BlockIntegrityError,
    ConfigError,
    InputError,
    LoomError,
    ManifestError,
    ModelError,
    OverloadError,
    RuntimeClosedError,
    UnsupportedOpsError,
)
from loom.model.blockstore import INDEX_FILE, BlockStore
from loom.model.family import load_family
from loom.model.partition import PARTITION_FILE, load_partition
from loom.model.variants import init_family
from loom.profiling.dataset import ProfileDataError, load_profile_dataset
from loom.profiling.fitting import Estimates, EstimatesError
from loom.profiling.partitions import ensure_partitions
from loom.serving.runtime import Runtime, TaskBinding
from placement.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
SLO = ROOT / "configs" / "serve.yaml"
FAMILY = ROOT / "zoo" / "signal-cls"
PARTITIONS = ROOT / "out" / "partitions"
ESTIMATES = ROOT / "out" / "estimates" / "host"
DATASET = ROOT / "profiles" / "data" / "host"
BINARY = bytes(range(256)) * 8
WIDTH = 4
#: the bound on anything that should take milliseconds, inside a case
BOUND_S = 10.0


class SilentWrong(Exception):  # noqa: N818 - an outcome, not an error of ours
    """A case saw a wrong input accepted, or a wrong result delivered."""


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    fn: Callable[[Path], Any]
    expect: type[LoomError] | None = None
    says: tuple[str, ...] = ()
    timeout_s: float = 60.0


CASES: list[Case] = []


def case(name: str, category: str, fn: Callable[[Path], Any], expect: type[LoomError] | None = None,
         *says: str, timeout_s: float = 60.0) -> None:
    CASES.append(Case(name, category, fn, expect, tuple(says), timeout_s))


def damage(path: Path, how: str) -> None:
    """Binary, truncated, empty, or the wrong top-level shape (a list, a string)."""
    text = path.read_text()
    dump = json.dumps if path.suffix == ".json" else yaml.safe_dump
    if how == "binary":
        path.write_bytes(BINARY)
    elif how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "empty":
        path.write_text("")
    elif how == "list":
        path.write_text(dump([1, 2]))
    elif how == "string":
        path.write_text(dump("a string"))


# -- models: ONNX files as exported in the wild, through init_family -------------------------------
F32 = TensorProto.FLOAT


def mlp(*, d: int = 16, classes: int = 4, extra: list | None = None, weights: float = 0.3,
        opset: int = 17, x_shape: list | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu1"),
             helper.make_node("Gemm", ["a", "W2", "b2"], ["logits"], name="head")]
    inits = [numpy_helper.from_array((weights * rng.standard_normal(s)).astype(np.float32), n)
             for n, s in (("W1", (d, 8)), ("b1", (8,)), ("W2", (8, classes)), ("b2", (classes,)))]
    graph = helper.make_graph(nodes + (extra or []), "wild",
                              [helper.make_tensor_value_info("x", F32, x_shape or ["N", d])],
                              [helper.make_tensor_value_info("logits", F32, ["N", classes])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def exported(tmp: Path, model: onnx.ModelProto | bytes | None, *, d: int = 16, eval_d: int | None = None) -> Path:
    folder = tmp / "fam"
    folder.mkdir()
    rng = np.random.default_rng(1)
    np.savez(folder / "eval.npz", x=rng.standard_normal((40, eval_d or d)).astype(np.float32),
             y=rng.integers(0, 4, 40).astype(np.int64))
    np.savez(folder / "calib.npz", x=rng.standard_normal((16, d)).astype(np.float32))
    if isinstance(model, bytes):
        (folder / "exported.onnx").write_bytes(model)
    elif model is not None:
        (folder / "exported.onnx").write_bytes(model.SerializeToString())
    return folder


def init(tmp: Path, model: onnx.ModelProto | bytes | None, **kw: Any) -> Any:
    folder = exported(tmp, model, **kw)
    return init_family(folder / "exported.onnx", folder, task="wild", num_classes=4)


def _edit_graph(edit: Callable[[onnx.ModelProto], None], **kw: Any) -> onnx.ModelProto:
    model = mlp(**kw)
    edit(model)
    return model


def _no_nodes(m: onnx.ModelProto) -> None:
    del m.graph.node[:]


def _unknown_op(m: onnx.ModelProto) -> None:
    m.graph.node[1].op_type = "NoSuchOp"


def _dangling(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "ghost"


def _cycle(m: onnx.ModelProto) -> None:
    m.graph.node[0].input[0] = "a"  # fc1 reads relu1's output, relu1 reads fc1's


def _two_inputs(m: onnx.ModelProto) -> None:
    m.graph.input.append(helper.make_tensor_value_info("y", F32, ["N", 16]))
    m.graph.node.append(helper.make_node("Identity", ["y"], ["y2"], name="spare"))
    m.graph.output.append(helper.make_tensor_value_info("y2", F32, ["N", 16]))


def _nan(m: onnx.ModelProto) -> None:
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[:] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W1"))


def _wrong_weight_shape(m: onnx.ModelProto) -> None:
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.ones((5, 4), np.float32), "W2"))


def _batch_mixing() -> onnx.ModelProto:
    model = mlp()
    model.graph.node[0].input[0] = "xc"
    model.graph.node.insert(0, helper.make_node("ReduceMean", ["x"], ["m"], name="batch_mean", axes=[0], keepdims=1))
    model.graph.node.insert(1, helper.make_node("Sub", ["x", "m"], ["xc"], name="center"))
    return model


def _models() -> None:
    cat = "models"
    case("onnx_valid_mlp", cat, lambda t: init(t, mlp()))
    case("onnx_garbage_bytes", cat, lambda t: init(t, BINARY), ModelError, "exported.onnx")
    case("onnx_empty_file", cat, lambda t: init(t, b""), ModelError, "exported.onnx")
    case("onnx_truncated", cat, lambda t: init(t, mlp().SerializeToString()[:150]), ModelError, "exported.onnx")
    case("onnx_missing_file", cat, lambda t: init(t, None), ModelError, "exported.onnx")
    case("onnx_no_nodes", cat, lambda t: init(t, _edit_graph(_no_nodes)), ModelError, "exported.onnx")
    case("onnx_unknown_op", cat, lambda t: init(t, _edit_graph(_unknown_op)), ModelError, "NoSuchOp")
    case("onnx_dangling_tensor", cat, lambda t: init(t, _edit_graph(_dangling)), ModelError, "ghost")
    case("onnx_cycle", cat, lambda t: init(t, _edit_graph(_cycle)), ModelError, "exported.onnx")
    case("onnx_opset_99", cat, lambda t: init(t, mlp(opset=99)), ModelError, "exported.onnx", "99")
    case("onnx_two_inputs", cat, lambda t: init(t, _edit_graph(_two_inputs)), ManifestError, "no array")
    case("onnx_nan_weights", cat, lambda t: init(t, _edit_graph(_nan)), ModelError, "non-finite")
    case("onnx_weight_shape_mismatch", cat, lambda t: init(t, _edit_graph(_wrong_weight_shape)), ModelError,
         "exported.onnx")
    case("onnx_zero_dim_input", cat, lambda t: init(t, mlp(d=0), d=0), ModelError, "zero-sized dimension")
    case("onnx_batch_mixing", cat, lambda t: init(t, _batch_mixing()), ModelError, "batch 2 differs")
    case("onnx_eval_data_wrong_width", cat, lambda t: init(t, mlp(), eval_d=12), LoomError, "eval")
    case("onnx_eval_npz_garbage", cat, lambda t: _garbage_eval(t), LoomError, "eval.npz")


def _garbage_eval(tmp: Path) -> Any:
    folder = exported(tmp, mlp())
    (folder / "eval.npz").write_bytes(BINARY)
    return init_family(folder / "exported.onnx", folder, task="wild", num_classes=4)


# -- manifests: family.yaml ------------------------------------------------------------------------
def family_copy(tmp: Path) -> Path:
    """zoo/signal-cls, its files hard-linked (cheap, and inside the folder for the path checks)."""
    folder = tmp / "signal-cls"
    folder.mkdir()
    for f in FAMILY.iterdir():
        try:
            os.link(f, folder / f.name)
        except OSError:
            shutil.copy(f, folder / f.name)
    (folder / "family.yaml").unlink()
    shutil.copy(FAMILY / "family.yaml", folder / "family.yaml")
    return folder


def manifest(edit: Callable[[dict[str, Any]], Any] | None = None, raw: bytes | None = None) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        folder = family_copy(tmp)
        path = folder / "family.yaml"
        if raw is not None:
            path.write_bytes(raw)
        elif edit is not None:
            data = yaml.safe_load(path.read_text())
            edit(data)
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_family(folder)
    return run


def _manifests() -> None:
    cat, fy = "manifests", "family.yaml"
    text = (FAMILY / "family.yaml").read_text()
    case("manifest_valid", cat, manifest())
    case("manifest_binary", cat, manifest(raw=BINARY), ManifestError, fy)
    case("manifest_empty", cat, manifest(raw=b""), ManifestError, fy)
    case("manifest_truncated_in_input", cat, manifest(raw=text[: text.index("dtype")].encode()), ManifestError, fy)
    # cut inside the third variant: what is left is valid YAML, a family of two and a half variants
    case("manifest_truncated_in_variants", cat, manifest(raw=text[: len(text) // 3].encode()), ManifestError, fy)
    case("manifest_top_level_list", cat, manifest(raw=b"- 1\n- 2\n"), ManifestError, fy)
    case("manifest_duplicate_key", cat, manifest(raw=b"task: x\n" + text.encode()), ManifestError, fy, "task")
    case("manifest_missing_task", cat, manifest(lambda d: d.pop("task")), ManifestError, fy, "task")
    case("manifest_unknown_field", cat, manifest(lambda d: d.update(colour="red")), ManifestError, fy, "colour")
    case("manifest_missing_variant_file", cat, manifest(lambda d: d["variants"][0].update(file="nope.onnx")),
         ManifestError, fy, "nope.onnx")
    case("manifest_path_outside", cat, manifest(lambda d: d["variants"][1].update(file="/etc/hostname")),
         ManifestError, fy, "variants[1].file")
    case("manifest_accuracy_above_1", cat, manifest(lambda d: d["variants"][0].update(accuracy=1.5)),
         ManifestError, fy, "accuracy")
    case("manifest_negative_sparsity", cat, manifest(lambda d: d["variants"][1].update(sparsity=-0.5)),
         ManifestError, fy, "sparsity")
    case("manifest_bad_dtype", cat, manifest(lambda d: d["input"].update(dtype="float99")),
         ManifestError, fy, "dtype")
    case("manifest_negative_classes", cat, manifest(lambda d: d.update(num_classes=-1)),
         ManifestError, fy, "num_classes")
    case("manifest_duplicate_variant", cat, manifest(lambda d: d["variants"].append(dict(d["variants"][0]))),
         ManifestError, fy, "dense")
    case("manifest_missing_eval_file", cat, manifest(lambda d: d["eval_data"].update(file="none.npz")),
         ManifestError, fy, "none.npz")
    case("manifest_schema_99", cat, manifest(lambda d: d.update(schema_version=99)),
         ManifestError, fy, "schema_version")
    case("manifest_variants_not_list", cat, manifest(lambda d: d.update(variants="dense")),
         ManifestError, fy, "variants")


# -- SLO configs -----------------------------------------------------------------------------------
def slo(edit: Callable[[dict[str, Any]], Any] | None = None, raw: bytes | None = None) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        path = tmp / "x.yaml"
        if raw is not None:
            path.write_bytes(raw)
        else:
            data = yaml.safe_load(SLO.read_text())
            if edit is not None:
                edit(data)
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_slo_config(path)
    return run


def _task0(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["tasks"][0].update(kw)


def _slos() -> None:
    cat, x = "slo_configs", "x.yaml"
    case("slo_valid", cat, slo())
    case("slo_binary", cat, slo(raw=BINARY), ConfigError, x)
    case("slo_empty", cat, slo(raw=b""), ConfigError, x)
    case("slo_top_level_list", cat, slo(raw=b"[1, 2]\n"), ConfigError, x)
    case("slo_negative_latency", cat, slo(_task0(latency_ms=-1)), ConfigError, x, "latency_ms")
    case("slo_nan_latency", cat, slo(_task0(latency_ms=float("nan"))), ConfigError, x, "latency_ms")
    case("slo_floor_above_1", cat, slo(_task0(accuracy_floor=2.0)), ConfigError, x, "accuracy_floor")
    case("slo_unknown_policy", cat, slo(lambda d: d.update(policy="fastest")), ConfigError, x, "fastest")
    case("slo_unknown_device", cat, slo(lambda d: d.update(device="toaster")), ConfigError, x, "toaster")
    case("slo_duplicate_task", cat, slo(lambda d: d["tasks"].append(dict(d["tasks"][0]))), ConfigError, x,
         "image-cls")
    case("slo_missing_family", cat, slo(_task0(family="zoo/nothing")), ConfigError, x, "zoo/nothing")
    case("slo_unknown_arrival", cat, slo(_task0(arrival={"process": "chaotic", "rate_rps": 3})), ConfigError, x,
         "arrival")
    case("slo_negative_rate", cat, slo(_task0(arrival={"process": "poisson", "rate_rps": -3})), ConfigError, x,
         "rate_rps")
    case("slo_warmup_past_duration", cat, slo(lambda d: d.update(run={"duration_s": 2, "seed": 0, "warmup_s": 5})),
         ConfigError, x, "warmup_s")
    case("slo_k_zero", cat, slo(lambda d: d.update(k=0)), ConfigError, x, "k")
    case("slo_decay_above_1", cat, slo(lambda d: d.update(correction={"enabled": True, "decay": 1.5})),
         ConfigError, x, "decay")
    case("slo_negative_budget", cat, slo(lambda d: d.update(memory_budget_mb=-5)), ConfigError, x,
         "memory_budget_mb")
    case("slo_bad_on_unservable", cat, slo(lambda d: d.update(on_unservable="explode")), ConfigError, x,
         "on_unservable")
    case("slo_empty_change", cat, slo(_task0(slo_changes=[{"at_s": 3}])), ConfigError, x, "slo_changes")
    case("slo_missing_trace_file", cat, slo(_task0(arrival={"process": "trace", "file": "no/trace.txt"})),
         ConfigError, x, "trace.txt")
    case("slo_unknown_key", cat, slo(lambda d: d.update(colour="red")), ConfigError, x, "colour")
    case("slo_no_tasks", cat, slo(lambda d: d.update(tasks=[])), ConfigError, x, "tasks")
    case("slo_python_tag", cat, slo(raw=b"tasks: !!python/object/apply:os.system ['true']\n"), ConfigError, x)


# -- requests: Runtime.submit on a task with an input spec -------------------------------------------
def write_block(path: Path, slot: int, k: int) -> Path:
    src = "x" if slot == 0 else f"h{slot}"
    dst = "y" if slot == k - 1 else f"h{slot + 1}"
    graph = helper.make_graph([helper.make_node("Relu", [src], [dst])], f"block{slot}",
                              [helper.make_tensor_value_info(src, F32, ["batch", WIDTH])],
                              [helper.make_tensor_value_info(dst, F32, ["batch", WIDTH])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def binding(tmp: Path, procs: tuple[str, ...] = ("a",), k: int = 2) -> TaskBinding:
    """Task ``t``, one variant ``v`` of ``k`` blocks ``t.v.s<i>``, input ``x``: float32 [batch, 4]."""
    (tmp / "blocks").mkdir(exist_ok=True)
    paths = {f"t.v.s{s}": write_block(tmp / "blocks" / f"t.v.s{s}.onnx", s, k) for s in range(k)}
    plans = [Plan(task="t", config=("v",) * k, placement=(p,) * k, block_ids=tuple(paths),
                  latency_ms=1.0 * k, block_ms=(1.0,) * k, transfer_ms=(0.0,) * (k - 1), accuracy=0.9,
                  memory_bytes=0) for p in procs]
    return TaskBinding("t", plans, paths, 500.0, 0.0, output_name="y",
                       inputs={"x": ("float32", ("batch", WIDTH))}, outputs={"y": ("float32", ("batch", WIDTH))})


def submit(inputs: Any, *, task: str = "t", closed: bool = False, check_shape: bool = True) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        rt = Runtime(backends={"a": NullBackend(latency_ms=0.2)}, tasks=[binding(tmp)])
        try:
            if closed:
                rt.close()
            out = rt.submit(task, inputs).result(timeout=BOUND_S)
            n = len(inputs["x"])
            if check_shape and np.shape(out) != (n, WIDTH):
                raise SilentWrong(f"output of shape {np.shape(out)} for a batch of {n}")
            return out
        finally:
            rt.close()
            if rt.stats()["in_flight"]:
                raise SilentWrong(f"{rt.stats()['in_flight']} request(s) left in flight")
    return run


def _requests() -> None:
    cat, t = "requests", "task 't'"
    ok = np.ones((1, WIDTH), np.float32)
    case("request_valid", cat, submit({"x": ok}))
    case("request_valid_batch_3", cat, submit({"x": np.ones((3, WIDTH), np.float32)}))
    case("request_nan_values", cat, submit({"x": np.full((1, WIDTH), np.nan, np.float32)}))
    case("request_non_contiguous", cat, submit({"x": np.ones((WIDTH, 1), np.float32).T}))
    case("request_none", cat, submit(None), InputError, t, "mapping")
    case("request_bare_array", cat, submit(ok), InputError, t, "mapping")
    case("request_list_value", cat, submit({"x": ok.tolist()}), InputError, t, "'x'")
    case("request_missing_input", cat, submit({}), InputError, t, "'x'")
    case("request_unknown_input", cat, submit({"x": ok, "z": ok}), InputError, t, "'z'")
    case("request_int_key", cat, submit({"x": ok, 1: ok}), InputError, t, "'1'")
    case("request_float64", cat, submit({"x": ok.astype(np.float64)}), InputError, t, "float64")
    case("request_object_dtype", cat, submit({"x": ok.astype(object)}), InputError, t, "object")
    case("request_rank_1", cat, submit({"x": np.ones(WIDTH, np.float32)}), InputError, t, "rank")
    case("request_scalar", cat, submit({"x": np.array(1.0, np.float32)}), InputError, t, "rank")
    case("request_wrong_axis", cat, submit({"x": np.ones((1, WIDTH + 1), np.float32)}), InputError, t, "axis 1")
    case("request_unknown_task", cat, submit({"x": ok}, task="nope"), ConfigError, "nope")
    case("request_after_close", cat, submit({"x": ok}, closed=True), RuntimeClosedError, "closed")


# -- artifacts: partition.yaml, the block store, the profile dataset, an estimates folder ----------
def _copy(src: Path, dst: Path, names: tuple[str, ...] | None = None) -> Path:
    if names is None:
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True)
        for n in names:
            shutil.copy(src / n, dst / n)
    return dst


def artifact(src: Path, names: tuple[str, ...] | None, target: str, how: str | Callable[[Any], Any],
             load: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """Copy ``src`` (only ``names`` of it), damage ``target`` (a shape of ``damage`` or an edit of its
    parsed content) and ``load`` the copy."""
    def run(tmp: Path) -> Any:
        folder = _copy(src, tmp / "copy", names)
        path = folder / target
        if isinstance(how, str):
            damage(path, how)
        else:
            is_json = path.suffix == ".json"
            data = json.loads(path.read_text()) if is_json else yaml.safe_load(path.read_text())
            how(data)
            path.write_text(json.dumps(data) if is_json else yaml.safe_dump(data, sort_keys=False))
        return load(folder)
    return run


def _first(d: dict[str, Any], key: str = "blocks") -> dict[str, Any]:
    return next(iter(d[key].values()))


def tampered_block(missing: bool) -> Callable[[Path], Any]:
    """A stored block whose bytes changed (or whose file is gone) after it was indexed: serving's read."""
    def run(tmp: Path) -> Any:
        index = json.loads((PARTITIONS / "blockstore" / INDEX_FILE).read_text())
        bid, entry = next(iter(index["blocks"].items()))
        folder = _copy(PARTITIONS / "blockstore", tmp / "store", (INDEX_FILE,))
        if not missing:
            (folder / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
            data = bytearray((PARTITIONS / "blockstore" / entry["file"]).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (folder / entry["file"]).write_bytes(bytes(data))
        return BlockStore(folder).read(bid)
    return run


def _partition_cases() -> None:
    cat, pf = "artifacts", PARTITION_FILE
    src = PARTITIONS / "signal-cls"
    # the partition serving makes on a first run (a fresh clone has none yet): a few seconds
    ensure_partitions([load_family(ROOT / "zoo" / "signal-cls")], PARTITIONS, k=3)
    case("partition_valid", cat, artifact(src, (pf,), pf, lambda d: None, load_partition))
    for how in ("binary", "truncated", "empty", "list"):
        case(f"partition_{how}", cat, artifact(src, (pf,), pf, how, load_partition), ManifestError, pf)
    case("partition_k_7", cat, artifact(src, (pf,), pf, lambda d: d.update(k=7), load_partition),
         ManifestError, pf, "k")
    case("partition_block_without_file", cat, artifact(src, (pf,), pf, lambda d: _first(d).pop("file"),
                                                       load_partition), ManifestError, pf, "file")
    case("partition_reversed_blocks", cat, artifact(src, (pf,), pf, lambda d: d["variants"]["dense"].reverse(),
                                                    load_partition), ManifestError, pf, "variants.dense")
    store = PARTITIONS / "blockstore"
    for how in ("binary", "truncated", "list"):
        case(f"store_index_{how}", cat, artifact(store, (INDEX_FILE,), INDEX_FILE, how, BlockStore),
             ManifestError, INDEX_FILE)
    case("store_index_file_escapes", cat, artifact(store, (INDEX_FILE,), INDEX_FILE,
                                                   lambda d: _first(d).update(file="/etc/passwd"), BlockStore),
         ManifestError, INDEX_FILE, "file")
    case("store_index_size_string", cat, artifact(store, (INDEX_FILE,), INDEX_FILE,
                                                  lambda d: _first(d).update(size_bytes="big"), BlockStore),
         ManifestError, INDEX_FILE, "size_bytes")
    case("store_block_tampered", cat, tampered_block(False), BlockIntegrityError, "block ")
    case("store_block_missing", cat, tampered_block(True), BlockIntegrityError, "missing")


def _data_cases() -> None:
    cat = "artifacts"
    case("dataset_valid", cat, artifact(DATASET, None, "meta.json", lambda d: None, load_profile_dataset))
    for how in ("binary", "truncated", "list"):
        case(f"dataset_meta_{how}", cat, artifact(DATASET, None, "meta.json", how, load_profile_dataset),
             ProfileDataError, "meta.json")
    case("dataset_meta_runs_wrong", cat, artifact(DATASET, None, "meta.json", lambda d: d.update(runs={"a": 1}),
                                                  load_profile_dataset), ProfileDataError, "meta.json", "runs")
    for how in ("binary", "truncated", "empty"):
        case(f"dataset_blocks_csv_{how}", cat, artifact(DATASET, None, "blocks.csv", how, load_profile_dataset),
             ProfileDataError, "blocks.csv")
    case("dataset_blocks_csv_nul", cat, csv_nul, ProfileDataError, "blocks.csv")
    if not (ESTIMATES / "estimates.json").is_file():
        return  # written by a first Deployment.from_config; the overload run makes it
    case("estimates_valid", cat, artifact(ESTIMATES, None, "estimates.json", lambda d: None, Estimates.load))
    for how in ("binary", "truncated", "list"):
        case(f"estimates_json_{how}", cat, artifact(ESTIMATES, None, "estimates.json", how, Estimates.load),
             EstimatesError, "estimates.json")
    case("estimates_latency_meta_truncated", cat, artifact(ESTIMATES, None, "latency.meta.json", "truncated",
                                                           Estimates.load), LoomError, "latency.meta.json")
    case("estimates_links_list", cat, artifact(ESTIMATES, None, "links.json", "list", Estimates.load),
         EstimatesError, "links.json")
    case("estimates_missing_tasks", cat, artifact(ESTIMATES, None, "estimates.json", lambda d: d.pop("tasks"),
                                                  Estimates.load), EstimatesError, "estimates.json", "tasks")


def csv_nul(tmp: Path) -> Any:
    folder = _copy(DATASET, tmp / "copy")
    path = folder / "blocks.csv"
    path.write_bytes(path.read_bytes().replace(b",", b"\x00", 40))
    return load_profile_dataset(folder)


# -- backends: faults injected around the null backend, and blocks an engine cannot run -------------
class Faulty(Backend):
    """The null backend with one fault on its runs (or loads)."""

    name = "faulty"

    def __init__(self, fault: str) -> None:
        self.inner = NullBackend(latency_ms=1.0)
        self.fault = fault
        self.hung = threading.Event()
        self.unhang = threading.Event()

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, "reliability benchmark wrapper"

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        return self.inner.unsupported_ops(model)

    def load(self, model: onnx.ModelProto | str | Path, *, block_id: str | None = None) -> LoadedBlock:
        if self.fault == "load_raises":
            raise OSError("injected load failure")
        return self.inner.load(model, block_id=block_id)

    def release(self, block: LoadedBlock) -> None:
        self.inner.release(block)

    def run(self, block: LoadedBlock, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.fault == "hang" and not self.hung.is_set():
            self.hung.set()
            self.unhang.wait(60)
        if self.fault in ("raises", "memory"):
            raise (MemoryError if self.fault == "memory" else RuntimeError)("injected run failure")
        out = self.inner.run(block, feeds)
        if self.fault == "slow":
            time.sleep(0.01)
        if self.fault == "wrong_shape":
            return {k: np.zeros((3, 7, 5), v.dtype) for k, v in out.items()}
        if self.fault == "none":
            return None  # type: ignore[return-value]
        if self.fault == "wrong_name":
            return {"other": next(iter(out.values()))}
        return out


def faulty(fault: str, n: int = 4) -> Callable[[Path], Any]:
    """Serve ``n`` requests on a processor ``a`` with the fault; every future must resolve within the bound,
    with the right shape or a typed error (the first one is raised)."""
    def run(tmp: Path) -> Any:
        backend = Faulty(fault)
        rt = Runtime(backends={"a": backend}, tasks=[binding(tmp)])
        try:
            futures = [rt.submit("t", {"x": np.ones((1, WIDTH), np.float32)}) for _ in range(n)]
            outs = []
            for f in futures:
                exc = f.exception(timeout=BOUND_S)
                if exc is not None:
                    raise exc
                outs.append(f.result())
            bad = [np.shape(o) for o in outs if np.shape(o) != (1, WIDTH)]
            if bad:
                raise SilentWrong(f"{len(bad)} of {n} request(s) resolved to outputs of shape {bad[0]}, "
                                  f"not (1, {WIDTH})")
            return outs
        finally:
            backend.unhang.set()
            rt.close(cancel=True)
    return run


def hung_processor(tmp: Path) -> Any:
    """A call that never returns: after ``stuck_floor_s`` the processor is unhealthy, a new request is
    shed with ``OverloadError`` naming it, and ``close(cancel=True)`` returns at once."""
    backend = Faulty("hang")
    rt = Runtime(backends={"a": backend}, tasks=[binding(tmp)])
    rt.scheduler.stuck_floor_s = 0.2
    try:
        first = rt.submit("t", {"x": np.ones((1, WIDTH), np.float32)})
        if not backend.hung.wait(BOUND_S):
            raise SilentWrong("the injected hang never started")
        time.sleep(0.4)
        second = rt.submit("t", {"x": np.ones((1, WIDTH), np.float32)})
        t0 = time.monotonic()
        rt.close(cancel=True)
        if time.monotonic() - t0 > 3.0:
            raise SilentWrong(f"close(cancel=True) took {time.monotonic() - t0:.1f} s behind a hung call")
        if not isinstance(first.exception(timeout=BOUND_S), RuntimeClosedError):
            raise SilentWrong(f"the hung request ended with {first.exception()!r}")
        raise second.exception(timeout=BOUND_S) or SilentWrong("a request behind a hung call succeeded")
    finally:
        backend.unhang.set()


def refused_block(tmp: Path, engine: str) -> Any:
    """A block with an op the engine cannot run (``NoSuchOp`` in a custom domain, or refused by the null
    backend): the runtime must refuse it when it is built, naming the op."""
    b = binding(tmp)
    if engine == "null":
        return Runtime(backends={"a": NullBackend(unsupported={"Relu"})}, tasks=[b])
    from backends import get_backend

    path = Path(b.block_paths["t.v.s0"])
    model = onnx.load(str(path))
    model.graph.node[0].op_type, model.graph.node[0].domain = "NoSuchOp", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, path)
    return Runtime(backends={"a": get_backend("onnxruntime")}, tasks=[b]).close()


def garbage_block(tmp: Path) -> Any:
    from backends import get_backend

    b = binding(tmp)
    Path(b.block_paths["t.v.s1"]).write_bytes(BINARY)
    return Runtime(backends={"a": get_backend("onnxruntime")}, tasks=[b]).close()


def missing_block(tmp: Path) -> Any:
    b = binding(tmp)
    Path(b.block_paths["t.v.s1"]).unlink()
    return Runtime(backends={"a": NullBackend()}, tasks=[b]).close()


def _backends() -> None:
    cat = "backends"
    case("backend_ok_null", cat, faulty("ok"))
    case("backend_slow", cat, faulty("slow"))
    case("backend_run_raises", cat, faulty("raises"), BackendError, "t.v.s0", "'a'")
    case("backend_run_memory_error", cat, faulty("memory"), BackendError, "t.v.s0")
    case("backend_load_raises", cat, faulty("load_raises"), BackendError, "t.v.s")
    case("backend_wrong_shape", cat, faulty("wrong_shape"), BackendError, "t.v.s")
    case("backend_returns_none", cat, faulty("none"), BackendError, "t.v.s")
    case("backend_wrong_output_name", cat, faulty("wrong_name"), BackendError, "t.v.s")
    case("backend_hangs", cat, hung_processor, OverloadError, "'a'", timeout_s=30)
    case("block_unsupported_null", cat, lambda t: refused_block(t, "null"), UnsupportedOpsError, "Relu", "t.v.s")
    case("block_unsupported_ort", cat, lambda t: refused_block(t, "ort"), UnsupportedOpsError, "NoSuchOp")
    case("block_garbage_ort", cat, garbage_block, LoomError, "t.v.s1")
    case("block_file_missing", cat, missing_block, LoomError, "t.v.s1")


def catalogue() -> list[Case]:
    """Every case, in a fixed order (built once)."""
    if not CASES:
        for part in (_models, _manifests, _slos, _requests, _partition_cases, _data_cases, _backends):
            part()
    return CASES
