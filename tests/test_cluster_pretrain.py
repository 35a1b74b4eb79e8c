"""Pre-training on a cluster, reproduced with gloo processes on the CPU: gradient accumulation under DDP, ranks that
agree on stopping, --demo with user flags, resume of a run with other settings or another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, relative_distance, write_image_folder

import main_pretrain
from util.checkpoint import load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# Runs main_pretrain under torchrun with every DDP model counting its gradient all-reduces (a communication hook)
# and, optionally, a NaN loss on one rank from a given step on. Writes counts and final weights per rank.
DRIVER = """
import json, os, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
sys.path.insert(0, {root!r})
import main_pretrain, models_deepmim, util.training as training

rank = int(os.environ["RANK"])
allreduces = []

class CountingDDP(training.DistributedDataParallel):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        def hook(state, bucket):
            if bucket.index() == 0:  # one gradient all-reduce round (of one or more buckets)
                allreduces.append(1)
            return default_hooks.allreduce_hook(state, bucket)
        self.register_comm_hook(None, hook)

training.DistributedDataParallel = CountingDDP
step_losses = []
original_forward = models_deepmim.MaskedAutoencoderDeepMIM.forward
def forward(self, *a, **k):
    out = original_forward(self, *a, **k)
    step_losses.append(float(out[0].detach()))
    return out
models_deepmim.MaskedAutoencoderDeepMIM.forward = forward
nan_rank, nan_after = {nan_rank}, {nan_after}
if rank == nan_rank:
    original, calls = models_deepmim.reconstruction_loss, [0]
    def loss(*a, **k):
        calls[0] += 1
        value = original(*a, **k)
        return value * float("nan") if calls[0] > nan_after else value
    models_deepmim.reconstruction_loss = loss

