"""The `adclr` command's error policy: every sub-command answers a user mistake with one line and a non-zero exit."""
from __future__ import annotations

import pytest

from adclr.cli import COMMANDS, main
from adclr.errors import ADCLRError, CheckpointError, InvalidSettingError, MissingFileError

TINY_TRAIN = ["--arch", "test_vit", "--img-size", "32", "--out-dim", "16", "--head-hidden-dim", "16",
              "--head-bottleneck-dim", "8", "--epochs", "1"]


@pytest.fixture
def truncated(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"PK\x03\x04 half a zip file")
    return path


def mistakes(tmp_path, truncated) -> dict[str, list[list[str]]]:
    """Per sub-command: argument lists a new user might plausibly type wrong."""
    missing = str(tmp_path / "no-such-folder")
    return {
        "demo": [["--samples", missing, "--out", str(tmp_path / "d")]],
        "features": [["image.png", "--model", "no_such_model_name"], ["image.png", "--model", f"local-dir:{missing}"]],
        "train": [["--data", missing, "--output", str(tmp_path / "run"), *TINY_TRAIN],
                  ["--data", missing, "--batch-size", "0"]],
        "export": [[str(truncated), "--out", str(tmp_path / "e")], [missing + ".pth", "--out", str(tmp_path / "e")]],
        "convert": [[missing + ".pth", "--arch", "adclr_vit_small", "--out", str(tmp_path / "c")]],
        "publish": [[missing, "--repo", "org/name"]],
        "verify": [["adclr_vit_tiny.no-such-tag"]],
        "eval": [["knn", "--model", str(truncated)], ["knn", "--model", "no_such_model_name"],
                 ["knn", "--model", "test_vit", "--batch-size", "0"],
                 ["knn", "--model", "test_vit", "--data", missing]],
    }


def test_every_sub_command_reports_a_user_mistake_in_one_line(tmp_path, truncated, capsys, monkeypatch):
    monkeypatch.delenv("ADCLR_DEBUG", raising=False)
    cases = mistakes(tmp_path, truncated)
    assert set(COMMANDS) - set(cases) == {"models"}  # takes no arguments: see the argparse test below
    for command, argument_lists in cases.items():
        for arguments in argument_lists:
            assert main([command, *arguments]) == 2, (command, arguments)
            err = capsys.readouterr().err
            assert err.startswith(f"adclr {command}: error: ") and err.count("\n") == 1, err
            assert "Traceback" not in err


def test_the_line_names_the_problem_and_the_fix(tmp_path, truncated, capsys):
    main(["eval", "knn", "--model", str(truncated)])
    assert "not a readable training checkpoint" in capsys.readouterr().err
    main(["eval", "knn", "--model", "no_such_model_name"])
    err = capsys.readouterr().err
    assert "unknown model 'no_such_model_name'" in err and "adclr models" in err
    main(["eval", "knn", "--model", "test_vit", "--batch-size", "0"])
    assert "--batch-size 0" in capsys.readouterr().err
    main(["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run"), *TINY_TRAIN])
    assert "does not exist" in capsys.readouterr().err


def test_adclr_debug_shows_the_traceback(truncated, monkeypatch):
    monkeypatch.setenv("ADCLR_DEBUG", "1")
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        main(["export", str(truncated), "--out", "unused"])


def test_argument_errors_stay_argparse_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "unexpected"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_errors_also_are_the_matching_builtins():
    assert issubclass(InvalidSettingError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(CheckpointError, RuntimeError)
    assert all(issubclass(e, ADCLRError) for e in (InvalidSettingError, MissingFileError, CheckpointError))
