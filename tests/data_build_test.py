"""The TFDS builder on a generated dataset with broken entries: counts, skip report, stored values, the
skip-fraction limit, interruption safety and the COCO format."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data import builder
from ipadapter_jax.testing import data_files


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    spec = data_files.make_dataset(root)
    out = os.path.join(root, "out")
    path, report = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5)
    return spec, path, report


def test_counts_and_skip_report(built):
    spec, path, report = built
    assert report["status"] == "complete"
    assert report["total"] == spec["total"] == 31
    assert report["written"] == len(spec["written"]) == 18
    assert report["skipped"] == 13
    # Every skipped entry is listed with the expected reason.
    assert {s["index"]: s["reason"] for s in report["skipped_examples"]} == spec["skips"]
    assert report["skip_counts"] == {
        "unreadable_image": 2, "empty_file": 1, "missing_file": 1, "unsupported_mode": 1,
        "extreme_aspect_ratio": 1, "empty_caption": 2, "invalid_caption": 1, "non_utf8_caption": 1,
        "duplicate": 1, "malformed_entry": 2,
    }  # fmt: skip
    non_utf8 = next(s for s in report["skipped_examples"] if s["reason"] == "non_utf8_caption")
    assert non_utf8["text"] == "caf\\xe9 latin-1"  # the bad byte shown escaped
    truncated = next(s for s in report["skipped_examples"] if s["image_file"] == "truncated.jpg")
    assert "truncated" in truncated["detail"]
    assert {c["index"] for c in report["converted_examples"]} == spec["converted"]
    # The report is written next to the dataset and travels inside it.
    for report_path in (os.path.join(path, "..", "..", "build_report.json"), os.path.join(path, "build_report.json")):
        with open(report_path) as f:
            assert json.load(f)["skipped_examples"] == report["skipped_examples"]


def test_records_in_annotation_order_with_stored_values(built):
    spec, path, _ = built
    source = builder.raw_source(path)
    assert len(source) == 18
    with open(spec["json"], "rb") as f:
        entries = json.loads(f.read().decode("utf-8", "surrogateescape"))
    for i, record in enumerate(source):
        index = spec["written"][i]
        assert record["annotation_index"] == index
        assert record["text"].decode() == entries[index]["text"]
        assert record["image_file"].decode() == entries[index]["image_file"]
        image = Image.open(io.BytesIO(record["image"]))
        assert image.mode == "RGB" and image.size == (record["width"], record["height"])
        original = Image.open(os.path.join(spec["root"], entries[index]["image_file"]))
        assert image.size == original.size
        if original.mode in ("RGB", "L", "RGBA", "P", "CMYK"):  # stored pixels = the reference's convert("RGB")
            np.testing.assert_array_equal(np.asarray(image), np.asarray(original.convert("RGB")))
        elif original.mode == "I;16":  # scaled, not clipped: the generator wrote v * 257
            np.testing.assert_array_equal(np.asarray(image)[..., 1], np.asarray(original) // 257)
        else:
            raise AssertionError(f"unexpected mode {original.mode}")
    # 16-bit RGB PNG (PIL decodes it as 8-bit RGB): within one level of the 16-bit values / 257.
    rgb16 = next(r for r in source if r["image_file"] == b"rgb16.png")
    rgb16_values = np.asarray(Image.open(io.BytesIO(rgb16["image"])), np.float64)
    original16 = _read_png_rgb16_high_bytes(os.path.join(spec["root"], "rgb16.png"))
    assert np.max(np.abs(rgb16_values - original16)) <= 1


def _read_png_rgb16_high_bytes(path: str) -> np.ndarray:
    """The 16-bit samples / 257 of a PNG written by `write_png_rgb16` (one IDAT chunk, filter 0)."""
    import struct
    import zlib

    data = open(path, "rb").read()
    width, height = struct.unpack(">II", data[16:24])
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + idat_len])
    rows = [np.frombuffer(raw[r * (1 + 6 * width) + 1 : (r + 1) * (1 + 6 * width)], ">u2") for r in range(height)]
    return np.stack(rows).reshape(height, width, 3) / 257.0


def test_fails_past_max_skip_fraction_and_publishes_nothing(built, tmp_path):
    spec, _, _ = built
    out = str(tmp_path / "out")
    with pytest.raises(builder.BuildError, match="13 of 31|more than"):
        builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.2)
    assert not os.path.exists(builder.dataset_dir(out))
    assert not [n for n in os.listdir(out) if n.startswith(".building-")]
    with open(os.path.join(out, "build_report.json")) as f:
        report = json.load(f)
    assert report["status"] == "failed" and report["skipped"] > 0.2 * 31


def test_interrupted_rebuild_keeps_old_dataset_and_restarts_clean(built, tmp_path, monkeypatch):
    spec, _, _ = built
    out = str(tmp_path / "out")
    path, _ = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5)
    before = [dict(r) for r in builder.raw_source(path)]

    calls = []
    check_image = builder.check_image

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return check_image(*args)

    monkeypatch.setattr(builder, "check_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, num_threads=1, overwrite=True)
    monkeypatch.setattr(builder, "check_image", check_image)
    # The published dataset is untouched and no partial build is left behind.
    _assert_same_records(builder.raw_source(path), before)
    assert sorted(os.listdir(out)) == ["build_report.json", builder.DATASET_NAME]
    with open(os.path.join(out, "build_report.json")) as f:
        assert json.load(f)["status"] == "interrupted"
    # A clean restart gives the uninterrupted result.
    path, report = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, overwrite=True)
    assert report["status"] == "complete"
    _assert_same_records(builder.raw_source(path), before)
    with pytest.raises(FileExistsError):
        builder.build_dataset(spec["json"], spec["root"], out)


def _assert_same_records(source, expected):
    assert len(source) == len(expected)
    for record, want in zip(source, expected):
        assert record.keys() == want.keys()
        for key in record:
            np.testing.assert_array_equal(record[key], want[key])


def test_coco_captions_format(built, tmp_path):
    spec, _, _ = built
    coco = {
        "images": [{"id": 10, "file_name": "good_0.png"}, {"id": 11, "file_name": "cmyk.jpg"},
                   {"id": 12, "file_name": "zero.png"}],
        "annotations": [
            {"id": 1, "image_id": 10, "caption": "first caption"},
            {"id": 2, "image_id": 10, "caption": "second caption of the same image"},
            {"id": 3, "image_id": 11, "caption": "a cmyk image"},
            {"id": 4, "image_id": 99, "caption": "no such image"},
            {"id": 5, "image_id": 12, "caption": "an empty file"},
            {"id": 6, "image_id": 11, "caption": ""},
        ],
    }  # fmt: skip
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(coco))
    out, report = builder.build_dataset(path, spec["root"], tmp_path / "out", max_skip_fraction=0.5)
    assert report["written"] == 3
    assert {s["index"]: s["reason"] for s in report["skipped_examples"]} == {
        3: "unknown_image_id",
        4: "empty_file",
        5: "empty_caption",
    }
    source = builder.raw_source(out)
    assert [r["text"].decode() for r in source] == ["first caption", "second caption of the same image", "a cmyk image"]
    assert [r["image_file"].decode() for r in source] == ["good_0.png", "good_0.png", "cmyk.jpg"]
