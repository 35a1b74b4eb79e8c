"""util/checkpoint resume: refusing another experiment's checkpoint before loading, --resume_allow_changes, mid-epoch
layout changes, GradScaler state across bf16 / fp16, the fine-tuning-ready API, weights_only=True files."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch
from conftest import TINY

import models_deepmim
from util import checkpoint as ckpt
from util import resume

LOGGER = "util.checkpoint"


def run_args(**overrides) -> argparse.Namespace:
    """Flags of a small pre-training run as main_pretrain leaves them before resuming (lr already derived)."""
    flags = dict(model="deepmim_vit_small_patch16", batch_size=4, accum_iter=1, epochs=4, blr=1e-3, lr=1e-3 * 4 / 256,
                 supervised_blocks=[2, 4], loss_weights=None, hybrid_alphas=[0.0, 1.0], target="pixel", seed=0,
                 warmup_epochs=1, output_dir="/runs/a", data_path="/data/imagenet", num_workers=10, device="cuda",
                 amp="bf16", resume="auto", start_epoch=0, print_freq=20, save_every_iters=0, ngpus=8)
    flags.update(overrides)
    return argparse.Namespace(**flags)


def linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def trained(model: torch.nn.Module) -> torch.optim.AdamW:
    """An AdamW that has taken one step, so its state is not empty."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, model.in_features)).sum().backward()
    optimizer.step()
    return optimizer


def scaler(amp: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=amp == "fp16", init_scale=2.0**16)


def saved_state(args: argparse.Namespace, step: int = 0, epoch: int = 1, **changes) -> dict:
    """A checkpoint of `linear(0)` written by `args`; `changes` overrides entries (world_size, rng, ...)."""
    model = linear(0)
    state = ckpt.training_state(model, trained(model), scaler(args.amp), epoch, step, args)
    state.update(changes)
    return state


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not optimizer.state  # nothing loaded into the optimizer either


