"""Fine-tuning: layer-decay groups, argument validation, the layer studies in a real step, exact --dist_eval,
checkpoints/logs/--eval/--resume end to end, the digits demo set."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, write_image_folder
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import engine_finetune
import main_finetune
import models_deepmim
from util import cls_run
from util.amp import resolve_machine
from util.checkpoint import load_checkpoint, save_atomic
from util.cls_data import DigitsDemo, finetune_transform, posterize_zero_bits_black, real_samples_on_rank
from util.misc import setup_logging
from util.training import train_epoch


def pretrain_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = models_deepmim.create_model("deepmim_vit_small_patch16", **TINY)
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 0, "args": {}}, path)
    return path


def labelled_folder(root: Path, n_train: int = 12, n_val: int = 7) -> Path:
    """train/ and val/ ImageFolders of real photo crops in 3 classes; 7 val images do not split evenly over 2 ranks."""
    write_image_folder(root / "train", n_train, size=40, classes=3, seed=0)
    write_image_folder(root / "val", n_val, size=40, classes=3, seed=1)
    return root


def parse(*argv: str) -> argparse.Namespace:
    return main_finetune.get_args_parser().parse_args(list(argv))


def tiny_argv(data: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--output_dir", str(out), "--finetune", str(ckpt),
            "--nb_classes", "3", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
            "--device", "cpu", "--print_freq", "1", *extra]


@pytest.fixture
def setup(tmp_path):
    return labelled_folder(tmp_path / "data"), pretrain_checkpoint(tmp_path / "pretrain.pth")


def test_layer_decay_scales_and_no_decay_on_tokens():
    """Block i (1-based) gets decay^(depth + 1 - i), patch embed / cls / pos decay^(depth + 1), head and fc_norm 1;
    no weight decay on cls_token, pos_embed, biases and norms (timm decays cls/pos without the no_weight_decay
    names)."""
    model = main_finetune.models_vit.create_classifier("vit_small_patch16", img_size=32, patch_size=8, embed_dim=64,
                                                       depth=4, num_heads=4, num_classes=3)
    decay, depth = 0.65, 4
    optimizer = main_finetune.build_optimizer(model, argparse.Namespace(weight_decay=0.05, layer_decay=decay, lr=1e-3))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        if name.startswith("blocks."):
            i = int(name.split(".")[1]) + 1
            assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - i)), name
        elif name.startswith(("head.", "fc_norm.")):
            assert group["lr_scale"] == 1.0, name
        else:
            assert group["lr_scale"] == pytest.approx(decay ** (depth + 1)), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert len(group_of) == len(list(model.parameters()))


def test_lr_is_blr_times_effective_batch_over_256():
    args = argparse.Namespace(lr=None, blr=1e-3, batch_size=64, accum_iter=2)
    assert cls_run.resolve_lr(args, world_size=4) == pytest.approx(1e-3 * 64 * 2 * 4 / 256)


def test_device_and_amp_are_resolved_in_the_job_not_at_submission(setup, tmp_path):
    """resolve_args (what the launchers run on a login node) leaves --device / --amp alone; main() decides them on
    the machine that trains (util.amp.resolve_machine) and refuses fp16 on the CPU there."""
    data, ckpt = setup
    argv = [a for a in tiny_argv(data, tmp_path / "out", ckpt) if a not in ("--device", "cpu")]
    args = parse(*argv)
    assert (args.device, args.amp) == (None, None)
    main_finetune.resolve_args(args)
    assert (args.device, args.amp) == (None, None)
    with pytest.raises(ValueError, match="--amp fp16"):
        main_finetune.main(parse(*tiny_argv(data, tmp_path / "out", ckpt), "--amp", "fp16"))


@pytest.mark.parametrize("extra, message", [
    (["--layer_decay", "1.5"], r"--layer_decay must be in \(0, 1\]"),
    (["--layer_decay", "0"], r"--layer_decay must be in \(0, 1\]"),
    (["--trainable_blocks", "5"], r"--trainable_blocks must be in 1..4"),
    (["--reinit_blocks", "0"], r"--reinit_blocks must be in 1..4"),
    (["--drop_path", "1"], r"--drop_path must be in \[0, 1\)"),
    (["--mixup", "0.8", "--batch_size", "5"], "--batch_size must be even"),
    (["--save_every_iters", "-1"], "--save_every_iters"),
    (["--resume", "auto", "--output_dir", ""], "--resume auto looks for checkpoints in --output_dir"),
    (["--eval"], "--resume"),
    (["--finetune", "no/such.pth"], "--finetune no/such.pth: no such file"),
    (["--nb_classes", "0"], "--nb_classes"),
    (["--warmup_epochs", "5"], "the bound is --epochs"),
    (["--model", "vit_tiny_patch3"], "--model"),
    (["--input_size", "36"], "--input_size 36 must be a multiple of --patch_size 8"),
])
def test_bad_flags_raise_naming_the_flag(setup, tmp_path, extra, message):
    data, ckpt = setup
    with pytest.raises(ValueError, match=message):
        main_finetune.resolve_args(parse(*tiny_argv(data, tmp_path / "out", ckpt), *extra))


def test_data_path_is_checked(setup, tmp_path):
    data, ckpt = setup
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="--data_path .* has no 'train' folder|--data_path .* no images"):
        main_finetune.resolve_args(parse("--data_path", str(tmp_path / "empty"), "--finetune", str(ckpt)))
    with pytest.raises(ValueError, match="--data_path .*only_train"):
        main_finetune.resolve_args(parse("--data_path", str(tmp_path / "only_train"), "--finetune", str(ckpt)))
    with pytest.raises(ValueError, match="--data_path is required"):
        main_finetune.resolve_args(parse("--finetune", str(ckpt)))
    with pytest.raises(ValueError, match="--nb_classes 2 is smaller than the 3 classes"):
        main_finetune.main(parse(*tiny_argv(data, tmp_path / "out", ckpt), "--nb_classes", "2"))


def test_resume_from_a_pretraining_checkpoint_is_refused(setup, tmp_path):
    data, ckpt = setup
    with pytest.raises(ValueError, match="--resume .* is not a checkpoint of this script"):
        main_finetune.main(parse(*tiny_argv(data, tmp_path / "out", ckpt), "--resume", str(ckpt)))


def test_demo_without_the_pretraining_checkpoint_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="run `python main_pretrain.py --demo` first"):
        main_finetune.resolve_args(parse("--demo"))


@pytest.mark.parametrize("script", ["main_finetune", "main_linprobe"])
def test_demo_writes_tensorboard_events_into_the_given_output_dir(tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    pretrain_checkpoint(tmp_path / cls_run.DEMO_PRETRAIN_CHECKPOINT)
    module = __import__(script)
    parser = module.get_args_parser()
    args = parser.parse_args(["--demo", "--output_dir", "elsewhere"])
    module.resolve_args(args)
    assert args.output_dir == args.log_dir == "elsewhere"
    args = parser.parse_args(["--demo"])
    module.resolve_args(args)
    assert args.output_dir == args.log_dir == f"./output_demo/{script.split('_')[1]}"


def test_user_errors_exit_with_one_line_and_argparse_errors_keep_their_format(setup, tmp_path, monkeypatch, capsys):
    """A user error found while parsing (--layer_decay) or once the run has started (a batch larger than the data,
    run in-process through the script's __main__) is one line on stderr and status 2, without usage block or
    traceback; argparse's own errors keep argparse's format."""
    data, ckpt = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, message, own in ((["--layer_decay", "2"], "--layer_decay must be in (0, 1]", True),
                                (["--trainable_blocks", "1", "--reinit_blocks", "1"], "not allowed with argument",
                                 False)):
        result = subprocess.run([sys.executable, "main_finetune.py", *tiny_argv(data, tmp_path, ckpt), *extra],
                                cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        if own:
            assert last.startswith("main_finetune.py: error: ") and message in last and "usage:" not in result.stderr
        else:
            assert "usage: main_finetune.py" in result.stderr
    setup_logging()  # to this test's stdout: an earlier test's handler may hold a closed stream
    monkeypatch.setattr(sys, "argv", ["main_finetune.py", *tiny_argv(data, tmp_path, ckpt), "--batch_size", "64"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "main_finetune.py"), run_name="__main__")
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("main_finetune.py: error: --batch_size 64 x 1 ranks exceeds the 12 training "
                                       "images (the last incomplete batch is dropped)\n")


def test_trainable_blocks_step_leaves_frozen_weights_bit_identical(setup, tmp_path):
    data, ckpt = setup
    args = parse(*tiny_argv(data, tmp_path, ckpt), "--trainable_blocks", "2", "--drop_path", "0",
                 "--max_bad_images", "0")
    checkpoint = main_finetune.resolve_args(args)
    resolve_machine(args)
    cls_run.resolve_lr(args, 1)
    model = main_finetune.build_model(args, checkpoint)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    model(x).logsumexp(dim=1).sub(model(x)[range(4), y]).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == {n for n, p in model.named_parameters() if n.startswith(("blocks.2.", "blocks.3.", "fc_norm.",
                                                                                   "head."))}
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = main_finetune.build_optimizer(model, args)
    loader = DataLoader(TensorDataset(x, y, torch.zeros(4, dtype=torch.int64)), batch_size=4)  # (image, label, bad)
    step = engine_finetune.classification_step(model, torch.nn.CrossEntropyLoss(), torch.device("cpu"), args.amp)
    train_epoch(model, loader, optimizer, torch.amp.GradScaler("cpu", enabled=False), 0, args, step)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name


def test_real_samples_on_rank_counts_each_sample_once():
    for n in (1, 7, 8, 10):
        for world in (2, 3):
            samplers = [DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False) for r in range(world)]
            counts = [real_samples_on_rank(s) for s in samplers]
            assert sum(counts) == n
            seen = [i for s, c in zip(samplers, counts) for i in list(s)[:c]]
            assert sorted(seen) == list(range(n))  # the counted prefixes are exactly the dataset, once each


def test_evaluate_over_shards_equals_one_process():
    """Without a process group: evaluate each rank's shard (padding skipped) and add the counts by hand."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(7, 5), torch.randint(0, 3, (7,)))
    model = torch.nn.Linear(5, 3)
    whole = engine_finetune.evaluate(DataLoader(data, batch_size=3), model, torch.device("cpu"))
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(data, sampler=sampler, batch_size=3)
        shards.append(engine_finetune.evaluate(loader, model, torch.device("cpu"),
                                               num_samples=real_samples_on_rank(sampler)))
    assert sum(s["n"] for s in shards) == whole["n"] == 7
    assert sum(s["acc1"] * s["n"] for s in shards) == pytest.approx(whole["acc1"] * 7)
    assert sum(s["loss"] * s["n"] for s in shards) == pytest.approx(whole["loss"] * 7)


def test_finetune_end_to_end_checkpoints_logs_eval_and_resume(setup, tmp_path, monkeypatch):
    data, ckpt = setup
    out = tmp_path / "run"
    stats = main_finetune.main(parse(*tiny_argv(data, out, ckpt), "--epochs", "2", "--save_freq", "1",
                                     "--reinit_blocks", "1", "--mixup", "0.8", "--cutmix", "1.0"))
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth", "checkpoint-best.pth", "log.txt",
            "run_info.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "n_parameters"} <= set(lines[0])
    assert lines[1]["test_n"] == 7 and stats["acc1"] == lines[1]["test_acc1"]
    state = load_checkpoint(out / "checkpoint-last.pth")  # weights_only=True
    assert {"model", "model_cfg", "optimizer", "scaler", "epoch", "iter", "rng", "args", "git_sha",
            "best_acc"} <= set(state)
    assert state["epoch"] == 1 and state["iter"] == 0
    assert isinstance(state["args"], dict) and state["args"]["reinit_blocks"] == 1
    assert state["best_acc"] == max(line["test_acc1"] for line in lines)
    assert state["model_cfg"] == {"name": "vit_small_patch16", "img_size": 32, "patch_size": 8, "embed_dim": 64,
                                  "depth": 4, "num_heads": 4, "num_classes": 3, "drop_path_rate": 0.1,
                                  "global_pool": True}

    run_info = (out / "run_info.json").read_text()
    assert {"args", "git_sha", "command", "world_size", "versions"} <= set(json.loads(run_info))
    console = (out / "console.log").read_text()
    assert "training finished" in console and "best" in console and "wall time" in console
    before = {p.name for p in out.iterdir()}
    monkeypatch.chdir(tmp_path / "data")  # where the user typed the command
    # --eval with the default --output_dir, as the README's line: its own record beside the checkpoint, no
    # ./output_dir, and the training run's run_info.json untouched.
    evaluated = main_finetune.main(parse("--eval", "--resume", str(out / "checkpoint-last.pth"), "--data_path",
                                         str(data), "--num_workers", "0", "--device", "cpu"))
    assert evaluated["acc1"] == lines[1]["test_acc1"]
    assert evaluated["loss"] == pytest.approx(lines[1]["test_loss"])
    assert (out / "run_info.json").read_text() == run_info
    records = [p for p in out.iterdir() if p.name not in before]
    assert len(records) == 1 and records[0].name.startswith("eval_") and records[0].suffix == ".json"
    record = json.loads(records[0].read_text())
    assert record["checkpoint"] == str((out / "checkpoint-last.pth").resolve()) and record["data_path"] == str(data)
    assert record["acc1"] == evaluated["acc1"] and "acc5" in record
    assert not (tmp_path / "data" / "output_dir").exists()

    resumed_out = tmp_path / "resumed"  # the same experiment, one more epoch
    main_finetune.main(parse(*tiny_argv(data, resumed_out, ckpt), "--epochs", "3", "--save_freq", "1",
                             "--reinit_blocks", "1", "--mixup", "0.8", "--cutmix", "1.0", "--resume",
                             str(out / "checkpoint-last.pth"), "--resume_allow_changes", "epochs"))
    assert [json.loads(line)["epoch"] for line in (resumed_out / "log.txt").read_text().splitlines()] == [2]


def test_dist_eval_on_two_processes_equals_one_process(tmp_path):
    """torchrun, 2 gloo processes: train 1 epoch with frozen blocks (DDP without find_unused_parameters), evaluate
    with --dist_eval over 7 val images (one rank gets a padded duplicate); one process must report the same."""
    data = labelled_folder(tmp_path / "data", n_train=16, n_val=7)
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main_finetune.py",
           *tiny_argv(data, out, ckpt), "--dist_eval", "--trainable_blocks", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert logged["test_n"] == 7
    one = main_finetune.main(parse("--eval", "--resume", str(out / "checkpoint-last.pth"), "--data_path", str(data),
                                   "--num_workers", "0", "--output_dir", "", "--log_dir", "", "--batch_size", "4"))
    assert one["n"] == 7 and one["acc1"] == logged["test_acc1"] and one["acc5"] == logged["test_acc5"]
    assert one["loss"] == pytest.approx(logged["test_loss"], rel=1e-5)
    assert "top-1" in result.stdout


def test_digits_demo_split_is_fixed_and_real():
    train, val = DigitsDemo("train", 32), DigitsDemo("val", 32)
    assert (len(train), len(val)) == (1438, 359)
    assert sorted(set(val.targets.tolist())) == list(range(10))
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32) and 0 <= label <= 9
    assert DigitsDemo("val", 32).images.tobytes() == val.images.tobytes()
    assert not set(train.indices) & set(val.indices) and len(set(train.indices) | set(val.indices)) == 1797


