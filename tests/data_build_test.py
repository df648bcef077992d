"""The TFDS builder on a generated dataset with broken entries: counts, skip report, stored values, the
skip-fraction limit, interruption safety and resumption, several shards, the COCO format and the edge cases
(no entries, nothing written, not JSON, paths outside the root, invalid limits). Killed builds, the output lock
and memory: data_build_scale_test.py."""

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
    with pytest.raises(builder.BuildError, match="13 of 31|more than") as err:
        builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.2)
    assert spec["json"] in str(err.value)
    assert not os.path.exists(builder.dataset_dir(out))
    assert not [n for n in os.listdir(out) if n.startswith(".building-")]
    with open(os.path.join(out, "build_report.json")) as f:
        report = json.load(f)
    assert report["status"] == "failed" and report["skipped"] > 0.2 * 31


def test_interrupted_rebuild_keeps_old_dataset_and_resumes(built, tmp_path, monkeypatch):
    spec, _, _ = built
    out = str(tmp_path / "out")
    path, _ = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5)
    before = [dict(r) for r in builder.raw_source(path)]

    calls = []
    check_image = builder.check_image

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return check_image(*args)

    monkeypatch.setattr(builder, "check_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, num_threads=1, overwrite=True,
                              shard_examples=3)  # fmt: skip
    monkeypatch.setattr(builder, "check_image", check_image)
    # The published dataset is untouched; the partial build stays for the next run, which resumes it.
    _assert_same_records(builder.raw_source(path), before)
    assert sorted(os.listdir(out)) == [".building-ip_adapter_captions", "build_report.json", builder.DATASET_NAME]
    with open(os.path.join(out, "build_report.json")) as f:
        assert json.load(f)["status"] == "interrupted"
    calls.clear()
    monkeypatch.setattr(builder, "check_image", lambda *args: calls.append(1) or check_image(*args))
    path, report = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, overwrite=True,
                                         shard_examples=3)  # fmt: skip
    assert report["status"] == "complete" and report["resumed_from_entry"] == 6  # 2 shards of 3 were complete
    assert len(calls) == 31 - 6 - 7  # only the entries after the complete shards (7 fail without their image)
    _assert_same_records(builder.raw_source(path), before)
    assert {s["index"]: s["reason"] for s in report["skipped_examples"]} == spec["skips"]
    assert sorted(os.listdir(out)) == ["build_report.json", builder.DATASET_NAME]
    with pytest.raises(FileExistsError):
        builder.build_dataset(spec["json"], spec["root"], out)


def test_several_shards_hold_the_same_records(built, tmp_path):
    spec, path, _ = built
    out = str(tmp_path / "out")
    sharded, report = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, shard_examples=4)
    names = sorted(n for n in os.listdir(sharded) if ".array_record-" in n)
    assert names == [f"ip_adapter_captions-train.array_record-{i:05d}-of-00005" for i in range(5)]
    with open(os.path.join(sharded, "dataset_info.json")) as f:
        info = json.load(f)
    assert info["splits"][0]["shardLengths"] == ["4", "4", "4", "4", "2"] and info["disableShuffling"]
    for name in ("features.json",):
        with open(os.path.join(sharded, name)) as a, open(os.path.join(path, name)) as b:
            assert a.read() == b.read()
    _assert_same_records(builder.raw_source(sharded), [dict(r) for r in builder.raw_source(path)])
    assert report["written"] == 18 and not os.path.exists(os.path.join(out, ".building-ip_adapter_captions"))


def test_resume_with_other_settings_is_refused_or_starts_over(built, tmp_path, monkeypatch):
    spec, path, _ = built
    out = str(tmp_path / "out")
    check_image = builder.check_image
    monkeypatch.setattr(builder, "check_image", lambda e, *a: _interrupt_at(e, 20) or check_image(e, *a))
    with pytest.raises(KeyboardInterrupt):
        builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, num_threads=1, shard_examples=2)
    monkeypatch.setattr(builder, "check_image", check_image)
    with pytest.raises(ValueError, match="other settings \\(changed: shard_examples\\).*--overwrite"):
        builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, shard_examples=3)
    _, report = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, shard_examples=3,
                                      overwrite=True)  # fmt: skip
    assert report["resumed_from_entry"] == 0 and report["written"] == 18


def _interrupt_at(entry, index):
    if entry.index == index:
        raise KeyboardInterrupt


def test_no_entries_is_one_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    for name, content in (("empty.json", "[]"), ("coco.json", '{"images": [], "annotations": []}')):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(builder.BuildError, match="nothing could be written") as err:
            builder.build_dataset(path, tmp_path / "images", tmp_path / "out", max_skip_fraction=1.0)
        assert str(path) in str(err.value)
        assert not os.path.exists(builder.dataset_dir(tmp_path / "out"))


def test_every_entry_skipped_is_one_clear_error(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps([{"image_file": f"{i}.png", "text": "missing"} for i in range(3)]))
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    with pytest.raises(builder.BuildError, match="nothing could be written: all 3 entries were skipped") as err:
        builder.build_dataset(path, tmp_path / "images", out, max_skip_fraction=1.0)
    assert str(path) in str(err.value) and "missing_file: 3" in str(err.value)
    assert not os.path.exists(builder.dataset_dir(out)) and not [n for n in os.listdir(out) if "building" in n]
    with open(out / "build_report.json") as f:
        assert json.load(f)["status"] == "failed"


def test_captions_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("1.png\tA dog\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        builder.build_dataset(path, tmp_path / "images", tmp_path / "out")


def test_paths_outside_the_root_are_skipped(built, tmp_path):
    spec, _, _ = built
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside = os.path.join(spec["root"], "good_0.png")
    (root / "ok.png").write_bytes(open(inside, "rb").read())
    (tmp_path / "secret.png").write_bytes(open(inside, "rb").read())  # exists, but outside the root
    entries = [{"image_file": "ok.png", "text": "inside"}, {"image_file": str(tmp_path / "secret.png"), "text": "abs"},
               {"image_file": "../secret.png", "text": "up"}, {"image_file": "sub/../../secret.png", "text": "up2"},
               {"image_file": "sub/../ok.png", "text": "inside, normalised"}]  # fmt: skip
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(entries))
    out, report = builder.build_dataset(path, root, tmp_path / "out", max_skip_fraction=0.8)
    assert {s["index"]: s["reason"] for s in report["skipped_examples"]} == {1: "outside_root", 2: "outside_root",
                                                                              3: "outside_root"}  # fmt: skip
    assert "outside_root" in report["skip_reasons"] and "outside_root" in builder.SKIP_REASONS
    assert [r["text"].decode() for r in builder.raw_source(out)] == ["inside", "inside, normalised"]


@pytest.mark.parametrize(
    "limits",
    [{"max_aspect_ratio": 0}, {"max_aspect_ratio": 0.5}, {"max_aspect_ratio": float("nan")},
     {"max_skip_fraction": -0.1}, {"max_skip_fraction": 1.5}, {"max_skip_fraction": float("inf")},
     {"num_threads": 0}, {"shard_examples": 0}],
)  # fmt: skip
def test_invalid_limits_are_refused(built, tmp_path, limits):
    spec, _, _ = built
    with pytest.raises(ValueError, match=next(iter(limits))):
        builder.build_dataset(spec["json"], spec["root"], tmp_path / "out", **limits)
    assert not os.path.exists(tmp_path / "out")


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
