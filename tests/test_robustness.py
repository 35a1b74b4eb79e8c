"""Robustness evaluation (analysis/robustness.py, tools/eval_robustness.py): the AlexNet baseline, ImageNet-A/R's
restricted argmax, CE/mCE on an ImageNet-C-shaped folder made with the `imagecorruptions` package against a hand
computation, layouts refused before any model runs, the tool end to end, and exact evaluation on 2 gloo ranks.

Tiny classifiers (32 px, patch 8, width 64) over 10 fake wnids; images are crops of scikit-image's photographs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, write_image_folder
from PIL import Image

import models_vit
from analysis import cli, robustness
from tools import export_encoder
from util.checkpoint import save_atomic
from util.cls_data import eval_transform
from util.datasets import UnreadableImageError

WNIDS = [f"n{9000 + 17 * i:08d}" for i in range(10)]  # not sorted by accident: the file's order is the logit order
A_CLASSES = (2, 5, 7)  # ImageNet-A-shaped folder: 3 of the 10 classes
C_CORRUPTIONS = ("gaussian_noise", "defocus_blur")  # glass_blur and fog fail on current numpy / scikit-image
C_SEVERITIES = (1, 3)
BIG_CLASS, SUBSET_FAVOURITE = 0, 5  # head biases: class 0 (outside A) wins everywhere, class 5 within A's classes
# Hendrycks's published per-corruption AlexNet errors (github.com/hendrycks/robustness, ImageNet-C evaluation).
PUBLISHED_ALEXNET_MEANS = dict(zip(robustness.CORRUPTIONS, (
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572, 0.819324, 0.564592,
    0.853204, 0.646056, 0.717840, 0.606500)))

spec = importlib.util.spec_from_file_location("tool_eval_robustness", ROOT / "tools" / "eval_robustness.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def classifier(seed: int, biased: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models_vit.create_classifier("vit_small_patch16", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                         num_heads=4, num_classes=len(WNIDS))
    torch.nn.init.normal_(model.head.weight)  # varied predictions (MAE's head init is ~0)
    if biased:
        with torch.no_grad():
            model.head.bias[BIG_CLASS] = 1e4
            model.head.bias[SUBSET_FAVOURITE] = 1e3
    return model.eval()


def wnid_folder(root: Path, classes: tuple[int, ...], num_images: int, seed: int) -> Path:
    write_image_folder(root, num_images, size=40, classes=len(classes), seed=seed)
    for k, c in enumerate(classes):
        (root / f"class{k}").rename(root / WNIDS[c])
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("robustness")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for name, model in (("biased", classifier(0, biased=True)), ("plain", classifier(1))):
        save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 9, "args": {}},
                    root / f"{name}.pth")  # as main_finetune.py saves it
    wnid_folder(root / "imagenet_a", A_CLASSES, num_images=7, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # imagecorruptions imports pkg_resources
        from imagecorruptions import corrupt
    clean = sorted(write_image_folder(root / "clean", num_images=5, size=40, classes=1, seed=1).rglob("*.jpg"))
    for i, image in enumerate(clean):
        pixels = np.asarray(Image.open(image).convert("RGB"))
        with torch.no_grad():  # the clean image's class: the plain model's guess for every other image (C errors
            guess = int(classifier(1)(eval_transform(32)(Image.fromarray(pixels))[None]).argmax())  # in (0, 100))
        wnid = WNIDS[(guess + i % 2) % len(WNIDS)]
        for corruption in C_CORRUPTIONS:
            for severity in C_SEVERITIES:
                out = root / "imagenet_c" / corruption / str(severity) / wnid / f"{image.stem}.JPEG"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.uint8(corrupt(pixels, corruption_name=corruption, severity=severity))).save(out)
    return {"root": root, "wnids": root / "wnids.txt", "biased": root / "biased.pth", "plain": root / "plain.pth",
            "a": root / "imagenet_a", "c": root / "imagenet_c"}


def run_tool(files, out: Path, *argv: str) -> dict:
    args = tool.get_args_parser().parse_args(["--train_wnids", str(files["wnids"]), "--device", "cpu",
                                              "--num_workers", "0", "--batch_size", "4", "--output_dir", str(out),
                                              *argv])
    return tool.main(args)


@torch.no_grad()
def logits_by_file(model: torch.nn.Module, folder: Path) -> dict[Path, tuple[torch.Tensor, int]]:
    """The model's logits for every image under folder/<wnid>/, computed here one image at a time."""
    transform = eval_transform(32)
    out = {}
    for path in sorted(folder.glob("*/*")):
        image = transform(Image.open(path).convert("RGB")).unsqueeze(0)
        out[path] = model(image)[0], WNIDS.index(path.parent.name)
    return out


