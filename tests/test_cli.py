"""The command line every script shares (util/cli.py): user errors as one line and status 2, --help with defaults."""

from __future__ import annotations

import pytest

import main_finetune
import main_linprobe
import main_pretrain
from util.cli import script_parser, user_errors


def test_a_value_error_becomes_one_line_on_stderr_and_status_2(capsys):
    with pytest.raises(SystemExit) as stop:
        with user_errors("main_x.py"):
            raise ValueError("--batch_size 8 x 1 processes exceeds the 6 training images")
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err == "main_x.py: error: --batch_size 8 x 1 processes exceeds the 6 training images\n"
    with pytest.raises(RuntimeError):  # not a user error: its traceback stays
        with user_errors("main_x.py"):
            raise RuntimeError("a bug")


@pytest.mark.parametrize("module, flag, default", [
    (main_finetune, "--layer_decay", "0.75"), (main_linprobe, "--blr", "0.1"), (main_pretrain, "--mask_ratio", "0.75"),
])
def test_help_shows_the_defaults_and_what_demo_sets(module, flag, default):
    text = " ".join(script_parser(module.__doc__, [module.get_args_parser()]).format_help().split())
    own_help = text.rsplit(f"{flag} ", 1)[1].split(" --", 1)[0]  # the options section comes after the usage line
    assert f"(default: {default})" in own_help
    assert "DEMO_SETTINGS" not in text
    if module is main_pretrain:
        demo_help = text.rsplit("--demo ", 1)[1].split("--model", 1)[1]
        assert demo_help.startswith(" deepmim_vit_demo_patch4 --input_size 32") and "--norm_pix_loss" in demo_help
