"""The small-scale study end to end in its smoke version (benchmarks/small_scale_study.py --preset smoke): every
stage (the photo-crop ImageFolder, four pre-trainings, five fine-tunings including the random-init reference, the
converged probe and k-NN of every block, the three analysis tools) leaves finite numbers for every variant and block,
and every figure and table is written; the claims' t-interval and verdicts against hand-computed examples."""

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

FIGURES = ("finetune_accuracy", "probe_accuracy", "knn_accuracy", "cka_last_block", "head_diversity", "recon_loss")
SMOKE = study.PRESETS["smoke"]
SOURCES = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "page", "brick", "grass", "gravel")


def parse(argv: list[str]):
    return study.get_args_parser().parse_args(argv)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    result = study.main(parse(["--output_dir", str(root / "out"), "--preset", "smoke", "--seeds", "0",
                               "--docs_dir", str(root / "docs")]))
    return root, result


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_stage_produced_its_numbers(smoke):
    root, result = smoke
    saved = json.loads((root / "out" / "study.json").read_text())
    depth = SMOKE.depth
    assert saved["data"]["images"] == {"train": 60, "val": 60}  # 6 crops of each of the 10 source images per split
    for variant in (*study.VARIANTS, "random_init"):
        run = saved["runs"][variant]["0"]
        finetune = run["finetune"]["stats"]
        assert 0 <= finetune["acc1"] <= 100 and finetune["n"] == 60
        blocks = run["frozen_probes"]["blocks"]
        assert len(blocks) == depth
        for block in blocks:
            assert 0 <= block["logreg"]["acc1"] <= 100 and 0 <= block["knn_acc1"] <= 100
            assert block["logreg"]["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and len(block["logreg"]["held_out_acc1"]) == 5
        curves = saved["per_block"][variant]
        assert len(curves["probe_acc1"]) == depth and len(curves["knn_acc1"]) == depth
        assert all(finite(m["mean"]) and m["std"] == 0 for m in saved["scalars"][variant].values())  # one seed
    for variant in study.VARIANTS:
        run = saved["runs"][variant]["0"]
        assert Path(run["pretrain"]["checkpoint"]).is_file()
        assert all(finite(v) for v in run["pretrain"]["train_stats"].values())
        assert finite(run["recon_loss_last"]) and run["recon_loss_last"] > 0
        assert len(run["cka_with_last"]) == depth and all(finite(v) for v in run["cka_with_last"])
        assert run["cka_with_last"][-1] == pytest.approx(1.0, abs=1e-4)  # the last block with itself
        assert len(run["head_similarity"]) == depth and all(finite(v) for v in run["head_similarity"])
    assert "pretrain" not in saved["runs"]["random_init"]["0"]
    times = saved["analysis_time"]["0"]  # one run of each tool per seed, timed once
    assert sorted(times) == ["cka", "eval_recon_loss", "head_diversity"]
    assert all(t["seconds"] > 0 and t["cpu_seconds"] > 0 for t in times.values())
    assert 0 <= saved["raw_pixels"]["probe_acc1"] <= 100 and 0 <= saved["raw_pixels"]["knn_acc1"] <= 100
    finetune_dir = root / "out" / "finetune" / "deepmim" / "seed0"
    assert (finetune_dir / "log.txt").is_file() and not list(finetune_dir.glob("*.pth"))  # checkpoints dropped
    # DeepMIM decodes from depth*{1/2, 2/3, 5/6, 1}; MAE from the last block only.
    assert sorted(saved["runs"]["deepmim"]["0"]["recon_loss"], key=int) == ["3", "4", "5", "6"]
    assert list(saved["runs"]["mae"]["0"]["recon_loss"]) == ["6"]
    assert {c["source"] for c in saved["claims"]} >= {"precondition", "Fig. 3", "Fig. 4", "Fig. 6", "Tab. 10"}
    assert all(c["verdict"] == "not resolved" for c in saved["claims"])  # one seed resolves nothing


def test_finetune_runs_start_from_the_variant_or_from_scratch(smoke):
    root, _ = smoke
    deepmim = json.loads((root / "out" / "finetune" / "deepmim" / "seed0" / "run_info.json").read_text())["args"]
    assert Path(deepmim["finetune"]) == root / "out" / "runs" / "deepmim" / "seed0" / "checkpoint-last.pth"
    scratch = json.loads((root / "out" / "finetune" / "random_init" / "seed0" / "run_info.json").read_text())["args"]
    assert not scratch["finetune"]
    for args in (deepmim, scratch):  # the one fixed budget
        assert (args["epochs"], args["batch_size"], args["blr"], args["no_aug"]) == \
            (SMOKE.finetune_epochs, SMOKE.finetune_batch_size, SMOKE.finetune_blr, True)
        assert (args["embed_dim"], args["depth"], args["patch_size"]) == \
            (SMOKE.embed_dim, SMOKE.depth, SMOKE.patch_size)


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
    assert "random init" in table and "raw pixels" in table and "fine-tuning top-1" in table and "k-NN" in table
    assert json.loads((root / "docs" / "small_scale_study.json").read_text())["preset"] == "smoke"


def test_reuse_skips_identical_runs(smoke):
    root, first = smoke
    again = study.main(parse(["--output_dir", str(root / "out"), "--preset", "smoke", "--seeds", "0", "--reuse"]))
    for variant in study.VARIANTS:
        run = again["runs"][variant]["0"]
        assert run["pretrain"].get("reused") and run["finetune"].get("reused") and run["frozen_probes"].get("reused")
        assert run["recon_loss_last"] == first["runs"][variant]["0"]["recon_loss_last"]
        assert run["finetune"]["stats"] == first["runs"][variant]["0"]["finetune"]["stats"]


def test_task_folder_is_written_once(smoke):
    root, _ = smoke
    data = root / "out" / "data"
    png = next((data / "val" / "coffee").iterdir())
    stamp = png.stat().st_mtime_ns
    info = study.export_task(data, SMOKE)
    assert png.stat().st_mtime_ns == stamp and info["images"] == {"train": 60, "val": 60}
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(SOURCES)
    import numpy as np
    from PIL import Image

    with Image.open(png) as crop:  # grayscale sources as RGB, at the study's input size
        pixels = np.asarray(crop)
    assert pixels.shape == (SMOKE.input_size, SMOKE.input_size, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_digits_task(tmp_path):
    info = study.export_task(tmp_path, study.budget_for("smoke", "digits"))
    assert info["images"] == {"train": 60, "val": 60}
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [str(d) for d in range(10)]


def test_budget_for_a_task():
    assert study.budget_for("cpu") is study.PRESETS["cpu"]
    assert study.budget_for("cpu", "digits").per_class is None  # the digits' fixed split, all of it
    assert study.budget_for("smoke", "digits").per_class == SMOKE.per_class
    photo = study.budget_for("gpu", "photo_crops")
    assert photo.task == "photo_crops" and photo.per_class == study.PRESETS["gpu"].per_class and photo.device == "cuda"
    with pytest.raises(ValueError, match="task must be one of"):
        study.budget_for("cpu", "cifar")


def test_t_interval_matches_a_hand_computed_one():
    # differences 1, 2, 3: mean 2, sample std 1; t_{0.975, 2} = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    interval = study_report.t_interval([1.0, 2.0, 3.0])
    assert interval["mean"] == pytest.approx(2.0) and interval["std"] == pytest.approx(1.0)
    assert interval["low"] == pytest.approx(2 - 2.484138, abs=1e-5)
    assert interval["high"] == pytest.approx(2 + 2.484138, abs=1e-5)
    # five seeds: t_{0.975, 4} = 2.776445; values 0.5, 0.7, 0.9, 1.1, 1.3 -> std 0.316228, half-width 0.392648
    five = study_report.t_interval([0.5, 0.7, 0.9, 1.1, 1.3])
    assert (five["low"], five["high"]) == pytest.approx((0.9 - 0.392648, 0.9 + 0.392648), abs=1e-5)
    one = study_report.t_interval([0.4])
    assert one["low"] == -math.inf and one["high"] == math.inf


def test_claim_verdicts_follow_the_interval():
    claim = study_report.Claim("Fig. 3", "lower loss", "recon_loss_last", "deepmim", "mae", higher_is_better=False)

    def run(mae, deepmim):
        metrics = {"mae": {s: {"recon_loss_last": v} for s, v in enumerate(mae)},
                   "deepmim": {s: {"recon_loss_last": v} for s, v in enumerate(deepmim)}}
        return study_report.evaluate_claim(claim, metrics)

    out = run([1.0, 1.0, 1.0], [0.9, 0.8, 0.85])  # diffs -0.1 -0.2 -0.15: interval below 0, lower is better
    assert out["verdict"] == "holds" and out["difference"]["high"] < 0
    assert out["difference_per_seed"] == pytest.approx({"0": -0.1, "1": -0.2, "2": -0.15})
    assert run([1.0, 1.0, 1.0], [1.1, 1.2, 1.15])["verdict"] == "contradicted"
    assert run([1.0, 1.0, 1.0], [0.9, 1.1, 0.95])["verdict"] == "not resolved"  # signs differ
    # Two seeds both +0.1 / +0.2 in the claimed direction: t_{0.975, 1} = 12.7 makes the interval span 0.
    assert run([1.0, 1.0], [0.9, 0.8])["verdict"] == "not resolved"


def test_gpu_preset_is_the_cpu_study_with_ten_times_the_updates_on_cuda():
    import study_runs

    cpu, gpu = study.PRESETS["cpu"], study.PRESETS["gpu"]
    assert (gpu.task, gpu.per_class, gpu.batch_size, gpu.finetune_batch_size) == \
        (cpu.task, cpu.per_class, cpu.batch_size, cpu.finetune_batch_size)
    assert gpu.epochs == 10 * cpu.epochs and gpu.finetune_epochs == 10 * cpu.finetune_epochs
    assert gpu.embed_dim > cpu.embed_dim and gpu.depth == cpu.depth  # wider; DeepMIM still taps blocks 3 4 5 6
    data, out = Path("data"), Path("out")
    argvs = [study_runs.pretrain_argv("deepmim", 0, gpu, data, out),
             study_runs.finetune_argv(None, 0, gpu, data, out), study_runs.finetune_argv(out, 0, gpu, data, out),
             study_runs.tool_argv({"mae": out}, gpu, data, out, 10)]
    for argv in argvs:  # every script of the study runs on the GPU, decided by the preset
        assert argv[argv.index("--device") + 1] == "cuda"
    probe = study_runs.Study(out, gpu, [0], study_runs.Scheduler(study_runs.InlineExecutor(), False), data, 10)
    assert probe.probe_args(out, 0)[5] == "cuda"


@pytest.mark.parametrize("argv, flag", [(["--jobs", "0"], "--jobs"), (["--seeds", "1", "1"], "--seeds"),
                                        (["--threads", "0"], "--threads")])
def test_bad_flags_fail_before_any_work(tmp_path, argv, flag):
    with pytest.raises(ValueError, match=flag):
        study.main(parse(["--output_dir", str(tmp_path / "out"), "--preset", "smoke", *argv]))
    assert not (tmp_path / "out").exists()
