"""``--threads`` on ``perflow demo``, ``train`` and ``eval``: one shared option."""

from __future__ import annotations

import argparse

import pytest
import torch

from perflow.cli import build_parser, main
from perflow.cli.options import apply_threads


@pytest.mark.parametrize("command", ["demo", "train", "eval"])
def test_threads_is_an_option_of(command):
    args = build_parser().parse_args([command, "--threads", "1"])
    assert args.threads == 1


@pytest.mark.parametrize("argv", [["train", "--config", "digits", "--threads", "0"], ["eval", "--threads", "0"]])
def test_threads_below_one_is_a_one_line_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["perflow %s: error: --threads must be >= 1, got 0" % argv[0]]


def test_apply_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        apply_threads(argparse.Namespace(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_adapt_set_keeps_yaml_words_that_are_strings():
    """``--set mixed_precision=no``: YAML 1.1 would read ``no`` as False; only true/false are booleans."""
    from perflow.cli.transfer import _overrides

    assert _overrides(["mixed_precision=no", "progress=false", "save_ema=True", "batch_size=8"]) == {
        "mixed_precision": "no", "progress": False, "save_ema": True, "batch_size": 8}


def test_window_boundaries_and_a_different_num_time_windows_are_refused():
    from perflow.training.config_io import make_config

    with pytest.raises(ValueError, match="give K = 3 windows but perflow.num_time_windows is 2"):
        make_config(None, {"perflow.num_time_windows": 2, "perflow.window_boundaries": [1.0, 0.6, 0.3, 0.0]})
    cfg = make_config(None, {"perflow.window_boundaries": [1.0, 0.6, 0.3, 0.0]})  # K from the boundaries
    assert cfg.perflow.num_time_windows == 3


def test_an_unknown_lr_scheduler_is_refused_with_the_valid_names():
    from perflow.training.config_io import make_config

    with pytest.raises(ValueError, match="training.lr_scheduler 'foo' is not one of .*'cosine'"):
        make_config(None, {"training.lr_scheduler": "foo"})


def test_prompts_file_lines_and_mistyped_paths(tmp_path):
    """``--prompts FILE``: the file's lines; a missing ``.txt`` path was sampled as the prompt itself."""
    from perflow.cli.options import read_prompts

    f = tmp_path / "p.txt"
    f.write_text("\ufeffa cat\n\n a dog \n", encoding="utf-8")
    assert read_prompts([str(f)]) == ["a cat", "a dog"]
    assert read_prompts(["a cat", "a dog"]) == ["a cat", "a dog"]
    assert read_prompts(["a cat"]) == ["a cat"] and read_prompts(None) is None
    with pytest.raises(ValueError, match="--prompts: no file .*missing.txt"):
        read_prompts([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts([str(tmp_path / "empty.txt")])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
    (["--guidance-scale", "nan"], "--guidance-scale: expected a finite number, got 'nan'"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got '0'"),
])
def test_eval_number_options_are_checked_by_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