def test_alexnet_rows_average_to_the_published_errors():
    assert list(robustness.ALEXNET_ERRORS) == list(robustness.CORRUPTIONS) == list(PUBLISHED_ALEXNET_MEANS)
    for corruption, row in robustness.ALEXNET_ERRORS.items():
        assert len(row) == 5
        assert sum(row) / 5 == pytest.approx(PUBLISHED_ALEXNET_MEANS[corruption], abs=1e-6), corruption
    assert sum(len(g) for g in robustness.CORRUPTION_GROUPS.values()) == 15


def test_restricted_argmax_runs_over_the_classes_present(files):
    """Class 0 (not in the folder) has the largest logit everywhere: the full argmax is always wrong; restricted to
    the 3 classes present, class 5's bias wins, so exactly the images of class 5 are right."""
    model = classifier(0, biased=True)
    dataset = robustness.build_eval_set({"imagenet_a": files["a"]}, robustness.read_wnids(files["wnids"]))
    dataset.set_input_size(32)
    mask = dataset.class_mask()
    assert mask[0].nonzero().flatten().tolist() == list(A_CLASSES)
    loader, num_real = robustness.make_loader(dataset, 3, 0, "cpu")
    counts = robustness.count_correct([model], loader, mask, "cpu", num_real)
    by_hand = logits_by_file(model, files["a"])
    assert all(int(logits.argmax()) == BIG_CLASS for logits, _ in by_hand.values())
    of_class_5 = sum(label == SUBSET_FAVOURITE for _, label in by_hand.values())
    assert 0 < of_class_5 < len(by_hand) == 7
    assert counts.tolist() == [[[of_class_5, 7]]]  # 1 model, 1 part: (correct, images)
    unrestricted = torch.ones(1, len(WNIDS), dtype=torch.bool)
    assert robustness.count_correct([model], loader, unrestricted, "cpu")[0].tolist() == [[0, 7]]


def test_wnids_from_timm_a_file_or_a_training_folder(files, tmp_path):
    timm_wnids = robustness.read_wnids(None)
    assert len(timm_wnids) == 1000 and timm_wnids == sorted(timm_wnids) and timm_wnids[0] == "n01440764"
    assert robustness.read_wnids(files["wnids"]) == WNIDS  # file order kept
    for wnid in WNIDS:
        (tmp_path / "train" / wnid).mkdir(parents=True)
    assert robustness.read_wnids(tmp_path / "train") == sorted(WNIDS)  # ImageFolder's numbering
    (tmp_path / "twice.txt").write_text("n1\nn2\nn1\n")
    with pytest.raises(ValueError, match=r"--train_wnids .*twice.txt repeats wnids \['n1'\]"):
        robustness.read_wnids(tmp_path / "twice.txt")


