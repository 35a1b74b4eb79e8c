"""configs/: every experiment file loads against its script's parser, resolves, validates and builds its model (on
the meta device); the paper's numbers, typed in here from Appendix A and Tabs. 2, 7-11 and 12, match the files. (The
mechanism, util/config.py, is tested in test_config_mechanism.py.)"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from conftest import ROOT, TINY, write_image_folder

import main_detection
import main_finetune
import main_linprobe
import main_pretrain
import main_segmentation
import models_deepmim
from targets.hog import hog_dim
from targets.tokenizers import VQKD_VOCAB
from util import config
from util.checkpoint import save_atomic

CONFIGS = ROOT / "configs"
MODULES = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_linprobe,
           "segmentation": main_segmentation, "detection": main_detection}
ALL_FILES = sorted(CONFIGS.rglob("*.yaml"))
PRETRAIN_FILES = [p for p in ALL_FILES if p.relative_to(CONFIGS).parts[0] == "pretrain"]
CLASSIFY_FILES = [p for p in ALL_FILES if p.relative_to(CONFIGS).parts[0] in ("finetune", "linprobe")]
# Paths belong on the command line, never in an experiment file.
PATH_KEYS = ("data_path", "output_dir", "log_dir", "finetune", "resume", "teacher_path", "hybrid_generator",
             "mask_teacher_path")


def rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def kind_of(path: Path) -> str:
    return path.relative_to(CONFIGS).parts[0]


def make_parser(kind: str) -> argparse.ArgumentParser:
    """The entry script's full parser with --config / --print_config / --global_batch_size (added here until the
    entry scripts add them themselves)."""
    parser = argparse.ArgumentParser(f"main_{kind}.py", parents=[MODULES[kind].get_args_parser()])
    flags = config.flag_actions(parser)
    if "config" not in flags:
        config.add_config_args(parser)
    if "global_batch_size" not in flags:
        config.add_global_batch_arg(parser)
    return parser


def file_values(path: Path) -> dict[str, Any]:
    return config.load_config(path, make_parser(kind_of(path)))


# ------------------------------------------------------------------------------------------------------------------
# The paper, typed in (not read from the configs)
# ------------------------------------------------------------------------------------------------------------------

# Appendix A, pre-training ("the same training recipe of MAE"): batch 4096, base lr 1.5e-4, 40 warm-up epochs,
# AdamW weight decay 0.05, mask ratio 75 %; ViT-B/16 at 224 px (Sec. 5); MAE's normalised-pixel loss.
PAPER_PRETRAIN = dict(global_batch_size=4096, blr=1.5e-4, warmup_epochs=40, weight_decay=0.05, mask_ratio=0.75,
                      input_size=224, norm_pix_loss=True)
DEEPMIM_BLOCKS = (6, 8, 10, 12)  # Sec. 3
DEEPMIM_DECODER_DEPTH, MAE_DECODER_DEPTH = 4, 8  # Sec. 3 / Fig. 2; Sec. 5.2 "Training Complexity"
DAGGER_ALPHAS = (0.0, 1 / 3, 2 / 3, 1.0)  # Sec. 3, Tab. 9 config 4


class Experiment(NamedTuple):
    """A pre-training row of the paper: method, supervised blocks, epochs, target, alphas, shared decoder, masking."""

    method: str  # "mae" or "deepmim"
    blocks: tuple[int, ...]
    epochs: int
    target: str = "pixel"
    alphas: tuple[float, ...] | None = None  # None: no hybrid targets (alpha 1 everywhere)
    shared: bool = False
    masking: str = "random"  # Tab. 12: --mask_strategy


def _tab8(*inter: int) -> Experiment:
    return Experiment("deepmim", (*inter, 12), 300)


PAPER_EXPERIMENTS = {
    # Tab. 2 and Tab. 7 (main results)
    "pretrain/mae_vit_base_300e.yaml": Experiment("mae", (12,), 300),
    "pretrain/mae_vit_base_1600e.yaml": Experiment("mae", (12,), 1600),
    "pretrain/deepmim_vit_base_300e.yaml": Experiment("deepmim", DEEPMIM_BLOCKS, 300),
    "pretrain/deepmim_vit_base_800e.yaml": Experiment("deepmim", DEEPMIM_BLOCKS, 800),  # Appendix A
    "pretrain/deepmim_vit_base_1600e.yaml": Experiment("deepmim", DEEPMIM_BLOCKS, 1600),
    "pretrain/deepmim_dagger_vit_base_300e.yaml": Experiment("deepmim", DEEPMIM_BLOCKS, 300, alphas=DAGGER_ALPHAS),
    "pretrain/deepmim_dagger_vit_base_1600e.yaml": Experiment("deepmim", DEEPMIM_BLOCKS, 1600, alphas=DAGGER_ALPHAS),
    "pretrain/mae_clip_vit_base_1600e.yaml": Experiment("mae", (12,), 1600, "clip"),
    "pretrain/deepmim_clip_vit_base_1600e.yaml": Experiment("deepmim", DEEPMIM_BLOCKS, 1600, "clip"),
    # Tab. 11 (300 epochs; CLIP also Tab. 2)
    **{f"pretrain/{m}_{t}_vit_base_300e.yaml": Experiment(m, (12,) if m == "mae" else DEEPMIM_BLOCKS, 300, t)
       for m in ("mae", "deepmim") for t in ("hog", "dino", "clip", "codebook")},
    # Tab. 8 (deep supervision, 300 epochs, no hybrid targets)
    "pretrain/ablations/deepmim_vit_base_300e_blocks_6_12.yaml": _tab8(6),
    "pretrain/ablations/deepmim_vit_base_300e_blocks_8_12.yaml": _tab8(8),
    "pretrain/ablations/deepmim_vit_base_300e_blocks_9_12.yaml": _tab8(9),
    "pretrain/ablations/deepmim_vit_base_300e_blocks_6_9_12.yaml": _tab8(6, 9),
    "pretrain/ablations/deepmim_vit_base_300e_blocks_8_10_12.yaml": _tab8(8, 10),
    "pretrain/ablations/deepmim_vit_base_300e_blocks_3_6_9_12.yaml": _tab8(3, 6, 9),
    "pretrain/ablations/deepmim_vit_base_300e_blocks_4_6_8_12.yaml": _tab8(4, 6, 8),
    # Tab. 9 (blending ratios)
    "pretrain/ablations/deepmim_dagger_vit_base_300e_alpha_0_0_0_1.yaml":
        Experiment("deepmim", DEEPMIM_BLOCKS, 300, alphas=(0.0, 0.0, 0.0, 1.0)),
    "pretrain/ablations/deepmim_dagger_vit_base_300e_alpha_half.yaml":
        Experiment("deepmim", DEEPMIM_BLOCKS, 300, alphas=(0.5, 0.5, 0.5, 0.5)),
    # Tab. 10 (shared decoder)
    "pretrain/ablations/deepmim_vit_base_300e_shared_decoder_blocks_6_12.yaml":
        Experiment("deepmim", (6, 12), 300, shared=True),
    "pretrain/ablations/deepmim_vit_base_300e_shared_decoder.yaml":
        Experiment("deepmim", DEEPMIM_BLOCKS, 300, shared=True),
    # Tab. 12 (masking strategies, Appendix B): semantic-aware masking (MILAN [23]), 82.9 and 83.8
    "pretrain/ablations/mae_vit_base_300e_semantic_aware.yaml":
        Experiment("mae", (12,), 300, masking="semantic_aware"),
    "pretrain/ablations/deepmim_vit_base_300e_semantic_aware.yaml":
        Experiment("deepmim", DEEPMIM_BLOCKS, 300, masking="semantic_aware"),
}

# Every row of the ablation tables (300-epoch pixel pre-training), as (blocks, alphas, shared decoder).
TAB8_BLOCK_SETS = [(12,), (6, 12), (8, 12), (9, 12), (6, 9, 12), (8, 10, 12), (3, 6, 9, 12), (4, 6, 8, 12),
                   (6, 8, 10, 12)]
TAB9_ALPHAS = {1: (1.0, 1.0, 1.0, 1.0), 2: (0.0, 0.0, 0.0, 1.0), 3: (0.5, 0.5, 0.5, 0.5), 4: (0.0, 1 / 3, 2 / 3, 1.0)}
TAB10_ROWS = [((6, 12), True), ((6, 12), False), ((6, 8, 10, 12), True), ((6, 8, 10, 12), False)]
TAB11_TARGETS = ("pixel", "hog", "dino", "codebook", "clip")  # codebook: BEiT v2's VQ-KD stands in for PeCo's

# Appendix A, fine-tuning: 100 epochs, batch 1024, ABSOLUTE lr 2e-4 (pixel/HOG/DINO/Codebook) and 4e-4 (CLIP), 5 warm-up
# epochs, layer decay 0.65 after 300-epoch and 0.6 after 800-epoch pre-training, drop path 0.1, RandAugment,
# smoothing 0.1, Mixup 0.8, CutMix 1.0; MAE's recipe otherwise (AdamW wd 0.05, random erasing 0.25).
PAPER_FT_LR = {"pixel": 2e-4, "hog": 2e-4, "dino": 2e-4, "codebook": 2e-4, "clip": 4e-4}
PAPER_FT_LAYER_DECAY = {300: 0.65, 800: 0.6, 1600: 0.6}
PAPER_FINETUNE = dict(epochs=100, global_batch_size=1024, warmup_epochs=5, drop_path=0.1, smoothing=0.1, mixup=0.8,
                      cutmix=1.0, aa="rand-m9-mstd0.5-inc1", weight_decay=0.05, reprob=0.25, dist_eval=True)
FINETUNE_FILES = {  # file: (the targets it fine-tunes after, pre-training epochs)
    "finetune/vit_base_after_300e.yaml": (("pixel", "hog", "dino", "codebook"), 300),
    "finetune/vit_base_after_800e_1600e.yaml": (("pixel",), 1600),
    "finetune/vit_base_clip_after_300e.yaml": (("clip",), 300),
    "finetune/vit_base_clip_after_1600e.yaml": (("clip",), 1600),
}
# MAE's linear probing (the paper keeps it): LARS, base lr 0.1, batch 16384, 90 epochs, 10 warm-up, no weight decay.
PAPER_LINPROBE = dict(blr=0.1, global_batch_size=16384, epochs=90, warmup_epochs=10, weight_decay=0.0)


def effective_alphas(values: dict[str, Any], blocks: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(values["hybrid_alphas"]) if values.get("hybrid_alphas") else (1.0,) * len(blocks)


# ------------------------------------------------------------------------------------------------------------------
# Every file
# ------------------------------------------------------------------------------------------------------------------


def test_the_folder_holds_every_kind_of_experiment():
    assert {kind_of(p) for p in ALL_FILES} == set(MODULES)
    assert {rel(p) for p in PRETRAIN_FILES} == set(PAPER_EXPERIMENTS)
    assert {rel(p) for p in ALL_FILES if kind_of(p) == "finetune"} == set(FINETUNE_FILES)


@pytest.mark.parametrize("path", ALL_FILES, ids=rel)
def test_file_has_only_known_keys_no_paths_and_a_comment_on_every_value(path):
    values = file_values(path)  # raises ConfigError on an unknown key or a bad value
    assert values and not set(values) & set(PATH_KEYS)
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.match(r"^\w+: \S.* # \S", line), f"{rel(path)}: value without a comment citing its source: {line}"


def test_configs_readme_lists_every_file_with_its_command():
    readme = (CONFIGS / "README.md").read_text()
    for path in ALL_FILES:
        assert f"configs/{rel(path)}" in readme, rel(path)
    for kind in MODULES:
        assert f"main_{kind}.py --config configs/{kind}/" in readme


def pretrain_argv(path: Path, tmp_path: Path, values: dict[str, Any]) -> list[str]:
    """--config plus the paths a user gives: an image folder, and a generator / teacher file when needed."""
    argv = ["--config", str(path), "--data_path", str(write_image_folder(tmp_path / "images", 2))]
    if any(a != 1 for a in values.get("hybrid_alphas") or ()):
        generator = tmp_path / "mae_full.pth"  # what validation reads of it: the MAE's geometry (ViT-B/16, 224 px)
        torch.save({"model": {}, "model_cfg": {"name": "mae_vit_base_patch16", "img_size": 224}}, generator)
        argv += ["--hybrid_generator", str(generator)]
    if values["target"] in ("clip", "dino", "codebook"):
        teacher = tmp_path / "teacher.pt"
        teacher.write_bytes(b"")
        argv += ["--teacher_path", str(teacher)]
    elif values.get("mask_strategy") == "semantic_aware":
        teacher = tmp_path / "mask_teacher.pt"
        teacher.write_bytes(b"")
        argv += ["--mask_teacher_path", str(teacher)]
    return argv


def resolve_pretrain(argv: list[str]) -> argparse.Namespace:
    parser = make_parser("pretrain")
    args = main_pretrain.resolve_args(config.parse_with_config(parser, argv), parser)
    main_pretrain.validate_args(args)
    return args


def print_config(args: argparse.Namespace, kind: str, validate, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        config.maybe_print_config(args, validate, make_parser(kind))
    assert stop.value.code == 0
    return capsys.readouterr().out


def assert_round_trip(args: argparse.Namespace, text: str, tmp_path: Path, resolve) -> None:
    """Feeding the printed YAML back through --config gives identical resolved arguments."""
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    again = resolve(["--config", str(printed)])
    def run(ns: argparse.Namespace) -> dict[str, Any]:
        return {k: v for k, v in vars(ns).items() if k not in ("config", "print_config")}

    assert run(again) == run(args)


@pytest.mark.parametrize("path", PRETRAIN_FILES, ids=rel)
def test_pretrain_config_resolves_validates_round_trips_and_builds_what_it_claims(path, tmp_path, capsys):
    values = file_values(path)
    args = resolve_pretrain([*pretrain_argv(path, tmp_path, values), "--print_config"])
    for key, value in values.items():
        assert getattr(args, key) == value, key

    text = print_config(args, "pretrain", main_pretrain.validate_args, capsys)
    assert "print_config" not in text and "\nconfig:" not in text
    assert_round_trip(args, text, tmp_path, resolve_pretrain)

    pred_dim = {"pixel": None, "hog": hog_dim(16), "codebook": VQKD_VOCAB}.get(args.target, 768)  # else: its file's
    loss_type = {"clip": "cosine", "dino": "cosine", "codebook": "cross_entropy"}.get(args.target, "mse")
    with torch.device("meta"):
        model = main_pretrain.build_model(args, pred_dim, loss_type)
    assert next(model.parameters()).is_meta
    assert model.config["name"] == values["model"] and model.patch_size == 16 and model.depth == 12
    assert model.supervised_blocks == tuple(values["supervised_blocks"])
    blocks = values["supervised_blocks"]
    taps = [models_deepmim.SHARED_KEY] if values.get("shared_decoder") else [str(b) for b in blocks]
    assert list(model.decoders) == taps
    assert all(len(d.blocks) == values["decoder_depth"] for d in model.decoders.values())


@pytest.mark.parametrize("path", [p for p in PRETRAIN_FILES if "dagger" in p.name or "clip" in p.name
                                  or "dino" in p.name or "codebook" in p.name or "semantic" in p.name], ids=rel)
def test_pretrain_config_names_the_file_it_needs(path, tmp_path):
    """DeepMIM-dagger files need --hybrid_generator, teacher targets --teacher_path, semantic-aware masking
    --mask_teacher_path: validation says so."""
    data = write_image_folder(tmp_path / "images", 2)
    parser = make_parser("pretrain")
    args = main_pretrain.resolve_args(config.parse_with_config(parser, ["--config", str(path), "--data_path",
                                                                        str(data)]), parser)
    flag = "--hybrid_generator" if "dagger" in path.name else "--mask_teacher_path" if "semantic" in path.name \
        else "--teacher_path"
    with pytest.raises(ValueError, match=flag):
        main_pretrain.validate_args(args)


@pytest.fixture(scope="module")
def classification_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """train/ and val/ image folders and a tiny pre-training checkpoint (its model_cfg sets the architecture)."""
    root = tmp_path_factory.mktemp("cls")
    for split in ("train", "val"):
        write_image_folder(root / "data" / split, 4, size=40, classes=2)
    model = models_deepmim.create_model("deepmim_vit_small_patch16", **TINY)
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 0, "args": {}}, root / "pre.pth")
    return root / "data", root / "pre.pth"


@pytest.mark.parametrize("path", CLASSIFY_FILES, ids=rel)
def test_classification_config_resolves_validates_and_round_trips(path, classification_inputs, tmp_path, capsys):
    kind = kind_of(path)
    module = MODULES[kind]
    data, ckpt = classification_inputs

    def resolve(argv: list[str]) -> argparse.Namespace:
        args = config.parse_with_config(make_parser(kind), [*argv, "--data_path", str(data), "--finetune", str(ckpt)])
        module.resolve_args(args)
        return args

    args = resolve(["--config", str(path), "--print_config"])
    for key, value in file_values(path).items():
        assert getattr(args, key) == value, key
    assert args.model == "vit_small_patch16" and args.depth == 4  # the architecture comes from the checkpoint
    text = print_config(args, kind, lambda a: None, capsys)
    assert_round_trip(args, text, tmp_path, resolve)


# ------------------------------------------------------------------------------------------------------------------
# The paper's numbers
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_EXPERIMENTS))
def test_pretrain_files_hold_the_papers_numbers(name):
    values = file_values(CONFIGS / name)
    exp = PAPER_EXPERIMENTS[name]
    for key, expected in PAPER_PRETRAIN.items():
        assert values[key] == expected, f"{name}: {key}"
    assert values["model"] == f"{exp.method}_vit_base_patch16"
    assert values["decoder_depth"] == (MAE_DECODER_DEPTH if exp.method == "mae" else DEEPMIM_DECODER_DEPTH)
    assert tuple(values["supervised_blocks"]) == exp.blocks
    assert values["epochs"] == exp.epochs and values["target"] == exp.target
    assert bool(values.get("shared_decoder")) == exp.shared
    assert values.get("mask_strategy", "random") == exp.masking
    alphas = effective_alphas(values, exp.blocks)
    assert alphas == pytest.approx(exp.alphas or (1.0,) * len(exp.blocks), abs=1e-15)


def ablation_rows() -> list[tuple[tuple[int, ...], tuple[float, ...], bool]]:
    """(blocks, alphas, shared) of every 300-epoch pixel pre-training file with random masking."""
    rows = []
    for path in PRETRAIN_FILES:
        values = file_values(path)
        random_masks = values.get("mask_strategy", "random") == "random"
        if values["epochs"] == 300 and values["target"] == "pixel" and random_masks:
            blocks = tuple(values["supervised_blocks"])
            rows.append((blocks, effective_alphas(values, blocks), bool(values.get("shared_decoder"))))
    return rows


def test_every_row_of_tables_8_9_and_10_has_a_file():
    rows = ablation_rows()
    for blocks in TAB8_BLOCK_SETS:  # independent decoders, no hybrid targets
        assert (blocks, (1.0,) * len(blocks), False) in rows, f"Tab. 8 row {blocks}"
    for config_id, alphas in TAB9_ALPHAS.items():
        assert any(b == DEEPMIM_BLOCKS and not s and all(math.isclose(x, y, abs_tol=1e-15) for x, y in zip(a, alphas))
                   for b, a, s in rows), f"Tab. 9 config {config_id}"
    for blocks, shared in TAB10_ROWS:
        assert (blocks, (1.0,) * len(blocks), shared) in rows, f"Tab. 10 row {blocks} shared={shared}"


def test_every_target_of_table_11_has_an_mae_and_a_deepmim_file():
    found = {(file_values(p)["model"], file_values(p)["target"]) for p in PRETRAIN_FILES
             if file_values(p)["epochs"] == 300}
    for target in TAB11_TARGETS:
        assert {("mae_vit_base_patch16", target), ("deepmim_vit_base_patch16", target)} <= found, target
    fine_tuned = {t for targets, epochs in FINETUNE_FILES.values() if epochs == 300 for t in targets}
    assert set(TAB11_TARGETS) <= fine_tuned  # and a fine-tuning file with Appendix A's lr for each


@pytest.mark.parametrize("name", sorted(FINETUNE_FILES))
def test_finetune_files_hold_appendix_a(name):
    values = file_values(CONFIGS / name)
    targets, pretrain_epochs = FINETUNE_FILES[name]
    for key, expected in PAPER_FINETUNE.items():
        assert values[key] == expected, f"{name}: {key}"
    absolute_lr = values["blr"] * values["global_batch_size"] / 256  # MAE: lr = blr x batch / 256
    for target in targets:
        assert math.isclose(absolute_lr, PAPER_FT_LR[target], rel_tol=1e-12), f"{name}: lr {absolute_lr} ({target})"
    assert values["layer_decay"] == PAPER_FT_LAYER_DECAY[pretrain_epochs]


def test_linprobe_file_holds_maes_recipe():
    values = file_values(CONFIGS / "linprobe/vit_base_90e.yaml")
    for key, expected in PAPER_LINPROBE.items():
        assert values[key] == expected, key
