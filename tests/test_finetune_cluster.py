"""Fine-tuning and linear probing on a cluster: one all-reduce per update under gradient accumulation, exact
mid-epoch resume after SIGKILL, a clean stop on SIGTERM with loader workers, and resume refusing changed flags.

Every run is tiny (32-px crops of real photographs, a 4-block ViT) and on the CPU; DDP runs use 2 gloo processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_same_weights, final_weights, relative_distance
from test_finetune import labelled_folder, pretrain_checkpoint

import main_finetune
import main_linprobe
from util.checkpoint import load_checkpoint

# Bit-identical results need the same number of threads in every process (reduction order).
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}

# Runs main_finetune / main_linprobe with one instrument:
#   count: every DDP model registers a communication hook that counts gradient all-reduce rounds, then all-reduces
#          as DDP's default does (the counts are written to OUT/allreduce_rank<r>.json);
#   kill:  SIGKILL itself right after the update that ends step STEP of epoch EPOCH;
#   term:  SIGTERM its whole process group (itself and its loader workers) just before that update's hook runs,
#          and wait a second before the hook sees it.
DRIVER = """
import argparse, json, os, signal, sys, time
sys.path.insert(0, {root!r})
import util.training as training
from util import cls_run
module_name, mode, kill_at, out = {module!r}, {mode!r}, ({epoch}, {step}), {out!r}
calls = {{"rounds": 0, "buckets": 0}}
if mode == "count":
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def counting_hook(state, bucket):
        calls["buckets"] += 1
        calls["rounds"] += bucket.index() == 0  # one round of all-reduces per synchronising backward
        return default_hooks.allreduce_hook(state, bucket)

    class CountingDDP(training.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, counting_hook)

    training.DistributedDataParallel = CountingDDP
else:
    original_call = training.UpdateHook.__call__

    def call(self, epoch, step, ensure_finite):
        if mode == "term" and (epoch, step) == kill_at:
            workers = open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children").read().split()
            ignored = [int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1 for pid in workers
                       for line in open(f"/proc/{{pid}}/status") if line.startswith("SigIgn:")]
            print(f"{{len(workers)}} workers, ignoring SIGTERM: {{all(ignored)}}", flush=True)
            os.killpg(os.getpgid(0), signal.SIGTERM)
            time.sleep(0.5)  # time for the signal to reach the workers (a killed worker fails the run by now)
        original_call(self, epoch, step, ensure_finite)
        if mode == "kill" and (epoch, step) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    training.UpdateHook.__call__ = call
