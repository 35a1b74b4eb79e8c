"""Pre-training entry point: argument validation, checkpoints, exact resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, write_image_folder, write_vqkd_file

import main_pretrain
from util.checkpoint import load_checkpoint
from util.misc import seed_everything, setup_logging


def tiny_args(data: Path, out: Path, *extra: str):
    argv = ["--data_path", str(data), "--output_dir", str(out), "--model", "deepmim_vit_small_patch16", *TINY_FLAGS,
            "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--blr", "1e-3",
            "--print_freq", "1", "--save_freq", "1", *extra]
    return main_pretrain.parse_args(argv)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_run_writes_checkpoints_logs_and_safe_args(image_folder, tmp_path):
    out = tmp_path / "run"
    result = main_pretrain.main(tiny_args(image_folder, out, "--supervised_blocks", "2", "4"))
    assert {"loss", "loss_b2", "loss_b4", "lr"} <= set(result.stats)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth", "log.txt", "run_info.json"} <= names
    state = load_checkpoint(out / "checkpoint-last.pth")  # weights_only=True
    assert state["epoch"] == 1 and isinstance(state["args"], dict) and state["args"]["supervised_blocks"] == [2, 4]
    assert {"model", "model_cfg", "optimizer", "scaler", "rng", "git_sha"} <= set(state)
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and "train_loss_b2" in lines[0]
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())  # TensorBoard
    info = json.loads((out / "run_info.json").read_text())
    assert {"args", "git_sha", "command", "world_size", "versions"} <= set(info) and info["world_size"] == 1
    assert {"torch", "timm", "numpy", "python"} <= set(info["versions"])
    console = (out / "console.log").read_text()
    assert "] device cpu" in console and f"amp none; torch {torch.__version__}, CUDA" in console  # logged once set up
    assert "epoch 2 of 2 starts; run ETA" in console  # an overall ETA at every epoch start
    assert "pre-training finished" in console and "wall time" in console and str(out) in console


def test_checkpoint_last_is_refreshed_on_a_timer_not_every_epoch(image_folder, tmp_path, monkeypatch):
    """~1.7 GB every 30 s epoch of a 32-GPU run is too much shared-storage traffic: checkpoint-last.pth is written at
    the first epoch end, then when --save_every_minutes have passed, and at the end."""
    import util.checkpoint as ckpt

    written, original = [], ckpt.save_atomic
    monkeypatch.setattr(ckpt, "save_atomic", lambda state, path: written.append(
        (Path(path).name, state["epoch"], state["iter"])) or original(state, path))
    main_pretrain.main(tiny_args(image_folder, tmp_path / "run", "--epochs", "3", "--save_freq", "10",
                                 "--batch_size", "16"))
    assert written == [("checkpoint-last.pth", 0, 0), ("checkpoint-2.pth", 2, 0), ("checkpoint-last.pth", 2, 0)]


def test_resume_gives_identical_weights(image_folder, tmp_path):
    straight = main_pretrain.main(tiny_args(image_folder, tmp_path / "a")).model
    main_pretrain.main(tiny_args(image_folder, tmp_path / "b", "--epochs", "2"))  # writes checkpoint-0.pth
    first = tmp_path / "b" / "checkpoint-0.pth"
    # a fresh run from the epoch-0 checkpoint only: one more epoch
    resumed = main_pretrain.main(tiny_args(image_folder, tmp_path / "c", "--resume", str(first))).model
    for key, value in state_of(straight).items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_optimizer_groups_exclude_tokens_norms_biases(image_folder, tmp_path):
    args = tiny_args(image_folder, tmp_path)
    main_pretrain.resolve_args(args)
    args.lr = 1e-3
    model = main_pretrain.build_model(args)
    optimizer = main_pretrain.build_optimizer(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "cls_token" in no_decay and "decoders.2.mask_token" in no_decay and "blocks.0.norm1.weight" in no_decay
    assert "blocks.0.attn.qkv.bias" in no_decay and "blocks.0.attn.qkv.weight" not in no_decay
    assert optimizer.defaults["betas"] == (0.9, 0.95)  # paper Appendix A


BAD_ARGS = [
    (["--supervised_blocks", "0", "4"], "--supervised_blocks"),
    (["--supervised_blocks", "2", "9"], "--supervised_blocks"),
    (["--supervised_blocks", "2", "2", "4"], "--supervised_blocks"),
    (["--loss_weights", "1", "1"], "--loss_weights"),
    (["--mask_ratio", "1.0"], "--mask_ratio"),
    (["--mask_ratio", "0"], "--mask_ratio"),
    (["--input_size", "36"], "--input_size"),
    (["--model", "deepmim_vit_tiny"], "--model"),
    (["--batch_size", "0"], "--batch_size"),
    (["--resume", "/nonexistent/ckpt.pth"], "--resume"),
    (["--amp", "fp8"], "--amp"),
    (["--target", "clip", "--teacher_path", "/nonexistent/ViT-B-16.pt"], "/nonexistent/ViT-B-16.pt"),
    (["--target", "dino"], "--teacher_path"),
    (["--target", "codebook"], "--teacher_path"),
    (["--target", "sift"], "--target"),
    (["--hybrid_generator", "/nonexistent/mae.pth"], "/nonexistent/mae.pth"),
    (["--hybrid_alphas", "0", "0.5", "1"], "--hybrid_alphas"),
    (["--warmup_epochs", "3"], "the bound is --epochs"),
]


@pytest.mark.parametrize("extra, flag", BAD_ARGS)
def test_bad_arguments_exit_naming_the_flag(image_folder, tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exit_info:
        tiny_args(image_folder, tmp_path / "run", *extra)
    assert exit_info.value.code != 0
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_missing_empty_and_flat_data_path(tmp_path, capsys):
    for path in [tmp_path / "missing", tmp_path]:
        with pytest.raises(SystemExit):
            main_pretrain.parse_args(["--data_path", str(path), *TINY_FLAGS])
        assert "--data_path" in capsys.readouterr().err
    flat = write_image_folder(tmp_path / "flat", num_images=2, classes=1) / "class0"  # images, no class folder
    with pytest.raises(SystemExit):
        main_pretrain.parse_args(["--data_path", str(flat), "--output_dir", str(tmp_path / "out"), *TINY_FLAGS])
    assert "root/<class>/<image>" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main_pretrain.parse_args([])
    assert "--data_path is required" in capsys.readouterr().err


def test_command_line_errors_are_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    """While parsing (--mask_ratio, from the command line) and once the run has started (a batch larger than the
    data, in-process through the script's __main__): `prog: error:` and the message, no usage block, no traceback."""
    data = write_image_folder(tmp_path / "images", num_images=6)
    argv = ["--data_path", str(data), *TINY_FLAGS, "--model", "deepmim_vit_small_patch16", "--num_workers", "0",
            "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    proc = subprocess.run([sys.executable, "main_pretrain.py", *argv, "--mask_ratio", "1.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage:" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "main_pretrain.py: error: --mask_ratio must be in (0, 1), got 1.5"
    setup_logging()  # to this test's stdout: an earlier test's handler may hold a closed stream
    monkeypatch.setattr(sys, "argv", ["main_pretrain.py", *argv, "--batch_size", "8"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "main_pretrain.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("main_pretrain.py: error: --batch_size 8 x 1 processes exceeds the 6 training images")


DDP_DRIVER = """
import sys, torch
sys.path.insert(0, {root!r})
import main_pretrain
args = main_pretrain.parse_args(sys.argv[1:])
rank = int(__import__("os").environ["RANK"])
model = main_pretrain.main(args).model
torch.save(model.state_dict(), f"{out}/rank{{rank}}.pt")
"""


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=16)  # 2 ranks x batch 4 x 2 iterations
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(root=str(ROOT), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(driver), "--data_path", str(data), "--output_dir", str(tmp_path / "run"), *TINY_FLAGS,
           "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2]" in proc.stdout  # two iterations per rank
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    seed_everything(0)  # as rank 0 does before building the model that DDP broadcasts
    initial = main_pretrain.build_model(main_pretrain.parse_args(["--data_path", str(data), *TINY_FLAGS])).state_dict()
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0 if k.startswith("blocks"))  # it trained


def test_hog_target_trains_through_main(image_folder, tmp_path):
    result = main_pretrain.main(tiny_args(image_folder, tmp_path / "hog", "--target", "hog", "--epochs", "1"))
    assert result.model.pred_dim == 27  # 8x8 patch: 1 cell x 9 bins x 3 channels (MaskFeat)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.stats.values())


def test_hybrid_generator_trains_through_main(image_folder, tmp_path, capsys):
    """DeepMIM+: a tiny MAE pre-trained here serves as the generator of a DeepMIM run (Eq. 1)."""
    mae_dir = tmp_path / "mae"
    main_pretrain.main(tiny_args(image_folder, mae_dir, "--model", "mae_vit_small_patch16", "--epochs", "1",
                                 "--norm_pix_loss"))
    generator = mae_dir / "checkpoint-last.pth"
    args = tiny_args(image_folder, tmp_path / "hybrid", "--hybrid_generator", str(generator), "--epochs", "1",
                     "--hybrid_alphas", "0", "0.5", "1")
    result = main_pretrain.main(args)
    assert {"loss_b2", "loss_b3", "loss_b4"} <= set(result.stats)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.stats.values())
    state = load_checkpoint(tmp_path / "hybrid" / "checkpoint-last.pth")
    assert not any(k.startswith(("generator", "teacher")) for k in state["model"])  # frozen nets never saved
    # a student on another grid (64 px) is refused at parse time, naming the flag and both grids
    with pytest.raises(SystemExit):
        tiny_args(image_folder, tmp_path / "other", "--hybrid_generator", str(generator), "--input_size", "64",
                  "--hybrid_alphas", "0", "0.5", "1")
    err = capsys.readouterr().err
    assert "--hybrid_generator" in err and "(4, 4)" in err and "(8, 8)" in err
    assert not (tmp_path / "other").exists()


def test_hybrid_generator_needs_pixel_target(image_folder, tmp_path, capsys):
    generator = tmp_path / "g.pth"
    generator.write_bytes(b"x")
    with pytest.raises(SystemExit):
        tiny_args(image_folder, tmp_path / "run", "--target", "hog", "--hybrid_generator", str(generator))
    assert "--target pixel" in capsys.readouterr().err


def test_codebook_with_hybrid_generator_exits_before_any_compute_naming_both_flags(image_folder, tmp_path, capsys):
    """Eq. 1 blends continuous targets; token ids have no blend. Refused at parse time, before the tokenizer's own
    checks (no --teacher_path given here), nothing built or written."""
    assert "codebook" in main_pretrain.get_args_parser().format_help()  # `--help` lists the target
    generator = tmp_path / "g.pth"
    generator.write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        tiny_args(image_folder, tmp_path / "run", "--target", "codebook", "--hybrid_generator", str(generator))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--hybrid_generator" in err and "--target codebook" in err and "discrete" in err
    assert not (tmp_path / "run").exists()


def test_codebook_target_trains_through_main(image_folder, tmp_path):
    """BEiT v2's VQ-KD (a fabricated file with the release's keys): 40 logits per patch, one loss per block, the
    tokenizer never in the checkpoint."""
    vqkd = write_vqkd_file(tmp_path / "vqkd.pth")
    result = main_pretrain.main(tiny_args(image_folder, tmp_path / "codebook", "--target", "codebook", "--teacher_path",
                                          str(vqkd), "--teacher_model", "test_vit", "--epochs", "1"))
    assert result.model.pred_dim == 40 and result.model.loss_type == "cross_entropy"
    assert {"loss_b2", "loss_b3", "loss_b4"} <= set(result.stats)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.stats.values())
    state = load_checkpoint(tmp_path / "codebook" / "checkpoint-last.pth")
    assert state["model_cfg"]["loss_type"] == "cross_entropy"
    assert not any(k.startswith(("encoder", "quantize", "encode_task_layer")) for k in state["model"])


def test_a_batch_larger_than_the_dataset_is_an_error_not_an_empty_epoch(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=6)
    with pytest.raises(ValueError, match=r"--batch_size 8 x 1 processes exceeds the 6 training images"):
        main_pretrain.main(tiny_args(data, tmp_path / "run", "--batch_size", "8"))
    assert not list((tmp_path / "run").glob("checkpoint-*.pth"))


def test_maes_no_pin_mem_spelling_is_accepted(image_folder, tmp_path):
    assert tiny_args(image_folder, tmp_path / "run", "--no_pin_mem").pin_mem is False
    assert tiny_args(image_folder, tmp_path / "run", "--no-pin_mem").pin_mem is False
    assert tiny_args(image_folder, tmp_path / "run").pin_mem is True


@pytest.mark.parametrize("flag", ["--local_rank", "--local-rank"])
def test_maes_launcher_flags_are_accepted_and_the_environment_wins(image_folder, tmp_path, monkeypatch, flag):
    from util import distributed

    args = tiny_args(image_folder, tmp_path / "run", flag, "3", "--world_size", "8")
    assert args.local_rank == 3 and args.world_size == 8
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")  # registered so the teardown removes what the call below sets
    monkeypatch.delenv("LOCAL_RANK")
    distributed.apply_legacy_launcher_args(args)  # torch.distributed.launch without --use-env: only the flag
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's environment wins over the flag
    distributed.apply_legacy_launcher_args(args)
    assert os.environ["LOCAL_RANK"] == "1"


def test_pixel_run_without_norm_pix_and_without_a_config_is_warned(image_folder, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        tiny_args(image_folder, tmp_path / "run")
    assert "without --norm_pix_loss" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        tiny_args(image_folder, tmp_path / "run", "--norm_pix_loss")
        tiny_args(image_folder, tmp_path / "run", "--target", "hog")
    assert "without --norm_pix_loss" not in caplog.text


def test_resuming_a_fine_tuning_checkpoint_says_what_it_is(image_folder, tmp_path):
    """Not a list of 'changed' flags and a --resume_allow_changes that cannot work: the file's kind."""
    finetuned = Path(__file__).resolve().parent / "data" / "finetune-706c354-epoch0.pth"
    with pytest.raises(ValueError, match=r"is a fine-tuning or linear-probing checkpoint \(model_cfg name "
                                         r"'vit_small_patch16'.*main_finetune.py") as err:
        main_pretrain.main(tiny_args(image_folder, tmp_path / "run", "--resume", str(finetuned), "--device", "cpu"))
    assert "--resume_allow_changes" not in str(err.value)
