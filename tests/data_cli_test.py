"""`ipadapter-jax data build` (ipadapter_jax.cli.data.main) and `python -m ipadapter_jax.cli.data`: the build,
its usage errors (exit 2) and one-line runtime errors (exit 1). Kill-and-resume and the lock, through the
command in real processes: data_build_scale_test.py."""

import os
import subprocess
import sys

import pytest

from ipadapter_jax.cli import data as data_cli
from ipadapter_jax.data import builder
from ipadapter_jax.testing import data_files


def test_build_command(tmp_path, capsys):
    spec = data_files.make_dataset(str(tmp_path))
    out = str(tmp_path / "out")
    argv = ["build", "--json", spec["json"], "--root", spec["root"], "--out", out]
    # 13 of 31 entries are bad: the default limit (5%) fails the build and publishes nothing.
    assert data_cli.main(argv) == 1
    assert "more than max_skip_fraction=0.05" in capsys.readouterr().err
    assert not os.path.exists(builder.dataset_dir(out))

    assert data_cli.main([*argv, "--max-skip-fraction", "0.5", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"dataset: {builder.dataset_dir(out)}" in printed
    assert "written: 18" in printed and "skipped: 13" in printed and "missing_file: 1" in printed
    assert len(builder.raw_source(builder.dataset_dir(out))) == 18

    assert data_cli.main([*argv, "--max-skip-fraction", "0.5"]) == 1  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert data_cli.main([*argv, "--max-skip-fraction", "0.5", "--overwrite"]) == 0


def test_module_entry_point():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "ipadapter_jax.cli.data", "build", "--help"], cwd=repo, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--max-skip-fraction" in result.stdout


@pytest.mark.parametrize(
    "flag, value",
    [("--max-aspect-ratio", "0"), ("--max-aspect-ratio", "0.5"), ("--max-aspect-ratio", "inf"),
     ("--max-skip-fraction", "-0.1"), ("--max-skip-fraction", "2"), ("--max-skip-fraction", "nan"),
     ("--threads", "0"), ("--shard-examples", "0"), ("--shard-mib", "-1")],
)  # fmt: skip
def test_invalid_limits_are_usage_errors(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    argv = ["build", "--json", "c.json", "--root", "images", "--out", str(out), flag, value]
    assert data_cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ipadapter-jax data build: argument ") and flag in line
    assert not out.exists()


def test_bad_annotations_are_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    for content, message in (("not json", "not valid JSON"), ("[]", "nothing could be written")):
        path = tmp_path / "captions.json"
        path.write_text(content)
        argv = ["build", "--json", str(path), "--root", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
        assert data_cli.main(argv) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {path}: ") and message in line