def restore(state: dict, args: argparse.Namespace, world_size: int = 1, amp: str | None = None):
    """A fresh model / optimizer / scaler restored from `state`; returns (step, model, optimizer, scaler)."""
    model = linear(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grad_scaler = scaler(amp or args.amp)
    step = resume.restore_training_state(state, model, optimizer, grad_scaler, args, path="/runs/a/checkpoint-last.pth",
                                       world_size=world_size)
    return step, model, optimizer, grad_scaler


# -- task 1: another experiment's checkpoint is refused before anything is loaded ------------------------------


def test_changed_hybrid_alphas_refused_naming_flag_and_nothing_loaded():
    state = saved_state(run_args())
    args = run_args(hybrid_alphas=[0.25, 0.75])
    model = linear(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = weights(model)
    with pytest.raises(ValueError) as err:
        resume.restore_training_state(state, model, optimizer, scaler("bf16"), args, path="ckpt.pth", world_size=1)
    message = str(err.value)
    assert "--hybrid_alphas: [0.0, 1.0] -> [0.25, 0.75]" in message
    assert "--output_dir" in message and "--resume_allow_changes hybrid_alphas" in message
    assert_untouched(model, before, optimizer)
    assert args.start_epoch == 0


def test_every_differing_flag_is_listed():
    state = saved_state(run_args())
    args = run_args(loss_weights=[1.0, 2.0], target="hog", epochs=300, seed=1)
    with pytest.raises(ValueError) as err:
        restore(state, args)
    message = str(err.value)
    for line in ("--loss_weights: None -> [1.0, 2.0]", "--target: 'pixel' -> 'hog'", "--epochs: 4 -> 300",
                 "--seed: 0 -> 1"):
        assert line in message
    assert "--resume_allow_changes epochs,loss_weights,target,seed" in message


def test_changed_supervised_blocks_is_named_not_a_load_state_dict_error(tmp_path):
    torch.manual_seed(0)
    old = models_deepmim.create_model("deepmim_vit_small_patch16", supervised_blocks=[2, 4], **TINY)
    old_args = run_args(supervised_blocks=[2, 4])
    ckpt.save_training_checkpoint(ckpt.training_state(old, torch.optim.AdamW(old.parameters()), scaler("bf16"), 0, 0,
                                                      old_args), str(tmp_path), save_freq=1, epochs=4)
    new = models_deepmim.create_model("deepmim_vit_small_patch16", supervised_blocks=[4], **TINY)
    optimizer = torch.optim.AdamW(new.parameters(), lr=1e-3)
    before = weights(new)
    args = run_args(supervised_blocks=[4], output_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        resume.resume_training(new, optimizer, scaler("bf16"), args)
    message = str(err.value)
    assert "--supervised_blocks: [2, 4] -> [4]" in message and "checkpoint-last.pth" in message
    assert "size mismatch" not in message and "state_dict" not in message
    assert_untouched(new, before, optimizer)


def test_allow_list_lets_named_changes_through_and_logs_each(caplog):
    state = saved_state(run_args())
    args = run_args(blr=2e-3, lr=2e-3 * 4 / 256, epochs=8,
                    resume_allow_changes=["--blr", "lr", "epochs", "seed"])  # seed did not change: harmless
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        step, model, optimizer, _ = restore(state, args)
    assert step == 0 and args.start_epoch == 2
    assert torch.equal(model.weight, state["model"]["weight"]) and optimizer.state
    logged = caplog.text
    assert "--blr changed 0.001 -> 0.002" in logged and "--epochs changed 4 -> 8" in logged and "--lr changed" in logged
    assert "seed changed" not in logged


def test_allow_list_as_comma_string_and_partial_allow_still_refuses_the_rest():
    state = saved_state(run_args())
    restore(state, run_args(blr=2e-3, epochs=8, resume_allow_changes="blr,--epochs"))
    with pytest.raises(ValueError, match=r"--epochs: 4 -> 8") as err:
        restore(state, run_args(blr=2e-3, epochs=8, resume_allow_changes=["blr"]))
    assert "--blr" not in str(err.value)


def test_ignored_settings_never_block_and_amp_change_is_logged(caplog):
    state = saved_state(run_args())
    args = run_args(output_dir="/elsewhere", log_dir="/tb", data_path="/moved/imagenet", num_workers=2, device="cpu",
                    amp="fp16", resume="/runs/a/checkpoint-3.pth", print_freq=1, save_every_iters=5, ngpus=4,
                    start_epoch=7)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restore(state, args)
    assert "--amp changed 'bf16' -> 'fp16'" in caplog.text
    assert not resume.changed_settings(state["args"], args)


def test_keys_on_one_side_only_are_not_compared():
    saved = {**vars(run_args()), "removed_flag": 3}
    assert resume.changed_settings(saved, run_args(added_flag=True)) == {}
    assert resume.changed_settings(saved, run_args(seed=5)) == {"seed": (0, 5)}


def test_a_flag_the_checkpoint_lacks_is_compared_with_its_code_default():
    saved = vars(run_args())  # written before --mask_strategy existed
    defaults = {"mask_strategy": "random", "mask_teacher": None, "seed": 0}
    assert resume.changed_settings(saved, run_args(mask_strategy="random", mask_teacher=None), defaults) == {}
    assert resume.changed_settings(saved, run_args(mask_strategy="semantic_aware", mask_teacher="clip"), defaults) == {
        "mask_strategy": ("random", "semantic_aware"), "mask_teacher": (None, "clip")}
    assert resume.changed_settings({**saved, "mask_strategy": "semantic_aware"},
                                   run_args(mask_strategy="semantic_aware"), defaults) == {}
    assert resume.changed_settings(saved, run_args(mask_strategy="semantic_aware")) == {}  # no defaults: not compared


def test_tuples_equal_their_stored_lists_and_finetune_source_compared_only_when_given():
    saved = ckpt.plain_args(run_args(finetune="/ckpt/pretrain.pth"))
    assert resume.changed_settings(saved, run_args(hybrid_alphas=(0.0, 1.0), finetune="")) == {}
    assert "finetune" in resume.changed_settings(saved, run_args(finetune="/ckpt/other.pth"))


def test_allowed_changes_parsing():
    assert resume.allowed_changes(None) == set()
    assert resume.allowed_changes("epochs, --blr") == {"epochs", "blr"}
    assert resume.allowed_changes(["--epochs", "blr,lr"]) == {"epochs", "blr", "lr"}


def test_unknown_allowed_name_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restore(saved_state(run_args()), run_args(resume_allow_changes=["blrr"]))
    assert "'blrr'" in caplog.text


# -- task 2: mid-epoch checkpoints need the same layout -------------------------------------------------------


@pytest.mark.parametrize("saved_changes, current, line", [
    ({"world_size": 2}, {}, "world size (processes): 2 -> 1"),
    ({}, {"batch_size": 8}, "--batch_size: 4 -> 8"),
    ({}, {"accum_iter": 2}, "--accum_iter: 1 -> 2"),
])
def test_mid_epoch_checkpoint_refused_under_another_layout(saved_changes, current, line):
    state = saved_state(run_args(), step=3, **saved_changes)
    allow_all = "world_size,batch_size,accum_iter,lr"  # not overridable
    args = run_args(**current, resume_allow_changes=allow_all)
    model = linear(1)
    optimizer = torch.optim.AdamW(model.parameters())
    before = weights(model)
    with pytest.raises(ValueError) as err:
        resume.restore_training_state(state, model, optimizer, scaler("bf16"), args, world_size=1)
    message = str(err.value)
    assert line in message and "mid-epoch" in message and "checkpoint-<epoch>.pth" in message
    assert "same number of processes" in message
    assert_untouched(model, before, optimizer)


def test_mid_epoch_world_size_of_old_checkpoints_comes_from_their_rng():
    state = saved_state(run_args(), step=3)
    del state["world_size"]
    state["rng"] = state["rng"] * 4
    assert resume.checkpoint_world_size(state) == 4
    with pytest.raises(ValueError, match=r"world size \(processes\): 4 -> 1"):
        restore(state, run_args())


def test_mid_epoch_same_layout_resumes_at_its_step():
    state = saved_state(run_args(), step=3, epoch=2)
    step, model, _, _ = restore(state, run_args(), world_size=1)
    assert step == 3 and torch.equal(model.weight, state["model"]["weight"])


def test_mid_epoch_refusal_names_newest_epoch_end_checkpoint(tmp_path):
    args = run_args(output_dir=str(tmp_path))
    for epoch in (1, 3):
        ckpt.save_training_checkpoint(saved_state(args, epoch=epoch), str(tmp_path), save_freq=1, epochs=10)
    ckpt.save_training_checkpoint(saved_state(args, step=5, epoch=4, world_size=8), str(tmp_path), 1, 10)
    model = linear(1)
    with pytest.raises(ValueError, match=r"checkpoint-3\.pth"):
        resume.resume_training(model, torch.optim.AdamW(model.parameters()), scaler("bf16"), args)


def test_epoch_end_other_world_size_refused_only_through_the_derived_lr(caplog):
    # Decision: an epoch-end checkpoint may continue on another number of processes, but a derived lr then changes
    # (lr = blr x effective batch / 256), which is a result change reported as such; allowed with `lr`.
    state = saved_state(run_args(), world_size=2)  # 2 processes x 4 = effective batch 8
    with pytest.raises(ValueError) as err:
        restore(state, run_args(lr=1e-3 * 4 / 256 / 2), world_size=1)
    assert "--lr:" in str(err.value) and "effective batch" in str(err.value) and "8 -> 4" in str(err.value)
    restore(state, run_args(lr=1e-3 * 4 / 256 / 2, resume_allow_changes=["lr"]), world_size=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):  # --lr given explicitly: allowed, the batch change logged
        step, _, _, _ = restore(state, run_args(), world_size=1)
    assert step == 0 and "effective batch" in caplog.text and "8 -> 4" in caplog.text


# -- task 3: GradScaler state across precisions ---------------------------------------------------------------


def test_bf16_checkpoint_resumes_in_fp16_run_with_fresh_scaler(caplog):
    state = saved_state(run_args(amp="bf16"))
    assert state["scaler"] == {}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, _, _, grad_scaler = restore(state, run_args(amp="fp16"))
    assert grad_scaler.is_enabled() and grad_scaler.get_scale() == 2.0**16
    assert "fresh scaler" in caplog.text


def test_fp16_checkpoint_resumes_in_bf16_run_ignoring_the_scale(caplog):
    model = linear(0)
    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    state = ckpt.training_state(model, trained(model), fp16, 1, 0, run_args(amp="fp16"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, _, _, grad_scaler = restore(state, run_args(amp="bf16"))
    assert not grad_scaler.is_enabled() and "ignoring the checkpoint's grad-scaler state (scale 1024" in caplog.text
    _, _, _, grad_scaler = restore(state, run_args(amp="fp16"))
    assert grad_scaler.get_scale() == 1024.0  # same precision: restored


# -- task 4: fine-tuning-ready pieces, weights_only=True files ------------------------------------------------


def test_checkpoint_files_load_with_weights_only_and_keep_extras(tmp_path):
    model = linear(0)
    state = ckpt.training_state(model, trained(model), scaler("fp16"), 2, 0, run_args(), best_acc=71.5,
                                model_cfg={"name": "linear", "dims": (3, 2)})
    ckpt.save_training_checkpoint(state, str(tmp_path), save_freq=1, epochs=4)
    for name in ("checkpoint-2.pth", "checkpoint-last.pth"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert loaded["best_acc"] == 71.5 and loaded["world_size"] == 1 and loaded["model_cfg"]["name"] == "linear"
        assert isinstance(loaded["args"], dict) and loaded["args"]["hybrid_alphas"] == [0.0, 1.0]


def test_training_state_rejects_unsafe_or_clashing_extras():
    model = linear(0)
    with pytest.raises(TypeError, match="best_acc"):
        ckpt.training_state(model, trained(model), None, 0, 0, run_args(), best_acc=np.float64(1.0))
    with pytest.raises(ValueError, match="iter"):
        ckpt.training_state(model, trained(model), None, 0, 0, run_args(), iter=3)


def test_load_resume_state_and_resume_training(tmp_path, caplog):
    args = run_args(output_dir=str(tmp_path), resume="")
    assert resume.load_resume_state(args) == (None, None)
    args.resume = "auto"
    with caplog.at_level(logging.INFO, logger="util.resume"):
        assert resume.load_resume_state(args) == (None, None)
    assert "no checkpoint" in caplog.text
    model = linear(1)
    assert resume.resume_training(model, torch.optim.AdamW(model.parameters()), scaler("bf16"), args) == 0
    ckpt.save_training_checkpoint(saved_state(args, step=2, epoch=1), str(tmp_path), save_freq=1, epochs=4)
    path, state = resume.load_resume_state(args)
    assert path.name == "checkpoint-last.pth" and state["iter"] == 2
    assert resume.resume_training(model, torch.optim.AdamW(model.parameters()), scaler("bf16"), args) == 2
    assert args.start_epoch == 1 and torch.equal(model.weight, state["model"]["weight"])


def test_restore_without_optimizer_or_checks_for_evaluation():
    state = saved_state(run_args())
    model = linear(1)
    args = run_args(epochs=99, eval=True)
    resume.restore_training_state(state, model, None, None, args, check_args=False)
    assert torch.equal(model.weight, state["model"]["weight"])


def test_other_architecture_without_stored_args_is_a_clear_error():
    state = saved_state(run_args())
    state["args"] = {}  # an old checkpoint without stored flags
    model = torch.nn.Linear(5, 2)
    before = weights(model)
    with pytest.raises(ValueError, match=r"another architecture.*weight: \(2, 3\) stored, \(2, 5\) here"):
        resume.restore_training_state(state, model, None, None, run_args(), path="x.pth")
    assert torch.equal(model.weight, before["weight"])


def test_background_writer_saves_a_copy_taken_at_submit(tmp_path, monkeypatch):
    import threading

    import util.checkpoint as ckpt_module

    weights = torch.zeros(4)
    release = threading.Event()
    original = ckpt_module.save_atomic

    def slow_save(obj, path):
        release.wait(10)  # the disk is slow: training goes on meanwhile
        original(obj, path)

    monkeypatch.setattr(ckpt_module, "save_atomic", slow_save)
    writer = ckpt_module.BackgroundWriter()
    writer.submit({"model": {"w": weights}, "epoch": 0, "iter": 0}, [tmp_path / "checkpoint-last.pth"])
    weights.add_(1)  # the next optimizer step changes the live tensor
    assert not (tmp_path / "checkpoint-last.pth").exists()
    release.set()
    writer.wait()
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")["model"]["w"], torch.zeros(4))


def test_background_writer_reports_a_failed_write(tmp_path, monkeypatch):
    import util.checkpoint as ckpt_module

    def broken_save(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module, "save_atomic", broken_save)
    writer = ckpt_module.BackgroundWriter()
    writer.submit({"epoch": 0, "iter": 0}, [tmp_path / "checkpoint-last.pth"])
    with pytest.raises(RuntimeError, match="disk full"):
        writer.wait()
    writer.wait()  # reported once


def test_atomic_checkpoints_get_the_umask_permissions_of_a_plain_open(tmp_path, monkeypatch):
    import stat

    monkeypatch.setattr(ckpt, "_UMASK", 0o022)
    ckpt.save_atomic({"epoch": 0}, tmp_path / "checkpoint-last.pth")
    assert stat.S_IMODE((tmp_path / "checkpoint-last.pth").stat().st_mode) == 0o644
    monkeypatch.setattr(ckpt, "_UMASK", 0o077)
    ckpt.save_atomic({"epoch": 1}, tmp_path / "checkpoint-last.pth")
    assert stat.S_IMODE((tmp_path / "checkpoint-last.pth").stat().st_mode) == 0o600


def test_a_process_under_umask_022_writes_0644(tmp_path):
    import stat
    import subprocess
    import sys

    from conftest import ROOT

    code = (f"import os, sys; os.umask(0o022); sys.path.insert(0, {str(ROOT)!r}); import util.checkpoint as c; "
            f"c.save_atomic({{'epoch': 0}}, {str(tmp_path / 'ckpt.pth')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert stat.S_IMODE((tmp_path / "ckpt.pth").stat().st_mode) == 0o644


def test_the_same_global_batch_split_otherwise_is_not_a_change():
    saved = {"global_batch_size": 4096, "batch_size": 128, "accum_iter": 1, "blr": 1.5e-4}
    moved = argparse.Namespace(global_batch_size=4096, batch_size=64, accum_iter=4, blr=1.5e-4)
    assert resume.changed_settings(saved, moved) == {}
    other = argparse.Namespace(global_batch_size=2048, batch_size=64, accum_iter=4, blr=1.5e-4)
    assert set(resume.changed_settings(saved, other)) == {"global_batch_size", "batch_size", "accum_iter"}


def test_files_that_are_no_checkpoint_are_named_so_and_weights_only_false_is_never_suggested(tmp_path):
    random_bytes, empty, truncated, pickled = (tmp_path / n for n in ("random.pth", "empty.pth", "cut.pth", "ns.pth"))
    random_bytes.write_bytes(bytes(range(7, 256)) * 20)
    empty.write_bytes(b"")
    ckpt.save_atomic({"model": {"w": torch.zeros(64)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    torch.save({"args": argparse.Namespace(lr=1.0)}, pickled)
    expected = {random_bytes: "is not a PyTorch checkpoint", empty: "it is empty", truncated: "truncated or corrupt",
                pickled: "holds pickled Python objects .* \\(here argparse.Namespace\\)"}
    for path, message in expected.items():
        with pytest.raises(ValueError, match=f"{path}.*{message}") as err:
            ckpt.load_checkpoint(path)
        assert "weights_only=False" not in str(err.value) and "set to `False`" not in str(err.value)


def test_safetensors_files_load_as_checkpoints_with_their_model_cfg(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "enc.safetensors"
    save_file({"pos_embed": torch.ones(1, 5, 4)}, str(path), metadata={"model_cfg": '{"name": "deepmim_x"}'})
    state = ckpt.load_checkpoint(path)
    assert state["model_cfg"] == {"name": "deepmim_x"} and torch.equal(state["model"]["pos_embed"], torch.ones(1, 5, 4))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        ckpt.load_checkpoint(tmp_path / "bad.safetensors")
