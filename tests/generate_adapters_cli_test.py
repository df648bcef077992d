"""`generate`'s per-adapter flags and JSON settings file: bad input is one `error:` line with exit status 2, found
before any model is loaded. (Runs that generate: `multi_adapter_test.py` and `pipeline_requests_test.py`.)"""

from __future__ import annotations

import json

import pytest

from ipadapter_jax.cli import generate as generate_cli


@pytest.mark.parametrize(
    "flags, settings, message",
    [
        (["--adapter", "a.bin", "--image", "x.png", "--scale", "1", "--scale", "2"], None,
         "--scale given twice for adapter 0; one per --adapter"),
        (["--adapter", "a.bin", "--image", "x.png", "--adapter", "b.bin"], None, "adapter 1 (b.bin) has no --image"),
        (["--adapter", "a.bin", "--image", "x.png", "--mask", "m.png", "--mask", "n.png"], None,
         "adapter 0 (a.bin): 2 --mask for 1 --image; one per image"),
        (["--image", "x.png"], None, "adapter 0 (no file): --image/--scale/... given but no --adapter FILE"),
        (["--adapter", "a.bin", "--image", "x.png", "--embeds-scaling", "K+V"], None,
         "argument --embeds-scaling: invalid choice: 'K+V'"),
        ([], {"adapters": [{"adapter": "a.bin", "image": "x.png", "steps": 3}]},
         "unknown key 'steps' at an 'adapters' entry"),
        ([], {"adapters": [{"adapter": "a.bin", "image": "x.png"}], "stepz": 3},
         "unknown key 'stepz' at the top level"),
        ([], {"adapter": "a.bin", "image": "x.png", "scale": "nan"}, "--scale must be a finite number"),
        ([], [1, 2], "must hold a JSON object, got list"),
    ],
)  # fmt: skip
def test_bad_adapter_flags_and_settings_are_one_usage_error(tmp_path, capsys, flags, settings, message):
    argv = ["--base", str(tmp_path), "--image-encoder", str(tmp_path), *flags]
    if settings is not None:
        (tmp_path / "settings.json").write_text(json.dumps(settings))
        argv += ["--settings", str(tmp_path / "settings.json")]
    assert generate_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
