"""MAE's `--dist_on_itp` (OpenMPI launches) is accepted by every training script, as MAE treats it: OpenMPI's rank,
world size and local rank become RANK, WORLD_SIZE and LOCAL_RANK; without mpirun's variables the error names them
and what to launch with instead; a resume does not count the flag as a change of experiment (issue 24, item 21)."""

import os

import pytest

import main_finetune
import main_linprobe
import main_pretrain
from util import distributed, resume

OMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*OMPI, *distributed.OMPI_VARIABLES):
        monkeypatch.setenv(name, "0")  # registered, so the teardown restores what the code under test sets
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("script", [main_pretrain, main_finetune, main_linprobe])
def test_every_script_takes_the_flag(script):
    parser = script.get_args_parser()
    assert parser.parse_known_args(["--dist_on_itp"])[0].dist_on_itp is True
    assert parser.parse_known_args([])[0].dist_on_itp is False


def test_openmpi_ranks_become_the_process_group_s(clean_env):
    for name, value in OMPI.items():
        clean_env.setenv(name, value)
    args = main_pretrain.get_args_parser().parse_known_args(["--dist_on_itp", "--local_rank", "3"])[0]
    distributed.apply_legacy_launcher_args(args)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")


def test_without_mpirun_the_error_says_what_is_missing_and_what_to_do(clean_env):
    args = main_finetune.get_args_parser().parse_known_args(["--dist_on_itp"])[0]
    with pytest.raises(ValueError, match="--dist_on_itp reads OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, "
                                         "OMPI_COMM_WORLD_LOCAL_RANK.* launch with torchrun"):
        distributed.apply_legacy_launcher_args(args)
    assert "RANK" not in os.environ
    distributed.apply_legacy_launcher_args(main_finetune.get_args_parser().parse_known_args([])[0])  # flag off: no-op
    assert "RANK" not in os.environ


def test_resume_ignores_the_launch_flag():
    assert resume.changed_settings({"dist_on_itp": False, "blr": 1e-3}, {"dist_on_itp": True, "blr": 1e-3}) == {}