module = __import__(module_name)
cli = argparse.ArgumentParser(module_name, parents=[module.get_args_parser()])
args, checkpoint = cls_run.parse_and_resolve(cli, module.resolve_args)
module.train(args, checkpoint)
if mode == "count":
    with open(os.path.join(out, "allreduce_rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(calls, f)
"""


def write_driver(folder: Path, module: str, mode: str, epoch: int = -1, step: int = -1) -> Path:
    """The driver script in `folder`; mode 'count' writes its counts there too."""
    folder.mkdir(parents=True, exist_ok=True)
    driver = folder / f"driver_{module}_{mode}.py"
    driver.write_text(DRIVER.format(root=str(ROOT), module=module, mode=mode, epoch=epoch, step=step, out=str(folder)))
    return driver


def flags(data: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--output_dir", str(out), "--log_dir", str(out), "--finetune", str(ckpt),
            "--nb_classes", "3", "--batch_size", "2", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
            "--device", "cpu", "--print_freq", "2", *extra]


def parse(module, argv: list[str]) -> argparse.Namespace:
    return module.get_args_parser().parse_args(argv)





@pytest.fixture
def setup(tmp_path):
    return labelled_folder(tmp_path / "data", n_train=12, n_val=3), pretrain_checkpoint(tmp_path / "pretrain.pth")


def test_two_rank_accumulation_all_reduces_once_per_update_and_matches_a_larger_batch(tmp_path):
    """2 gloo ranks, --accum_iter 2 at batch 2 per rank vs no accumulation at batch 4: one gradient all-reduce
    round per optimizer update (not per micro-step), and the same final weights."""
    data = labelled_folder(tmp_path / "data", n_train=16, n_val=3)  # 8 images per rank and epoch
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    same = ["--no_aug", "--mixup", "0", "--smoothing", "0", "--drop_path", "0", "--blr", "0.05", "--save_freq", "1"]
    outputs = {}
    for port, (name, batch, accum) in zip((29541, 29542), (("accum", "2", "2"), ("large", "4", "1"))):
        out = tmp_path / name
        driver = write_driver(out, "main_finetune", "count")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(driver), *flags(data, out, ckpt, *same, "--batch_size", batch, "--accum_iter", accum)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        counts = [json.loads((out / f"allreduce_rank{r}.json").read_text()) for r in range(2)]
        updates = 2 * 2  # 2 epochs x (8 images / 4 per update)
        assert [c["rounds"] for c in counts] == [updates, updates], (name, counts)
        outputs[name] = out
    accumulated, large = final_weights(outputs["accum"]), final_weights(outputs["large"])
    assert relative_distance(accumulated, large) < 1e-6
    # ... while the second epoch alone moved the weights far more than that tolerance
    assert relative_distance(load_checkpoint(outputs["large"] / "checkpoint-0.pth")["model"], large) > 1e-3


def test_finetune_sigkill_mid_epoch_then_resume_auto_is_bit_identical(setup, tmp_path):
    """RandAugment, random erasing, mixup, cutmix, label smoothing and drop path all on: the resumed run must draw
    exactly what the uninterrupted one drew (sampler position, per-sample seeds, every RNG)."""
    data, ckpt = setup  # 12 images, batch 2: 6 steps per epoch
    aug = ["--mixup", "0.8", "--cutmix", "1.0"]
    straight = tmp_path / "straight"
    main_finetune.main(parse(main_finetune, flags(data, straight, ckpt, *aug)))

    out = tmp_path / "killed"
    argv = flags(data, out, ckpt, *aug, "--save_every_iters", "2")
    proc = subprocess.run([sys.executable, str(write_driver(tmp_path, "main_finetune", "kill", 1, 3)), *argv],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert (state["epoch"], state["iter"]) == (1, 2)  # the kill after step 3 lost one step, redone on resume
    main_finetune.main(parse(main_finetune, [*argv, "--resume", "auto"]))
    assert_same_weights(final_weights(straight), final_weights(out))
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1]  # epoch 0 from the killed run, epoch 1 finished on resume


def test_sigterm_to_every_process_saves_mid_epoch_and_exits_cleanly(setup, tmp_path):
    """SLURM signals every process of the job: the loader workers (--num_workers 2) must survive it so the main
    process can finish its step, save checkpoint-last mid-epoch and exit 0."""
    data, ckpt = setup
    out = tmp_path / "run"
    argv = flags(data, out, ckpt, "--num_workers", "2", "--epochs", "50", "--print_freq", "1")
    proc = subprocess.run([sys.executable, str(write_driver(tmp_path, "main_finetune", "term", 1, 2)), *argv],
                          env=ENV, capture_output=True, text=True, timeout=300, start_new_session=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "stopped cleanly" in output
    # The workers ignore it (util.datasets.ignore_stop_signals), rather than only inheriting the main process's
    # handler, which a forked worker does but a spawned or forkserver one does not. In epoch 1 both loaders' workers
    # are alive: the training loader's and the (persistent) validation loader's.
    assert "4 workers, ignoring SIGTERM: True" in output
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert (state["epoch"], state["iter"]) == (1, 2)


def test_resume_with_a_changed_flag_stops_naming_it_unless_allowed(setup, tmp_path):
    data, ckpt = setup
    first = tmp_path / "first"
    # --resume auto in an empty --output_dir: a fresh run from --finetune (a SLURM job's first start)
    main_finetune.main(parse(main_finetune, flags(data, first, ckpt, "--save_freq", "1", "--resume", "auto")))
    epoch_end = str(first / "checkpoint-0.pth")
    for changed, flag in ((["--blr", "2e-3"], "--blr"), (["--layer_decay", "0.5"], "--layer_decay")):
        with pytest.raises(ValueError, match=f"(?s){flag}: .* -> .*--resume_allow_changes"):
            main_finetune.main(parse(main_finetune, flags(data, tmp_path / "refused", ckpt, *changed,
                                                          "--resume", epoch_end)))
    second = tmp_path / "second"
    main_finetune.main(parse(main_finetune, flags(data, second, ckpt, "--layer_decay", "0.5", "--resume", epoch_end,
                                                  "--resume_allow_changes", "layer_decay")))
    assert [json.loads(line)["epoch"] for line in (second / "log.txt").read_text().splitlines()] == [1]
    assert load_checkpoint(second / "checkpoint-last.pth")["args"]["layer_decay"] == 0.5


def test_linprobe_mid_epoch_save_and_resume_auto(setup, tmp_path):
    data, ckpt = setup
    straight = tmp_path / "straight"
    main_linprobe.main(parse(main_linprobe, flags(data, straight, ckpt)))
    out = tmp_path / "killed"
    argv = flags(data, out, ckpt, "--save_every_iters", "1")
    proc = subprocess.run([sys.executable, str(write_driver(tmp_path, "main_linprobe", "kill", 0, 4)), *argv],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (load_checkpoint(out / "checkpoint-last.pth")["iter"]) == 4
    main_linprobe.main(parse(main_linprobe, [*argv, "--resume", "auto"]))
    assert_same_weights(final_weights(straight), final_weights(out))