def corrupted_layout(files, tmp_path: Path, edit: str) -> tuple[Path, str]:
    """A copy of the ImageNet-C folder with one bad edit; returns it and the path the error must name."""
    c = tmp_path / "c"
    shutil.copytree(files["c"], c)
    if edit == "unknown corruption":
        (c / "gaussian_nois").mkdir()
        return c, str(c / "gaussian_nois")
    if edit == "severity 7":
        shutil.copytree(c / "defocus_blur" / "3", c / "defocus_blur" / "7")
        return c, str(c / "defocus_blur" / "7")
    if edit == "corruption without severities":
        (c / "snow").mkdir()
        return c, str(c / "snow")
    if edit == "unknown wnid":
        next((c / "defocus_blur" / "1").iterdir()).rename(c / "defocus_blur" / "1" / "n99999999")
        return c, str(c / "defocus_blur" / "1" / "n99999999")
    if edit == "class folder without images":
        present = {p.name for p in (c / "gaussian_noise" / "3").iterdir()}
        (c / "gaussian_noise" / "3" / next(w for w in WNIDS if w not in present)).mkdir()
        return c, str(c / "gaussian_noise" / "3")
    (tmp_path / "empty").mkdir()  # "empty folder"
    return tmp_path / "empty", str(tmp_path / "empty")


@pytest.mark.parametrize("edit", ["unknown corruption", "severity 7", "corruption without severities",
                                  "unknown wnid", "class folder without images", "empty folder"])
def test_bad_layouts_fail_naming_the_path_before_any_model_runs(files, tmp_path, monkeypatch, edit):
    monkeypatch.setattr(robustness, "load_classifier", lambda *a, **k: pytest.fail("a model was loaded"))
    folder, named = corrupted_layout(files, tmp_path, edit)
    with pytest.raises(cli.UsageError, match="--imagenet_c") as err:
        run_tool(files, tmp_path / "out", "--ckpt", str(files["plain"]), "--imagenet_c", str(folder))
    assert named in str(err.value)
    if edit == "severity 7":
        assert "1, 2, 3, 4, 5" in str(err.value)
    if edit == "unknown corruption":
        assert "gaussian_noise, shot_noise" in str(err.value)


def test_bad_flags_and_class_counts(files, tmp_path):
    with pytest.raises(cli.UsageError, match="at least one of --imagenet_a"):
        run_tool(files, tmp_path, "--ckpt", str(files["plain"]))
    with pytest.raises(cli.UsageError, match=r"--imagenet_a .*nowhere is not a folder"):
        run_tool(files, tmp_path, "--ckpt", str(files["plain"]), "--imagenet_a", str(tmp_path / "nowhere"))
    args = tool.get_args_parser().parse_args(["--ckpt", str(files["plain"]), "--imagenet_a", str(files["a"]),
                                              "--device", "cpu"])  # timm's 1000 wnids: the fake ones are unknown
    with pytest.raises(cli.UsageError, match=rf"--imagenet_a: {files['a']}/n\d+: .* not one of the classifier's 1000"):
        tool.main(args)
    wide = tmp_path / "wnids11.txt"
    wide.write_text("\n".join([*WNIDS, "n77777777"]))
    with pytest.raises(cli.UsageError, match=r"plain.pth has 10 outputs but the class list .*wnids11.txt.* has 11"):
        run_tool(files, tmp_path, "--ckpt", str(files["plain"]), "--imagenet_a", str(files["a"]), "--train_wnids",
                 str(wide))
    with pytest.raises(cli.UsageError, match="--model .*unknown; known: vit_small_patch16"):
        run_tool(files, tmp_path, "--ckpt", str(files["plain"]), "--imagenet_a", str(files["a"]), "--model", "vit")