def test_randaugment_zero_bit_posterize_gives_black_instead_of_raising():
    image = DigitsDemo("train", 32).image(0)
    assert not posterize_zero_bits_black(image, 0).getbbox()  # all black
    assert posterize_zero_bits_black(image, 2).getbbox()
    transform = finetune_transform(True, 32, aa="rand-m10-n4-inc1")  # magnitude 10 -> posterize keeps 0 bits
    for _ in range(40):
        assert transform(image).shape == (3, 32, 32)


def test_nb_classes_comes_from_the_training_folders(setup, tmp_path, caplog):
    data, ckpt = setup  # 3 class folders
    transform = main_finetune.finetune_transform(False, 32)

    def classes_after(*extra: str) -> int:
        argv = [a for a in tiny_argv(data, tmp_path / "run", ckpt) if a not in ("--nb_classes", "3")]
        args = parse(*argv, *extra)
        main_finetune.resolve_args(args)
        main_finetune.build_datasets(args, transform, transform)
        return args.nb_classes

    assert classes_after() == 3
    with caplog.at_level("WARNING"):
        assert classes_after("--nb_classes", "5") == 5
    assert "training set has 3 class folders" in caplog.text
    with pytest.raises(ValueError, match="--nb_classes 2 is smaller than the 3 classes"):
        classes_after("--nb_classes", "2")


