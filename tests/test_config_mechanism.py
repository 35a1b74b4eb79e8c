"""util/config.py, the mechanism behind --config: the command line overrides a file; bad files fail naming the key
and the file; the `--print_config` output is a config that reproduces the same arguments; the global batch derives
--accum_iter. (The files of configs/ are tested in test_configs.py.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from test_configs import CONFIGS, make_parser

import main_pretrain
from util import config


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, "blr: 5.0e-5\nsupervised_blocks: [6, 12]\nnorm_pix_loss: true\nepochs: 300\n")
    args = config.parse_with_config(make_parser("pretrain"),
                                    ["--config", str(path), "--blr", "1e-3", "--supervised_blocks", "8", "12"])
    assert args.blr == 1e-3 and args.supervised_blocks == [8, 12]  # the command line wins
    assert args.norm_pix_loss is True and args.epochs == 300  # the file's values where the command line is silent
    assert args.mask_ratio == 0.75 and args.config == str(path)  # parser defaults where both are silent
    plain = config.parse_with_config(make_parser("pretrain"), [])
    assert plain.blr == 1.5e-4 and plain.norm_pix_loss is False and plain.config is None


def test_yaml_numbers_in_exponent_form_convert_as_on_the_command_line(tmp_path):
    path = write(tmp_path, "blr: 1e-4\nlr: 2.5e-4\nepochs: '7'\nhybrid_alphas: [0, 1e-1]\n")  # YAML: '1e-4' is a str
    values = config.load_config(path, make_parser("pretrain"))
    assert values == {"blr": 1e-4, "lr": 2.5e-4, "epochs": 7, "hybrid_alphas": [0.0, 0.1]}
    assert all(type(v) is float for v in values["hybrid_alphas"])


@pytest.mark.parametrize("text, words", [
    ("blrr: 1.0e-4\n", ["'blrr'", "did you mean 'blr'"]),
    ("epochs: 1.5\n", ["'epochs'", "--epochs", "int"]),
    ("blr: fast\n", ["'blr'", "--blr", "float"]),
    ("norm_pix_loss: 'yes'\n", ["'norm_pix_loss'", "true or false"]),
    ("target: dall_e\n", ["'target'", "must be one of"]),
    ("supervised_blocks: 6\n", ["'supervised_blocks'", "list"]),
    ("output_dir: 3\n", ["'output_dir'", "string"]),
    ("config: other.yaml\n", ["'config'", "cannot be set"]),
    ("- blr\n", ["mapping"]),
])
def test_bad_file_fails_naming_the_key_and_the_file(tmp_path, capsys, text, words):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load_config(path, make_parser("pretrain"))
    for word in [str(path), *words]:
        assert word in str(err.value)
    with pytest.raises(SystemExit) as stop:  # through the parser: exit 2 with the same message, as a bad flag
        config.parse_with_config(make_parser("pretrain"), ["--config", str(path)])
    assert stop.value.code == 2 and str(path) in capsys.readouterr().err


def test_missing_file_and_parser_without_config_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        config.parse_with_config(make_parser("pretrain"), ["--config", str(tmp_path / "none.yaml")])
    assert "none.yaml: no such file" in capsys.readouterr().err
    with pytest.raises(TypeError, match="add_config_args"):
        config.parse_with_config(argparse.ArgumentParser(), [])


def test_print_config_validates_first_and_is_silent_without_the_flag(capsys):
    args = config.parse_with_config(make_parser("pretrain"), ["--print_config", "--epochs", "3"])
    calls = []
    with pytest.raises(SystemExit) as stop:
        config.maybe_print_config(args, calls.append)
    assert stop.value.code == 0 and calls == [args]
    out = capsys.readouterr().out
    assert "epochs: 3\n" in out and "print_config" not in out

    def invalid(_):
        raise ValueError("--epochs must be >= 1")

    with pytest.raises(ValueError, match="--epochs"):
        config.maybe_print_config(args, invalid)
    assert capsys.readouterr().out == ""
    args.print_config = False
    assert config.maybe_print_config(args, invalid) is None


def test_config_yaml_keeps_parser_flags_and_none_values():
    parser = make_parser("pretrain")
    args = config.parse_with_config(parser, [])
    args.gpu = 3  # an attribute a script adds, not a flag
    text = config.config_yaml(args, parser)
    assert "gpu:" not in text and "lr: null" in text and "\nconfig:" not in text
    assert "gpu: 3" in config.config_yaml(args)


@pytest.mark.parametrize("global_batch, batch, world, accum", [
    (4096, 128, 32, 1), (4096, 128, 8, 4), (4096, 64, 8, 8), (1024, 128, 8, 1), (1024, 32, 8, 4),
    (16384, 2048, 8, 1), (16384, 512, 8, 4), (256, 256, 1, 1),
])
def test_derive_accum_iter(global_batch, batch, world, accum):
    assert config.derive_accum_iter(global_batch, batch, world) == accum


@pytest.mark.parametrize("global_batch, batch, world, words", [
    (4096, 96, 8, ["--global_batch_size 4096", "--batch_size 96", "world size 8", "768"]),
    (4096, 128, 3, ["--global_batch_size 4096", "3 processes"]),
    (1024, 2048, 1, ["--batch_size 2048"]),
    (4096, 0, 8, ["--batch_size"]),
    (4096, 128, 0, ["world size"]),
])
def test_derive_accum_iter_refuses_what_does_not_divide(global_batch, batch, world, words):
    with pytest.raises(ValueError) as err:
        config.derive_accum_iter(global_batch, batch, world)
    for word in words:
        assert word in str(err.value)


def test_apply_global_batch_sets_accum_iter_and_refuses_a_contradiction():
    args = argparse.Namespace(global_batch_size=4096, batch_size=128, accum_iter=1)
    config.apply_global_batch(args, world_size=8)
    assert args.accum_iter == 4
    config.apply_global_batch(args, world_size=8)  # idempotent
    assert args.accum_iter == 4
    with pytest.raises(ValueError, match="--accum_iter 2 contradicts --global_batch_size 4096"):
        config.apply_global_batch(argparse.Namespace(global_batch_size=4096, batch_size=128, accum_iter=2), 8)
    untouched = argparse.Namespace(global_batch_size=None, batch_size=128, accum_iter=2)
    config.apply_global_batch(untouched, 8)
    assert untouched.accum_iter == 2


def test_entry_script_prints_its_config_without_data_and_launcher_checks_the_global_batch(tmp_path, capsys):
    """The wiring in the scripts: `--print_config` needs no --data_path; the launcher refuses, before queueing, a
    per-GPU batch that does not divide the config's global batch over its GPUs."""
    import submitit_pretrain

    path = CONFIGS / "pretrain" / "deepmim_vit_base_300e.yaml"
    with pytest.raises(SystemExit) as stop:
        main_pretrain.parse_args(["--config", str(path), "--print_config", "--batch_size", "128"])
    assert stop.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["global_batch_size"] == 4096 and printed["batch_size"] == 128 and printed["norm_pix_loss"]
    data = tmp_path / "images"
    (data / "a").mkdir(parents=True)
    (data / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        submitit_pretrain.parse_args(["--config", str(path), "--data_path", str(data), "--batch_size", "100",
                                      "--nodes", "4", "--ngpus", "8", "--cluster", "local"])
    assert stop.value.code == 2
    assert "--global_batch_size 4096 is not a multiple of --batch_size 100" in capsys.readouterr().err


def printed(capsys, parse, argv) -> dict:
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    out = capsys.readouterr()
    assert stop.value.code == 0, out.err
    return yaml.safe_load(out.out)


def test_print_config_resolves_batch_and_lr_for_the_processes_and_reads_no_file(capsys, monkeypatch):
    """accum_iter and lr are resolved for --nproc (else $WORLD_SIZE, else 1); a batch that does not divide fails as
    the run would; no data folder, checkpoint, teacher or generator file is needed."""
    import main_finetune
    import main_linprobe
    from util import cls_run
    from util.cli import script_parser

    pretrain = CONFIGS / "pretrain" / "deepmim_vit_base_300e.yaml"
    values = printed(capsys, main_pretrain.parse_args,
                     ["--config", str(pretrain), "--print_config", "--batch_size", "128", "--nproc", "8"])
    assert (values["accum_iter"], values["lr"]) == (4, pytest.approx(1.5e-4 * 4096 / 256))
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert printed(capsys, main_pretrain.parse_args,
                   ["--config", str(pretrain), "--print_config", "--batch_size", "128"])["accum_iter"] == 1
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as stop:
        main_pretrain.parse_args(["--config", str(pretrain), "--print_config", "--batch_size", "100"])
    assert stop.value.code == 2 and "--global_batch_size 4096 is not a multiple of --batch_size 100" in \
        capsys.readouterr().err
    for name, extra in (("deepmim_dagger_vit_base_300e.yaml", ["--hybrid_generator", "/nowhere/mae.pth"]),
                        ("ablations/deepmim_vit_base_300e_semantic_aware.yaml",
                         ["--mask_teacher_path", "/nowhere/ViT-B-16.pt"])):
        values = printed(capsys, main_pretrain.parse_args,
                         ["--config", str(CONFIGS / "pretrain" / name), "--print_config", "--batch_size", "64", *extra])
        assert values["accum_iter"] == 64

    def classification(module, *argv):
        parser = script_parser(None, [module.get_args_parser()])
        return printed(capsys, lambda a: cls_run.parse_and_resolve(parser, module.resolve_args, a), list(argv))

    values = classification(main_finetune, "--config", str(CONFIGS / "finetune" / "vit_base_after_300e.yaml"),
                            "--print_config", "--batch_size", "32", "--nproc", "8", "--data_path", "/nowhere",
                            "--finetune", "/nowhere/checkpoint.pth")
    assert values["accum_iter"] == 4 and values["lr"] == pytest.approx(values["blr"] * 1024 / 256)
    assert values["model"] is None  # the --finetune checkpoint's, read when the run starts
    values = classification(main_linprobe, "--config", str(CONFIGS / "linprobe" / "vit_base_90e.yaml"),
                            "--print_config", "--batch_size", "2048", "--nproc", "8")
    assert values["accum_iter"] == 1 and values["lr"] == pytest.approx(6.4)