def test_tool_end_to_end_ce_and_mce_by_hand(files, tmp_path, capsys):
    data = run_tool(files, tmp_path, "--ckpt", str(files["biased"]), str(files["plain"]), "--names", "B", "P",
                    "--imagenet_a", str(files["a"]), "--imagenet_c", str(files["c"]))
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved == json.loads(json.dumps(data)) and (tmp_path / "robustness.png").stat().st_size > 0
    plain = saved["checkpoints"]["P"]
    # ImageNet-C by hand: the model on every file, the error per corruption and severity, then the formula.
    model = classifier(1)
    ce, some_right_some_wrong = {}, False
    for corruption in C_CORRUPTIONS:
        errors, alexnet = [], []
        for severity in C_SEVERITIES:
            found = logits_by_file(model, files["c"] / corruption / str(severity))
            wrong = sum(int(logits.argmax()) != label for logits, label in found.values())
            errors.append(wrong / len(found))
            some_right_some_wrong = some_right_some_wrong or 0 < wrong < len(found)
            alexnet.append(robustness.ALEXNET_ERRORS[corruption][severity - 1])
            assert plain["imagenet_c"]["images"][corruption][str(severity)] == len(found) == 5
            assert plain["imagenet_c"]["top1_error"][corruption][str(severity)] == pytest.approx(100 * errors[-1])
        ce[corruption] = sum(errors) / sum(alexnet)
        assert plain["imagenet_c"]["ce"][corruption] == pytest.approx(100 * ce[corruption])
    assert plain["imagenet_c"]["mce"] == pytest.approx(100 * sum(ce.values()) / 2) and some_right_some_wrong
    assert not plain["imagenet_c"]["complete"] and "SUBSET: 2 of 15" in plain["imagenet_c"]["coverage"]
    assert plain["imagenet_c"]["severities"] == {c: [1, 3] for c in C_CORRUPTIONS}
    assert len(plain["imagenet_c"]["missing_corruptions"]) == 13
    biased = saved["checkpoints"]["B"]["imagenet_a"]
    of_class_5 = len(list((files["a"] / WNIDS[SUBSET_FAVOURITE]).iterdir()))
    assert biased == {"top1": pytest.approx(100 * of_class_5 / 7), "correct": of_class_5, "images": 7, "classes": 3,
                      "root": str(files["a"])}
    of_class_0 = len(list((files["c"] / "gaussian_noise" / "1").glob(f"{WNIDS[BIG_CLASS]}/*")))
    assert saved["checkpoints"]["B"]["imagenet_c"]["top1_error"]["gaussian_noise"]["1"] == 100 - 20 * of_class_0
    out = capsys.readouterr().out
    assert "IN-A top-1" in out and "IN-C mCE" in out and "defocus_blur" in out and "SUBSET: 2 of 15" in out


def test_an_unreadable_image_is_named(files, tmp_path):
    a = shutil.copytree(files["a"], tmp_path / "a")
    broken = a / WNIDS[A_CLASSES[0]] / "broken.JPEG"
    broken.write_bytes(b"not a JPEG")
    with pytest.raises(UnreadableImageError, match=str(broken)):
        run_tool(files, tmp_path / "out", "--ckpt", str(files["plain"]), "--imagenet_a", str(a))


def test_exports_and_released_weights_load_as_the_same_classifier(files, tmp_path):
    reference = classifier(1)
    export_encoder.export(str(files["plain"]), str(tmp_path / "plain.safetensors"), str(tmp_path / "hub"))
    released = tmp_path / "released.pth"  # weights only, the registry's ViT-S at 32 px
    torch.manual_seed(2)
    registry_size = models_vit.create_classifier("vit_small_patch16", img_size=32, num_classes=10).eval()
    save_atomic({"model": registry_size.state_dict()}, released)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for path in (tmp_path / "plain.safetensors", tmp_path / "hub"):
            torch.testing.assert_close(robustness.load_classifier(path)(x), reference(x))
        torch.testing.assert_close(robustness.load_classifier(released, "vit_small_patch16")(x), registry_size(x))
        bigger = robustness.load_classifier(files["plain"], input_size=48)
        assert robustness.model_input_size(bigger) == 48 and bigger(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="has no 'model_cfg': pass --model"):
        robustness.load_classifier(released)
    encoder = tmp_path / "encoder.safetensors"
    torch.manual_seed(0)
    bare = models_vit.create_classifier("vit_small_patch16", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                        num_heads=4, num_classes=0)
    save_atomic({"model": bare.state_dict(), "model_cfg": bare.config}, tmp_path / "bare.pth")
    export_encoder.export(str(tmp_path / "bare.pth"), str(encoder))
    with pytest.raises(ValueError, match="encoder.safetensors holds no classifier head"):
        robustness.load_classifier(encoder)


