"""The edge zoo's machinery on a small MobileNetV2 (random weights, 32x32 side: no download).

The real zoo (ImageNet weights, Fashion-MNIST) is built by ``scripts/build_edge_zoo.py``;
these tests check what it relies on: torchvision's layout loads, thinning makes a smaller
network that still runs, pruning records what it achieved, the ONNX export has the cuts
sparseloom needs, and two tasks with the same backbone share their blocks in the store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
torch = pytest.importorskip("torch")

import bench_sharing  # noqa: E402
import edge_mobilenet as em  # noqa: E402
import edge_sources as es  # noqa: E402
import edge_train as et  # noqa: E402

from loom.core.errors import ManifestError  # noqa: E402
from loom.core.paths import resolve_zoo, zoo_name  # noqa: E402
from loom.model.cutting import partition_family  # noqa: E402
from loom.model.family import load_family  # noqa: E402
from loom.model.variants import init_family  # noqa: E402

SIDE = 32


def _model(classes: int = 10, seed: int = 0) -> em.MobileNetV2:
    torch.manual_seed(seed)
    m = em.MobileNetV2(classes, SIDE)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):  # non-trivial BN to fold
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _x(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_torchvision_layout_loads_strictly(tmp_path: Path) -> None:
    state = {k: v for k, v in _model().state_dict().items() if k not in ("mean", "std")}
    state["classifier.1.weight"] = torch.zeros(1000, 1280)
    state["classifier.1.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "w.pth")
    loaded = em.load_imagenet(str(tmp_path / "w.pth"), 4, SIDE)
    assert loaded.classifier[1].out_features == 4
    assert torch.equal(loaded.features[5].conv[0][0].weight, _model().features[5].conv[0][0].weight)
    del state["features.3.conv.2.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="does not match MobileNetV2"):
        em.load_imagenet(str(tmp_path / "bad.pth"), 4, SIDE)


def test_thin_removes_channels_and_keeps_the_cut_shapes() -> None:
    m = _model()
    thin = em.thin(m, 0.5)
    full = sum(p.numel() for p in m.features.parameters())
    assert sum(p.numel() for p in thin.features.parameters()) < 0.65 * full
    widths = [b.conv[0][0].out_channels for b in em.blocks(thin)]
    assert widths[1:] == [max(8, 8 * round(w * 0.5 / 8)) for w in em.default_hidden()[1:]]
    with torch.no_grad():
        assert thin(_x()).shape == m(_x()).shape
        # zero fraction removed: the very same function
        assert torch.allclose(em.thin(m, 0.0)(_x()), m(_x()), atol=1e-5)


def test_magnitude_prune_reports_what_it_achieved() -> None:
    m = _model()
    got = et.magnitude_prune(m, 0.7)
    assert got == pytest.approx(0.7, abs=0.01)
    zeros = sum(int((c.weight == 0).sum()) for c in et.prunable_convs(m))
    assert zeros / sum(c.weight.numel() for c in et.prunable_convs(m)) == pytest.approx(got)


def test_fit_head_learns_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    y = np.repeat(np.arange(3), 40)
    feats = torch.randn(120, 16, generator=g) * 0.1 + torch.from_numpy(np.eye(3)[y] * 5.0).float().repeat(1, 6)[:, :16]
    head = et.fit_head(feats, y, 3)
    assert et.accuracy(head(feats).detach(), y) == 1.0


def _family(tmp: Path, task: str, backbone: em.MobileNetV2, classes: int) -> None:
    import copy

    model = copy.deepcopy(backbone)
    torch.manual_seed(classes)
    model.classifier[1] = torch.nn.Linear(1280, classes)
    et.export_onnx(model, tmp / f"{task}.onnx")
    fam = tmp / task
    fam.mkdir()
    x = _x(16).numpy()
    np.savez(fam / "eval.npz", x=x, y=np.arange(16) % classes)
    np.savez(fam / "calib.npz", x=x)
    init_family(tmp / f"{task}.onnx", fam, task=task, num_classes=classes, fine_tuned="head")


def test_two_tasks_on_one_backbone_share_their_blocks(tmp_path: Path) -> None:
    backbone = _model()
    _family(tmp_path, "cls", backbone, 10)
    _family(tmp_path, "group", backbone, 4)
    assert load_family(tmp_path / "cls").variant("dense").fine_tuned == "head"
    # cuts given: on random weights the activations barely depend on the input, which the
    # cut-meaning check would (rightly) not accept for a variant that differs from dense
    cuts = [["/features/features.6/Add_output_0"], ["/features/features.13/Add_output_0"]]
    parts = {t: partition_family(load_family(tmp_path / t), tmp_path / "parts" / t, k=3, cuts=cuts)
             for t in ("cls", "group")}
    assert all(p.k == 3 for p in parts.values())
    from loom.model.blockstore import BlockStore

    store = BlockStore(tmp_path / "parts" / "blockstore")
    across = [bid for bid, users in store.shared_blocks().items() if {u[0] for u in users} == {"cls", "group"}]
    # every slot but the last (the one with the head) is the same bytes in both tasks
    assert len(across) == 2
    assert store.stats()["bytes_saved"] > 0


def test_named_zoos_resolve_or_say_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_zoo("embedded").name == "zoo"
    assert zoo_name(resolve_zoo("embedded")) == "embedded"
    monkeypatch.setenv("SPARSELOOM_EDGE_ZOO", str(tmp_path / "nowhere"))
    with pytest.raises(ManifestError, match="make zoo-edge"):
        resolve_zoo("edge")
    assert resolve_zoo(tmp_path) == tmp_path


def test_fashion_slice_is_committed_and_labelled() -> None:
    d = es.fashion(Path("unused"))
    assert d["train_x"].shape == (4000, 28, 28) and d["test_x"].shape == (1500, 28, 28)
    assert d["train_x"].dtype == np.uint8 and set(np.unique(d["test_y"])) == set(range(10))


def test_bench_sharing_switches_across_tasks(tmp_path: Path) -> None:
    import json

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    backbone = _model()
    _family(zoo, "cls", backbone, 10)
    _family(zoo, "group", backbone, 4)
    out = tmp_path / "sharing.json"
    assert bench_sharing.main(["--zoo", str(zoo), "--out", str(out), "--work", str(tmp_path / "parts"),
                               "--variants", "dense", "--repeats", "1"]) == 0
    r = json.loads(out.read_text())
    assert r["zoo"] == str(zoo) and set(r["by_cut_mode"]) == {"balanced", "head"}
    for mode, m in r["by_cut_mode"].items():
        assert len(m["pairs"]) == 4  # both ways, warm and cold
        for row in m["pairs"]:
            # only the last block (the head's) differs: one block loaded, the backbone's kept
            assert row["blocks_loaded"] == 1 and row["blocks_kept"] == 2, mode
            assert row["bytes_differential"] < row["bytes_monolithic"]
        assert m["memory"]["blocks_resident"] == 4
        assert m["memory"]["disk_bytes_blocks"] < m["memory"]["disk_bytes_monolithic"]
    head = r["by_cut_mode"]["head"]
    assert head["cuts"]["cls"][-1] == ["/ReduceMean_output_0"]  # the pooled features: only the head differs
    assert head["memory"]["disk_bytes_blocks"] < 0.6 * head["memory"]["disk_bytes_monolithic"]
    assert r["switch"]["cut_mode"] == "head" and r["switch"]["cross_task_speedup_vs_monolithic"] is not None
