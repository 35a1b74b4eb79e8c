"""The small-scale study end to end in its smoke version (benchmarks/small_scale_study.py --smoke): every stage
(digits ImageFolder, four pre-trainings, a probe of every block, the three analysis tools) leaves finite numbers
for every variant and block, and every figure and table is written."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("small_scale_study", REPO / "benchmarks" / "small_scale_study.py")
study = sys.modules["small_scale_study"] = importlib.util.module_from_spec(SPEC)  # dataclasses look the module up
SPEC.loader.exec_module(study)
sys.path.insert(0, str(REPO / "benchmarks"))
import study_report  # noqa: E402

FIGURES = ("probe_accuracy", "cka_last_block", "head_diversity", "recon_loss")


def parse(argv: list[str]):
    return study.get_args_parser().parse_args(argv)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    result = study.main(parse(["--output_dir", str(root / "out"), "--smoke", "--seeds", "0",
                               "--docs_dir", str(root / "docs")]))
    return root, result


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_stage_produced_its_numbers(smoke):
    root, result = smoke
    saved = json.loads((root / "out" / "study.json").read_text())
    depth = study.SMOKE.depth
    assert saved["data"]["images"] == {"train": 60, "val": 60}  # 6 real digits per class and split
    for variant in study.VARIANTS:
        run = saved["runs"][variant]["0"]
        assert Path(run["pretrain"]["checkpoint"]).is_file()
        assert all(finite(v) for v in run["pretrain"]["train_stats"].values())
        assert sorted(run["probe"], key=int) == [str(b) for b in range(1, depth + 1)]
        assert all(0 <= p["stats"]["acc1"] <= 100 for p in run["probe"].values())
        assert finite(run["recon_loss_last"]) and run["recon_loss_last"] > 0
        assert len(run["cka_with_last"]) == depth and all(finite(v) for v in run["cka_with_last"])
        assert run["cka_with_last"][-1] == pytest.approx(1.0, abs=1e-4)  # the last block with itself
        assert len(run["head_similarity"]) == depth and all(finite(v) for v in run["head_similarity"])
        curves = saved["per_block"][variant]
        assert len(curves["probe_acc1"]) == depth and all(finite(p["mean"]) for p in curves["probe_acc1"])
        assert all(finite(m["mean"]) and m["std"] == 0 for m in saved["scalars"][variant].values())  # one seed
    probe_dir = root / "out" / "probes" / "deepmim" / "seed0" / "block3"
    assert (probe_dir / "log.txt").is_file() and not list(probe_dir.glob("*.pth"))  # probe checkpoints dropped
    # DeepMIM decodes from depth*{1/2, 2/3, 5/6, 1}; MAE from the last block only.
    assert sorted(saved["runs"]["deepmim"]["0"]["recon_loss"], key=int) == ["3", "4", "5", "6"]
    assert list(saved["runs"]["mae"]["0"]["recon_loss"]) == ["6"]
    assert {c["source"] for c in saved["claims"]} >= {"Fig. 3", "Fig. 4", "Fig. 6", "Tab. 10"}
    assert all(c["verdict"] in ("holds", "mixed", "does not hold") for c in saved["claims"])


def test_hybrid_run_used_the_same_seed_mae_as_generator(smoke):
    root, _ = smoke
    info = json.loads((root / "out" / "runs" / "deepmim_hybrid" / "seed0" / "run_info.json").read_text())
    assert Path(info["args"]["hybrid_generator"]) == root / "out" / "runs" / "mae" / "seed0" / "checkpoint-last.pth"
    assert info["args"]["norm_pix_loss"] and info["args"]["seed"] == 0
    shared = json.loads((root / "out" / "runs" / "deepmim_shared" / "seed0" / "run_info.json").read_text())
    assert shared["args"]["shared_decoder"] and not info["args"]["shared_decoder"]


def test_figures_tables_and_published_copies(smoke):
    root, result = smoke
    for name in FIGURES:
        png = root / "out" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (root / "docs" / "figures" / f"{name}.png").read_bytes() == png.read_bytes()
        assert Path(result["figures"][name]) == png
    table = (root / "out" / "table.md").read_text()
    assert all(v.label in table for v in study.VARIANTS.values()) and "block 6" in table and "Tab. 10" in table
    assert json.loads((root / "docs" / "small_scale_study.json").read_text())["smoke"] is True


def test_reuse_skips_identical_runs(smoke):
    root, first = smoke
    again = study.main(parse(["--output_dir", str(root / "out"), "--smoke", "--seeds", "0", "--reuse"]))
    for variant in study.VARIANTS:
        run = again["runs"][variant]["0"]
        assert run["pretrain"].get("reused") and all(p.get("reused") for p in run["probe"].values())
        assert run["recon_loss_last"] == first["runs"][variant]["0"]["recon_loss_last"]


def test_digits_folder_is_written_once(smoke):
    root, _ = smoke
    data = root / "out" / "data"
    png = next((data / "val" / "7").iterdir())
    stamp = png.stat().st_mtime_ns
    info = study.export_digits(data, study.SMOKE.input_size, study.SMOKE.per_class)
    assert png.stat().st_mtime_ns == stamp and info["images"] == {"train": 60, "val": 60}
    assert sorted(p.name for p in (data / "train").iterdir()) == [str(d) for d in range(10)]


def test_claim_verdicts_are_paired_per_seed():
    claim = study_report.Claim("Fig. 3", "lower loss", "recon_loss_last", "deepmim", "mae", higher_is_better=False)
    metrics = {"mae": {0: {"recon_loss_last": 1.0}, 1: {"recon_loss_last": 1.0}},
               "deepmim": {0: {"recon_loss_last": 0.9}, 1: {"recon_loss_last": 0.8}}}
    out = study_report.evaluate_claim(claim, metrics)
    assert out["verdict"] == "holds" and out["seeds_agreeing"] == 2
    assert out["difference"]["mean"] == pytest.approx(-0.15) and out["difference"]["std"] == pytest.approx(0.0707, 1e-3)
    metrics["deepmim"][1]["recon_loss_last"] = 1.1
    assert study_report.evaluate_claim(claim, metrics)["verdict"] == "mixed"
    assert study_report.evaluate_claim(claim._replace(higher_is_better=True), {
        "mae": metrics["mae"], "deepmim": {0: {"recon_loss_last": 0.5}, 1: {"recon_loss_last": 0.5}}})["verdict"] \
        == "does not hold"


@pytest.mark.parametrize("argv, flag", [(["--jobs", "0"], "--jobs"), (["--seeds", "1", "1"], "--seeds"),
                                        (["--threads", "0"], "--threads")])
def test_bad_flags_fail_before_any_work(tmp_path, argv, flag):
    with pytest.raises(ValueError, match=flag):
        study.main(parse(["--output_dir", str(tmp_path / "out"), "--smoke", *argv]))
    assert not (tmp_path / "out").exists()