def test_two_gloo_ranks_count_exactly_what_one_process_counts(files, tmp_path):
    """7 + 20 images do not split evenly over 2 ranks: DistributedSampler pads one, which must not be counted."""
    flags = ["--ckpt", str(files["plain"]), str(files["biased"]), "--imagenet_a", str(files["a"]), "--imagenet_c",
             str(files["c"]), "--batch_size", "3"]
    one = run_tool(files, tmp_path / "one", *flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tools/eval_robustness.py", *flags, "--train_wnids", str(files["wnids"]), "--device", "cpu",
           "--num_workers", "0", "--output_dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "robustness.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["checkpoints"] == json.loads(json.dumps(one["checkpoints"]))
    assert result.stdout.count("IN-A top-1") == 1  # rank 0 prints the table


# -- linear probes and --amp (issue 24, item 18) -------------------------------------------------------------------


@pytest.mark.parametrize("probe_block", [None, 1])
def test_linear_probes_are_evaluated_with_their_batchnorm_head(files, tmp_path, probe_block):
    torch.manual_seed(5)
    config = dict(name="vit_small_patch16", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                  num_classes=len(WNIDS), drop_path_rate=0.0, global_pool=False, probe_block=probe_block)
    probe = models_vit.build_probe(config)
    with torch.no_grad():  # a trained probe: non-trivial BatchNorm statistics and weights
        probe.head[0].running_mean.normal_()
        probe.head[0].running_var.uniform_(0.5, 2.0)
        torch.nn.init.normal_(probe.head[1].weight)
    probe.eval()
    path = tmp_path / "probe.pth"
    save_atomic({"model": probe.state_dict(), "model_cfg": probe.config, "epoch": 89}, path)  # as main_linprobe
    loaded = robustness.load_classifier(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), probe(x), rtol=0, atol=0)
    assert len(loaded.blocks) == (probe_block or 2)
    data = run_tool(files, tmp_path / "out", "--ckpt", str(path), "--imagenet_a", str(files["a"]))
    expected = logits_by_file(probe, files["a"])
    restricted = [int(max(A_CLASSES, key=lambda c: float(logits[c]))) == label for logits, label in expected.values()]
    assert data["checkpoints"]["probe"]["imagenet_a"]["correct"] == sum(restricted)


def test_amp_runs_the_forward_passes_under_autocast(files, tmp_path, monkeypatch):
    dtypes = []
    real = robustness.load_classifier

    def load_and_watch(*args, **kwargs):
        model = real(*args, **kwargs)
        model.head.register_forward_hook(lambda _module, _inputs, out: dtypes.append(out.dtype))
        return model

    monkeypatch.setattr(robustness, "load_classifier", load_and_watch)
    flags = ["--ckpt", str(files["plain"]), "--imagenet_a", str(files["a"])]
    full = run_tool(files, tmp_path / "fp32", *flags)
    assert set(dtypes) == {torch.float32} and full["amp"] == "none"  # CPU default: no autocast
    dtypes.clear()
    bf16 = run_tool(files, tmp_path / "bf16", *flags, "--amp", "bf16")
    assert set(dtypes) == {torch.bfloat16} and bf16["amp"] == "bf16"
    assert bf16["checkpoints"]["plain"]["imagenet_a"]["images"] == 7
    with pytest.raises(cli.UsageError, match="--amp fp16 needs a CUDA --device"):
        run_tool(files, tmp_path / "fp16", *flags, "--amp", "fp16")