args = main_pretrain.parse_args(sys.argv[1:])
result = main_pretrain.main(args)
out = args.output_dir
torch.save(result.model.state_dict(), f"{{out}}/weights_rank{{rank}}.pt")
json.dump({{"allreduces": len(allreduces), "losses": step_losses}}, open(f"{{out}}/counts_rank{{rank}}.json", "w"))
"""


def torchrun(tmp_path: Path, port: int, flags: list[str], nan_rank: int = -1, nan_after: int = 0,
             nproc: int = 2) -> subprocess.CompletedProcess:
    driver = tmp_path / f"driver_{port}.py"
    driver.write_text(DRIVER.format(root=str(ROOT), nan_rank=nan_rank, nan_after=nan_after))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), str(driver), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--output_dir", str(out), *TINY_FLAGS, "--epochs", "1", "--warmup_epochs", "0",
            "--num_workers", "0", "--blr", "1e-3", "--device", "cpu", "--print_freq", "1", *extra]



def test_accumulation_under_ddp_all_reduces_once_per_update_and_matches_the_big_batch(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=16)  # 2 ranks x 8 images
    accum, big = tmp_path / "accum", tmp_path / "big"
    proc = torchrun(tmp_path, 29561, flags(data, accum, "--batch_size", "2", "--accum_iter", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(tmp_path, 29562, flags(data, big, "--batch_size", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        # 4 micro-steps per rank = 2 updates: exactly one all-reduce round per update, none on accumulation steps.
        assert json.loads((accum / f"counts_rank{rank}.json").read_text())["allreduces"] == 2
        assert json.loads((big / f"counts_rank{rank}.json").read_text())["allreduces"] == 2
    a = torch.load(accum / "weights_rank0.pt", weights_only=True)
    b = torch.load(big / "weights_rank0.pt", weights_only=True)
    assert relative_distance(a, b) < 1e-6
    assert relative_distance(a, torch.load(accum / "weights_rank1.pt", weights_only=True)) == 0.0


def test_nan_on_one_rank_stops_both_ranks_naming_it(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=16)  # 2 ranks x batch 2: 4 steps per epoch
    out = tmp_path / "run"
    # 3 decoders -> 3 losses per step: rank 1 goes NaN from epoch 1, step 2 on; logging every 2 steps.
    proc = torchrun(tmp_path, 29563, flags(data, out, "--batch_size", "2", "--epochs", "3", "--print_freq", "2",
                                           "--save_every_iters", "1"), nan_rank=1, nan_after=3 * (4 + 2))
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "rank(s) 1" in output and "epoch 1, step 2" in output
    assert "Timeout" not in output and "timed out" not in output
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert (state["epoch"], state["iter"]) == (1, 2)  # the last good update; nothing saved after the NaN
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_logged_losses_are_the_mean_over_ranks(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=8)
    out = tmp_path / "run"
    proc = torchrun(tmp_path, 29564, flags(data, out, "--batch_size", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((out / "log.txt").read_text().splitlines()[-1])["train_loss"]
    losses = [json.loads((out / f"counts_rank{rank}.json").read_text())["losses"] for rank in (0, 1)]
    mean_all = sum(losses[0] + losses[1]) / len(losses[0] + losses[1])
    mean_rank0 = sum(losses[0]) / len(losses[0])
    assert logged == pytest.approx(mean_all, rel=1e-5)
    assert abs(mean_all - mean_rank0) > 1e-4  # the two ranks saw different images: the test can tell them apart


def test_demo_keeps_the_flags_the_user_typed(tmp_path):
    parser_args = main_pretrain.parse_args(["--demo", "--epochs", "3", "--output_dir", str(tmp_path / "demo")])
    assert parser_args.epochs == 3 and parser_args.batch_size == main_pretrain.DEMO_SETTINGS["batch_size"]
    result = main_pretrain.main(parser_args)
    log = [json.loads(line) for line in (tmp_path / "demo" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1, 2]
    assert result.stats


@pytest.mark.parametrize("change", [["--hybrid_alphas", "0", "0.5", "1"], ["--supervised_blocks", "3", "4"]])
def test_resume_with_other_settings_stops_naming_the_flag(tmp_path, change):
    data = write_image_folder(tmp_path / "images", num_images=8)
    out = tmp_path / "run"
    base = flags(data, out, "--batch_size", "4")
    generator = None
    if change[0] == "--hybrid_alphas":
        generator = tmp_path / "generator.pth"
        main_pretrain.main(main_pretrain.parse_args(
            flags(data, tmp_path / "mae", "--batch_size", "4", "--model", "mae_vit_base_patch16")))
        os.replace(tmp_path / "mae" / "checkpoint-0.pth", generator)
        base += ["--hybrid_generator", str(generator), "--hybrid_alphas", "0", "0.333", "1"]
    main_pretrain.main(main_pretrain.parse_args(base + ["--epochs", "1"]))
    changed = base + change + ["--epochs", "2", "--resume", "auto"]
    with pytest.raises(ValueError, match=change[0]):
        main_pretrain.main(main_pretrain.parse_args(changed))
    allowed = change[0].lstrip("-") + ",epochs"
    if change[0] == "--supervised_blocks":
        return  # other decoders cannot load the old weights: refusing is the only answer
    result = main_pretrain.main(main_pretrain.parse_args(changed + ["--resume_allow_changes", allowed]))
    assert result.stats
    log = (out / "console.log").read_text()
    assert "hybrid_alphas" in log


def test_compiled_run_saves_plain_keys_and_resumes_without_compile(tmp_path):
    """--compile compiles in place: checkpoints load with and without it (no `_orig_mod.` prefixes). The eager
    backend keeps the test fast and the numerics close to an uncompiled run."""
    data = write_image_folder(tmp_path / "images", num_images=8)
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    main_pretrain.main(main_pretrain.parse_args(flags(data, plain, "--batch_size", "4", "--epochs", "2")))
    main_pretrain.main(main_pretrain.parse_args(
        flags(data, compiled, "--batch_size", "4", "--compile", "--compile_backend", "eager")))
    state = load_checkpoint(compiled / "checkpoint-last.pth")
    assert not any("_orig_mod" in key for key in state["model"])
    assert not any("_orig_mod" in str(key) for key in state["optimizer"]["state"])
    # epoch 2 without --compile, from the compiled run's checkpoint
    main_pretrain.main(main_pretrain.parse_args(
        flags(data, compiled, "--batch_size", "4", "--epochs", "2", "--resume", "auto", "--resume_allow_changes",
              "epochs")))
    a, b = load_checkpoint(plain / "checkpoint-last.pth"), load_checkpoint(compiled / "checkpoint-last.pth")
    assert b["epoch"] == 1
    # Same run up to float reassociation in the traced graph.
    assert relative_distance(a["model"], b["model"]) < 1e-4