@pytest.mark.parametrize("form", ["safetensors", "hub_dir"])
def test_finetune_from_an_export_takes_architecture_and_input_size_from_it(setup, tmp_path, form):
    """A .safetensors export (model_cfg in its metadata) or a Hub folder fine-tunes with no architecture flag: the
    pre-training sizes and input size (32 px here, not 224) come from the file, and every encoder weight loads."""
    from tools import export_encoder

    data, ckpt = setup
    export = tmp_path / ("enc.safetensors" if form == "safetensors" else "hub")
    export_encoder.export(str(ckpt), str(export) if form == "safetensors" else None,
                          str(export) if form == "hub_dir" else None)
    args = parse(*tiny_argv(data, tmp_path / "out", export))
    checkpoint = main_finetune.resolve_args(args)
    assert (args.input_size, args.patch_size, args.embed_dim, args.depth, args.num_heads) == (32, 8, 64, 4, 4)
    model = main_finetune.build_model(args, checkpoint)
    source = load_checkpoint(ckpt)["model"]
    for key, value in model.state_dict().items():
        if key.startswith(("blocks.", "patch_embed.", "cls_token")):
            assert torch.equal(value, source[key]), key


def test_model_flags_that_contradict_the_checkpoint_are_refused_and_random_init_is_said(setup, tmp_path, caplog):
    data, ckpt = setup
    with pytest.raises(ValueError, match=r"--model vit_base_patch16 does not describe the --finetune checkpoint's "
                                         r"encoder \(vit_small_patch16: patch_size 8, embed_dim 64.*leave these flags"):
        main_finetune.resolve_args(parse(*tiny_argv(data, tmp_path / "out", ckpt), "--model", "vit_base_patch16"))
    with pytest.raises(ValueError, match="differs in depth"):
        main_finetune.resolve_args(parse(*tiny_argv(data, tmp_path / "out", ckpt), "--depth", "2"))
    args = parse(*tiny_argv(data, tmp_path / "out", ckpt), "--model", "vit_small_patch16", "--embed_dim", "64")
    main_finetune.resolve_args(args)  # the checkpoint's own name and size: accepted
    assert (args.model, args.patch_size, args.depth) == ("vit_small_patch16", 8, 4)
    scratch = parse(*tiny_argv(data, tmp_path / "out", ckpt), "--model", "vit_demo_patch4", "--input_size", "32")
    scratch.finetune = ""
    main_finetune.build_model(scratch, main_finetune.resolve_args(scratch))
    assert "no --finetune: the encoder starts from random initialisation" in caplog.text


def test_eval_freq_evaluates_every_nth_and_the_last_epoch(setup, tmp_path):
    data, ckpt = setup
    out = tmp_path / "run"
    main_finetune.main(parse(*tiny_argv(data, out, ckpt), "--epochs", "3", "--eval_freq", "2", "--print_freq", "10"))
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert ["test_acc1" in line for line in lines] == [False, True, True]


def test_evaluation_progress_lines_show_the_weighted_running_value(caplog):
    """Batches of 4 (1 right) and 1 (right): the Test: line shows 40 % (2 of 5) as the final Acc@1, not the mean of
    the batches' accuracies (62.5 %)."""
    images = torch.zeros(5, 2)
    labels = torch.tensor([1, 0, 0, 0, 1])
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))  # always predicts class 1
    with caplog.at_level("INFO"):
        stats = engine_finetune.evaluate(loader, model, torch.device("cpu"))
    assert stats["acc1"] == pytest.approx(40.0)
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Test: [")][-1]
    assert "acc1: 40.000" in last
