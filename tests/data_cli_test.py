"""`ipadapter-jax data build` (ipadapter_jax.cli.data.main) and `python -m ipadapter_jax.cli.data`."""

import os
import subprocess
import sys

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
