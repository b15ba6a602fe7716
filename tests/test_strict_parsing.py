"""Strict, bounded parsing: repeated YAML keys, oversized files, manifest paths escaping their
folder, and every loader of a file sparseloom wrote turning corruption into its typed error."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from estimators.accuracy import AccuracyEstimator
from estimators.features import BLOCK_FEATURES, latency_row, processor_features
from estimators.latency import LatencyEstimator
from estimators.persist import EstimatorFileError, load_estimator, read_metadata
from estimators.plans import LinkModel
from loom.app.config import load_slo_config
from loom.core.errors import ConfigError, LoomError, ManifestError
from loom.core.schema import MAX_YAML_BYTES, load_yaml, read_yaml
from loom.model.blockstore import INDEX_FILE, BlockStore
from loom.model.family import load_family
from loom.model.partition import PARTITION_FILE, load_partition
from loom.processors.device import load_device_profile
from loom.profiling.dataset import ProfileDataError, load_profile_dataset
from loom.profiling.fitting import Estimates, EstimatesError, TaskEstimates

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
# the reliability catalogue's file-damaging helper: the same damage, one definition
from reliability_cases import BINARY, damage  # noqa: E402

SLO = ROOT / "configs" / "serve.yaml"
HOST = ROOT / "profiles" / "host.yaml"
DATASET = ROOT / "profiles" / "data" / "host"


def raises_typed(error: type[LoomError], load: Callable[[], Any], *names: str) -> str:
    """Run ``load``; it must raise ``error`` (no raw builtin) whose message names each of ``names``."""
    with pytest.raises(error) as info:
        load()
    msg = str(info.value)
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    return msg


def edit_yaml_text(src: Path, dst: Path, after: str, extra: str) -> int:
    """Copy ``src`` to ``dst`` with ``extra`` inserted after the first line starting with ``after``;
    returns the (1-based) line number of the inserted line."""
    lines = src.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(after)) + 1
    lines.insert(at, extra)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n")
    return at + 1


# -- 1. duplicate keys ----------------------------------------------------------------------------
def test_a_repeated_key_in_an_slo_config_names_file_key_and_line(tmp_path):
    path = tmp_path / "configs" / "x.yaml"
    line = edit_yaml_text(SLO, path, "latency_ms: 12.0", "    latency_ms: 5.0")
    msg = raises_typed(ConfigError, lambda: load_slo_config(path), "x.yaml", f"line {line}", "duplicate key 'latency_ms'")
    assert f"first at line {line - 1}" in msg


def test_a_repeated_key_in_a_device_profile(tmp_path):
    path = tmp_path / "profiles" / "dev.yaml"
    line = edit_yaml_text(HOST, path, "name: host", "name: other")
    raises_typed(ConfigError, lambda: load_device_profile(path), "dev.yaml", f"line {line}", "duplicate key 'name'")


def test_a_repeated_key_in_a_family_manifest(synth_family, tmp_path):
    folder = tmp_path / "fam"
    shutil.copytree(synth_family.root, folder)
    line = edit_yaml_text(synth_family.path, folder / "family.yaml", "task:", "task: other")
    raises_typed(ManifestError, lambda: load_family(folder), "family.yaml", f"line {line}", "duplicate key 'task'")


def test_a_repeated_key_in_a_partition(synth_partition, tmp_path):
    folder = tmp_path / "part"
    folder.mkdir()
    line = edit_yaml_text(synth_partition.root / PARTITION_FILE, folder / PARTITION_FILE, "task:", "task: again")
    raises_typed(ManifestError, lambda: load_partition(folder), PARTITION_FILE, f"line {line}", "duplicate key 'task'")


@pytest.mark.parametrize("text, key", [
    ("a: {x: 1, x: 2}\n", "'x'"),  # nested, on one line
    ("a:\n  - {b: 1}\n  - b: 1\n    c: 2\n    b: 3\n", "'b'"),  # inside a list
    ("1: a\n1.0: b\n", "1.0"),  # equal once loaded
    ("yes: 1\ntrue: 2\n", "True"),  # YAML 1.1 booleans
])
def test_repeated_keys_anywhere_are_errors(tmp_path, text, key):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    raises_typed(ConfigError, lambda: load_yaml(path, ConfigError), "x.yaml", f"duplicate key {key}")


def test_merge_keys_may_override_and_distinct_keys_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 3\n")
    assert read_yaml(path, ConfigError) == {"base": {"a": 1, "b": 2}, "x": {"a": 3, "b": 2}}


def test_no_tag_runs_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"a: !!python/object/apply:os.system ['touch {marker}']\n")
    raises_typed(ConfigError, lambda: load_yaml(path, ConfigError), "evil.yaml", "not valid YAML")
    assert not marker.exists()


# -- 2. bounded -----------------------------------------------------------------------------------
def test_an_oversized_slo_config_is_refused_unparsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("tasks: [\n" + "#" * MAX_YAML_BYTES)  # invalid YAML: only the size may be reported
    size = path.stat().st_size
    msg = raises_typed(ConfigError, lambda: load_slo_config(path), "big.yaml", f"{size} bytes", str(MAX_YAML_BYTES))
    assert "not valid YAML" not in msg


def test_a_50_mb_file_is_refused_at_once(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(50 << 20)  # sparse: nothing is written, nothing may be read
    raises_typed(ConfigError, lambda: load_slo_config(path), "huge.yaml", str(50 << 20))
    raises_typed(ConfigError, lambda: load_device_profile(path), "huge.yaml", str(50 << 20))


def test_oversized_manifest_and_partition(synth_family, synth_partition, tmp_path):
    fam = tmp_path / "fam"
    shutil.copytree(synth_family.root, fam)
    with (fam / "family.yaml").open("a") as f:
        f.write("#" * MAX_YAML_BYTES + "\n")
    raises_typed(ManifestError, lambda: load_family(fam), "family.yaml", "bytes")
    part = tmp_path / "part"
    part.mkdir()
    (part / PARTITION_FILE).write_text((synth_partition.root / PARTITION_FILE).read_text() + "#" * MAX_YAML_BYTES)
    raises_typed(ManifestError, lambda: load_partition(part), PARTITION_FILE, "bytes")


def test_the_limit_is_a_keyword(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\n" + "#" * 2000 + "\n")
    raises_typed(ConfigError, lambda: read_yaml(path, ConfigError, max_bytes=100), "x.yaml", "over the limit of 100")
    assert read_yaml(path, ConfigError, max_bytes=10_000) == {"a": 1}


@pytest.mark.parametrize("text, why", [
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
     "aliases expand"),  # a billion laughs
    ("a: &a [*a]\n", "contains it"),
    ("[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
])
def test_alias_bombs_and_deep_nesting_are_refused(tmp_path, text, why):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    raises_typed(ConfigError, lambda: load_yaml(path, ConfigError), "bomb.yaml", why)


@pytest.mark.parametrize("content", [BINARY, b"\xff\xfe\x00\x00tasks: []\n", b"a: 1\n\x00\x01\n"])
def test_binary_yaml_is_a_typed_error(tmp_path, content):
    path = tmp_path / "bin.yaml"
    path.write_bytes(content)
    raises_typed(ConfigError, lambda: load_slo_config(path), "bin.yaml")


# -- 3. manifest paths stay in the family's folder ---------------------------------------------
@pytest.fixture
def family_copy(synth_family, tmp_path) -> Path:
    folder = tmp_path / "fam"
    shutil.copytree(synth_family.root, folder)
    return folder


def rewrite_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load((folder / "family.yaml").read_text())
    edit(data)
    (folder / "family.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("field, rel", [
    ("variants[2].file", "../../../../etc/passwd"),
    ("variants[1].file", "/etc/hostname"),
    ("eval_data.file", "/etc/hostname"),
    ("calib_data.file", "../calib.npz"),
])
def test_paths_outside_the_family_folder_are_refused(family_copy, field, rel):
    def edit(data: dict[str, Any]) -> None:
        if field.startswith("variants"):
            data["variants"][int(field[9])]["file"] = rel
        else:
            data[field.split(".")[0]]["file"] = rel

    rewrite_manifest(family_copy, edit)
    raises_typed(ManifestError, lambda: load_family(family_copy), "family.yaml", field, "outside the family folder")


def test_a_symlink_pointing_outside_counts_as_outside(family_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(family_copy / "dense.onnx", outside / "dense.onnx")
    (family_copy / "link.onnx").symlink_to(outside / "dense.onnx")
    (family_copy / "inner.onnx").symlink_to(family_copy / "dense.onnx")  # inside: fine

    def edit(data: dict[str, Any]) -> None:
        data["variants"][0]["file"] = "inner.onnx"
        data["variants"][1]["file"] = "link.onnx"

    rewrite_manifest(family_copy, edit)
    msg = raises_typed(ManifestError, lambda: load_family(family_copy), "variants[1].file", str(outside.resolve()))
    assert "1 problem(s)" in msg and "variants[0]" not in msg
    fam = load_family(family_copy, allow_outside=True)  # the explicit option
    assert fam.variant_path(fam.variants[1].name).resolve() == (outside / "dense.onnx").resolve()


def test_allow_outside_accepts_a_relative_path_out(family_copy, tmp_path):
    shutil.copy(family_copy / "eval.npz", tmp_path / "shared-eval.npz")
    rewrite_manifest(family_copy, lambda d: d["eval_data"].update(file="../shared-eval.npz"))
    raises_typed(ManifestError, lambda: load_family(family_copy), "eval_data.file")
    x, _ = load_family(family_copy, allow_outside=True).eval_data(limit=4)
    assert len(x) == 4


def test_the_zoo_and_a_partitions_family_load_strictly(synth_partition):
    for task in ("image-cls", "seq-cls", "signal-cls"):
        assert load_family(ROOT / "zoo" / task).task == task
    assert synth_partition.family().task == "synthetic"


# -- 4. corrupted artifacts ------------------------------------------------------------------------
SHAPES = ["binary", "truncated", "empty", "list", "string"]


def edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- the estimators' files --
def _rows(n: int, seed: int) -> tuple[list[dict[str, float]], np.ndarray]:
    rng = np.random.default_rng(seed)
    proc = processor_features("cpu", "onnxruntime", {"intra_op_threads": 1})
    rows, y = [], []
    for _ in range(n):
        macs = float(np.exp(rng.uniform(np.log(1e5), np.log(2e7))))
        block = dict.fromkeys(BLOCK_FEATURES, 0.0)
        block.update(macs_total=macs, macs_conv=macs, params=macs / 50, act_total_bytes=macs / 20, prec_fp32=1.0)
        rows.append(latency_row(block, proc))
        y.append(0.02 + macs / 2e8 * 1e3)
    return rows, np.array(y)


@pytest.fixture(scope="module")
def saved_estimates(synth_partition, tmp_path_factory) -> Path:
    """An estimates folder (tiny models, no profiling) for the synthetic partition."""
    rows, y = _rows(40, 0)
    latency = LatencyEstimator(n_estimators=5).fit(rows, y)
    assert latency.prior_  # the state that a corrupted metadata file may break
    names = sorted(synth_partition.variants)
    acc_rows = [{"a": float(i), "b": float(i % 3)} for i in range(12)]
    accuracy = AccuracyEstimator(n_estimators=5).fit(acc_rows, [0.9 + 0.005 * i for i in range(12)])
    facts = {v: {"kind": "dense", "sparsity": 0.0, "precision": "fp32", "accuracy": 0.9} for v in names}
    te = TaskEstimates("synthetic", synth_partition, accuracy, {}, facts,
                       measured={(names[0], names[1], names[0]): 0.91})
    procs = {"cpu": processor_features("cpu", "onnxruntime", {"intra_op_threads": 1})}
    est = Estimates("dev", procs, latency, LinkModel(), {"synthetic": te})
    folder = tmp_path_factory.mktemp("estimates") / "est"
    est.save(folder)
    assert Estimates.load(folder).task("synthetic").measured
    return folder


@pytest.fixture
def est_copy(saved_estimates, tmp_path) -> Path:
    folder = tmp_path / "est"
    shutil.copytree(saved_estimates, folder)
    return folder


@pytest.mark.parametrize("how", SHAPES)
def test_corrupt_estimator_metadata(est_copy, how):
    meta = est_copy / "latency.meta.json"
    damage(meta, how)
    raises_typed(EstimatorFileError, lambda: read_metadata(est_copy / "latency.json"), "latency.meta.json")
    raises_typed(EstimatorFileError, lambda: load_estimator(est_copy / "latency.json"), "latency.meta.json")
    raises_typed(EstimatorFileError, lambda: Estimates.load(est_copy), "latency.meta.json")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("feature_names"), "feature_names: missing"),
    (lambda m: m.update(feature_names="macs_total"), "feature_names"),
    (lambda m: m.update(feature_names=[1, 2]), "feature_names"),
    (lambda m: m.update(params=["a"]), "params"),
    (lambda m: m.update(versions="1.0"), "versions"),
    (lambda m: m.update(fingerprint=3), "fingerprint"),
    (lambda m: m.update(n_train_rows="many"), "n_train_rows"),
    (lambda m: m.update(state="prior"), "state"),
    (lambda m: m.update(state={"prior": "roofline"}), "state"),
    (lambda m: m["state"]["prior"].update(terms=["no-such-feature"]), "state"),
    (lambda m: m["state"]["prior"].pop("pooled"), "state"),
    (lambda m: m.update(params={"target": "cube"}), "params or state"),
])
def test_estimator_metadata_of_the_wrong_shape(est_copy, edit, field):
    edit_json(est_copy / "latency.meta.json", edit)
    raises_typed(EstimatorFileError, lambda: load_estimator(est_copy / "latency.json"), "latency.meta.json", field)


@pytest.mark.parametrize("how", SHAPES)
def test_corrupt_estimates_json(est_copy, how):
    damage(est_copy / "estimates.json", how)
    raises_typed(EstimatesError, lambda: Estimates.load(est_copy), "estimates.json")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("tasks"), "tasks: missing"),
    (lambda m: m.update(device=["dev"]), "device"),
    (lambda m: m.update(processors=[1]), "processors"),
    (lambda m: m.update(processors={"cpu": "fast"}), "processors"),
    (lambda m: m.update(processors={"cpu": {"macs": "lots"}}), "processors"),
    (lambda m: m["tasks"].update(synthetic="x"), "synthetic"),
    (lambda m: m["tasks"]["synthetic"].pop("partition"), "tasks.synthetic: partition: missing"),
    (lambda m: m["tasks"]["synthetic"].update(partition=7), "partition"),
    (lambda m: m["tasks"]["synthetic"].update(measured={"a": 1}), "measured"),
    (lambda m: m["tasks"]["synthetic"]["measured"][0].update(config="abc"), "tasks.synthetic.measured: [0].config"),
    (lambda m: m["tasks"]["synthetic"]["measured"][0].pop("accuracy"), "measured: missing key 'accuracy'"),
    (lambda m: m["tasks"]["synthetic"].update(variants={"dense": "x"}), "tasks.synthetic.variants: dense"),
    (lambda m: m["tasks"]["synthetic"].update(unsupported=[{"block": "b"}]), "unsupported: missing key"),
])
def test_estimates_json_of_the_wrong_shape(est_copy, edit, field):
    edit_json(est_copy / "estimates.json", edit)
    raises_typed(EstimatesError, lambda: Estimates.load(est_copy), "estimates.json", field)


@pytest.mark.parametrize("name, how", [
    ("links.json", "binary"), ("links.json", "truncated"), ("links.json", "list"),
    ("tasks/synthetic/compat.json", "binary"), ("tasks/synthetic/compat.json", "string"),
])
def test_corrupt_links_and_compat(est_copy, name, how):
    damage(est_copy / name, how)
    raises_typed(EstimatesError, lambda: Estimates.load(est_copy), name.rsplit("/", 1)[-1])


@pytest.mark.parametrize("name, data", [
    ("links.json", {"links": [{"between": ["a", "b"]}]}),
    ("links.json", {"links": "ab"}),
    ("links.json", {"dispatch_ms": {"cpu": "slow"}}),
    ("tasks/synthetic/compat.json", [{"upstream": "a", "downstream": "b"}]),
    ("tasks/synthetic/compat.json", ["a"]),
])
def test_links_and_compat_of_the_wrong_shape(est_copy, name, data):
    (est_copy / name).write_text(json.dumps(data))
    raises_typed(EstimatesError, lambda: Estimates.load(est_copy), name.rsplit("/", 1)[-1], "malformed estimates folder")


def test_a_corrupt_features_cache_is_recomputed(synth_partition, tmp_path):
    from loom.profiling.fitting import partition_features

    part_dir = tmp_path / "x" / "part"
    shutil.copytree(synth_partition.root, part_dir)
    shutil.copytree(synth_partition.store_root, (part_dir / synth_partition.store).resolve())
    part = load_partition(part_dir)
    first = partition_features(part)
    for content in (BINARY, b"[1, 2]", json.dumps(dict.fromkeys(first, "x")).encode()):
        (part_dir / "features.json").write_bytes(content)
        assert partition_features(part) == first


# -- the profile dataset --
@pytest.fixture
def data_copy(tmp_path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(DATASET, folder)
    return folder


@pytest.mark.parametrize("how", SHAPES)
def test_corrupt_dataset_meta(data_copy, how):
    damage(data_copy / "meta.json", how)
    raises_typed(ProfileDataError, lambda: load_profile_dataset(data_copy), "meta.json")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("fingerprints"), "fingerprints"),
    (lambda m: m.update(fingerprints=["abc"]), "fingerprints: expected a JSON object"),
    (lambda m: m.update(runs={"a": 1}), "runs"),
    (lambda m: m.update(runs=["started"]), "runs[0]"),
    (lambda m: m.update(link_calibration=[]), "link_calibration"),
    (lambda m: m.update(partitions="x"), "partitions"),
])
def test_dataset_meta_of_the_wrong_shape(data_copy, edit, field):
    edit_json(data_copy / "meta.json", edit)
    raises_typed(ProfileDataError, lambda: load_profile_dataset(data_copy), "meta.json", field)


@pytest.mark.parametrize("name", ["blocks.csv", "configs.csv"])
@pytest.mark.parametrize("how", ["binary", "nul", "truncated", "huge field", "empty"])
def test_corrupt_dataset_csv(data_copy, name, how):
    path = data_copy / name
    text = path.read_text()
    if how == "binary":
        path.write_bytes(text[:200].encode() + BINARY)
    elif how == "nul":
        path.write_bytes(text.encode().replace(b",", b"\x00", 40))
    elif how == "truncated":
        path.write_text(text[: len(text) // 2] + "\n")
    elif how == "huge field":
        path.write_text(text + '"' + "x" * 200_000 + '"\n')
    else:
        path.write_text("")
    raises_typed(ProfileDataError, lambda: load_profile_dataset(data_copy), name)


# -- partitions --
@pytest.fixture
def part_copy(synth_partition, tmp_path) -> Path:
    folder = tmp_path / "part"
    folder.mkdir()
    shutil.copy(synth_partition.root / PARTITION_FILE, folder / PARTITION_FILE)
    return folder


@pytest.mark.parametrize("how", SHAPES)
def test_corrupt_partition_file(part_copy, how):
    damage(part_copy / PARTITION_FILE, how)
    raises_typed(ManifestError, lambda: load_partition(part_copy), PARTITION_FILE)


def _first_block(data: dict[str, Any]) -> dict[str, Any]:
    return next(iter(data["blocks"].values()))


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("blocks"), "blocks"),
    (lambda d: d.update(blocks=["a"]), "blocks"),
    (lambda d: d.update(cuts="b1.out"), "cuts"),
    (lambda d: d.update(variants=["dense"]), "variants"),
    (lambda d: _first_block(d).update(slot="first"), "slot"),
    (lambda d: _first_block(d).update(inputs="input"), "inputs"),
    (lambda d: _first_block(d).pop("file"), "file"),
    (lambda d: _first_block(d).update(colour="red"), "colour"),
    (lambda d: d.update(k=7), "k: 7"),
    (lambda d: d["variants"].update(dense=d["variants"]["dense"][:2]), "variants.dense: 2 block(s) for 3 slots"),
    (lambda d: d["variants"]["dense"].__setitem__(0, "f" * 64), "variants.dense[0]"),
    (lambda d: d["variants"]["dense"].reverse(), "variants.dense[0]"),
])
def test_partition_of_the_wrong_shape(part_copy, edit, field):
    path = part_copy / PARTITION_FILE
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    raises_typed(ManifestError, lambda: load_partition(part_copy), PARTITION_FILE, field)


# -- the block store index --
@pytest.fixture
def store_copy(synth_partition, tmp_path) -> Path:
    folder = tmp_path / "store"
    shutil.copytree(synth_partition.store_root, folder)
    assert BlockStore(folder).task_names() == ["synthetic"]
    return folder


@pytest.mark.parametrize("how", SHAPES)
def test_corrupt_block_store_index(store_copy, how):
    damage(store_copy / INDEX_FILE, how)
    raises_typed(ManifestError, lambda: BlockStore(store_copy), INDEX_FILE)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("tasks"), "tasks"),
    (lambda d: d.update(format="1"), "format"),
    (lambda d: d.update(blocks=[]), "blocks"),
    (lambda d: _first_block(d).update(inputs="x"), "inputs"),
    (lambda d: _first_block(d).update(users=[["synthetic", "dense"]]), "users"),
    (lambda d: _first_block(d).update(size_bytes="big"), "size_bytes"),
    (lambda d: _first_block(d).update(file="../../../etc/passwd"), "file"),
    (lambda d: _first_block(d).update(file="/etc/passwd"), "file"),
    (lambda d: d["tasks"]["synthetic"].update(variants="dense"), "variants"),
    (lambda d: d["tasks"]["synthetic"]["variants"]["dense"].pop(), "tasks.synthetic.variants.dense"),
    (lambda d: d["tasks"]["synthetic"]["variants"]["dense"].__setitem__(0, "0" * 64), "is not in blocks"),
    (lambda d: d.update(aliases={"abc": "0" * 64}), "aliases.abc"),
])
def test_block_store_index_of_the_wrong_shape(store_copy, edit, field):
    edit_json(store_copy / INDEX_FILE, edit)
    raises_typed(ManifestError, lambda: BlockStore(store_copy), INDEX_FILE, field)


# -- a manifest cut short inside its lists is refused, not loaded with fewer variants --------
def test_save_writes_counts_and_a_manifest_cut_inside_its_variants_is_refused(family_copy):
    fam = load_family(family_copy)
    fam.save()  # writes variant_count and cut_count before the lists
    text = (family_copy / "family.yaml").read_text()
    n = len(fam.variants)
    assert f"variant_count: {n}\n" in text and text.index("variant_count:") < text.index("\nvariants:")
    assert not list(family_copy.glob(".family.yaml.*"))  # the temporary file is gone
    lines = text.splitlines(keepends=True)
    last_variant = max(i for i, line in enumerate(lines) if line.startswith("- name:"))
    (family_copy / "family.yaml").write_text("".join(lines[:last_variant]))  # still valid YAML
    raises_typed(ManifestError, lambda: load_family(family_copy), "variant_count", f"lists {n - 1}", "cut short")


def test_a_manifest_without_counts_still_loads(family_copy):
    rewrite_manifest(family_copy, lambda d: [d.pop("variant_count", None), d.pop("cut_count", None)])
    assert load_family(family_copy).manifest.variant_count is None
