"""The dataset build at scale, on small data: a build killed with SIGKILL resumes after its last complete shard
(real processes), one build at a time per output folder (a lock, two real processes), an interrupted finish,
bounded read-ahead and decoding, the streamed annotations parser and the report of a very large build.

The 5 GB / 50,000-image measurement (peak RSS, images/s, kill and resume) is bench/data_bench.py's `build`."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ipadapter_jax import locks
from ipadapter_jax.data import annotations, build_report, builder, image_check, shards
from ipadapter_jax.testing import data_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `data build` whose image checks wait, from entry HOLD_FROM on, until the file HOLD_FILE exists.
HELD_BUILD = """
import os, sys, time
from ipadapter_jax.cli import data
from ipadapter_jax.data import builder
hold_from, hold_file = int(sys.argv[1]), sys.argv[2]
check_image = builder.check_image
def held(entry, *args):
    while entry.index >= hold_from and not os.path.exists(hold_file):
        time.sleep(0.02)
    return check_image(entry, *args)
builder.check_image = held
sys.exit(data.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    spec = data_files.make_dataset(root)
    path, _ = builder.build_dataset(spec["json"], spec["root"], os.path.join(root, "reference"), max_skip_fraction=0.5)
    spec["records"] = [dict(r) for r in builder.raw_source(path)]
    return spec


def _argv(spec, out, *extra):
    return ["build", "--json", spec["json"], "--root", spec["root"], "--out", out, "--max-skip-fraction", "0.5",
            "--shard-examples", "2", "--threads", "1", "--no-progress", *extra]  # fmt: skip


def _held(spec, out, hold_from, hold_file):
    return subprocess.Popen([sys.executable, "-c", HELD_BUILD, str(hold_from), hold_file, *_argv(spec, out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(predicate, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _assert_same_records(path, expected):
    source = builder.raw_source(path)
    assert len(source) == len(expected)
    for record, want in zip(source, expected):
        assert record.keys() == want.keys()
        for key in record:
            np.testing.assert_array_equal(record[key], want[key])


@pytest.mark.multiprocess
def test_sigkilled_build_resumes_after_its_last_complete_shard(spec, tmp_path):
    out = str(tmp_path / "out")
    progress = os.path.join(out, ".building-ip_adapter_captions", "progress.jsonl")
    first = _held(spec, out, 8, str(tmp_path / "never"))  # entries 0-7 hold 8 examples: 4 shards of 2
    _wait_for(lambda: os.path.exists(progress) and open(progress).read().count("\n") == 4, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not os.path.exists(builder.dataset_dir(out))
    assert os.path.exists(os.path.join(out, builder.LOCK_NAME))  # left behind by the killed process

    rerun = subprocess.run([sys.executable, "-m", "ipadapter_jax.cli.data", *_argv(spec, out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"took over the stale lock {os.path.join(out, builder.LOCK_NAME)} (pid {first.pid}" in rerun.stderr
    assert "resumed an interrupted build after entry 8" in rerun.stdout
    _assert_same_records(builder.dataset_dir(out), spec["records"])
    with open(os.path.join(out, "build_report.json")) as f:
        report = json.load(f)
    assert {s["index"]: s["reason"] for s in report["skipped_examples"]} == spec["skips"]
    assert report["written"] == 18 and report["status"] == "complete"
    assert sorted(os.listdir(out)) == ["build_report.json", builder.DATASET_NAME]


@pytest.mark.multiprocess
def test_a_second_build_on_the_same_output_fails_at_once(spec, tmp_path):
    out, release = str(tmp_path / "out"), str(tmp_path / "release")
    first = _held(spec, out, 4, release)
    progress = os.path.join(out, ".building-ip_adapter_captions", "progress.jsonl")
    _wait_for(lambda: os.path.exists(progress), first)
    second = subprocess.run([sys.executable, "-m", "ipadapter_jax.cli.data", *_argv(spec, out, "--overwrite")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 1
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {os.path.join(out, builder.LOCK_NAME)}: the folder is locked by pid "
                           f"{first.pid} on ")  # fmt: skip
    open(release, "w").close()
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    _assert_same_records(builder.dataset_dir(out), spec["records"])
    assert not os.path.exists(os.path.join(out, builder.LOCK_NAME))


def test_lock_held_elsewhere_or_by_a_live_process_is_refused(tmp_path, caplog):
    for holder in ({"pid": 1, "host": "another-host"}, {"pid": os.getppid(), "host": socket.gethostname()}):
        (tmp_path / builder.LOCK_NAME).write_text(json.dumps({**holder, "time": "then", "command": "x"}))
        with pytest.raises(locks.LockHeldError, match=f"locked by pid {holder['pid']} on {holder['host']}"):
            locks.acquire(str(tmp_path), builder.LOCK_NAME, "`data build`")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / builder.LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with locks.locked(str(tmp_path), builder.LOCK_NAME, "`data build`") as path:
        assert json.load(open(path))["pid"] == os.getpid()
    assert "took over the stale lock" in caplog.text and not os.path.exists(path)


def test_interrupted_finish_is_completed_by_the_rerun(spec, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    publish = shards.publish
    monkeypatch.setattr(shards, "publish", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, shard_examples=5)
    monkeypatch.setattr(shards, "publish", publish)
    path, report = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, shard_examples=5)
    assert report["resumed_from_entry"] == 31
    _assert_same_records(path, spec["records"])


def test_read_ahead_and_decoding_are_bounded(spec, monkeypatch):
    entries = annotations.scan_annotations(spec["json"]).entries()
    started, ahead = [], []
    check_image = builder.check_image
    monkeypatch.setattr(builder, "check_image", lambda e, *a: started.append(e.index) or check_image(e, *a))
    monkeypatch.setattr(builder, "FILES_IN_FLIGHT_BYTES", 1)  # every file alone
    for checked, _ in builder._checked_in_order(entries, spec["root"], 20.0, 4, lambda ex: b""):
        ahead.append(len(started) - len([s for s in started if s <= checked.entry.index]))
    assert len(ahead) == 31 and max(ahead) == 0

    budget, order = image_check.ByteBudget(10), []

    def hold(name, amount):
        with budget.hold(amount):
            order.append(f"{name}+")
            time.sleep(0.05)
            order.append(f"{name}-")

    threads = [threading.Thread(target=hold, args=(n, a)) for n, a in (("a", 8), ("b", 8), ("c", 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(order[i][0] == order[i + 1][0] for i in range(0, 6, 2))  # each ran alone


def test_annotations_are_streamed_in_small_pieces(tmp_path, monkeypatch):
    items = [{"image_file": f"{i}.png", "text": t} for i, t in enumerate(["a", "café ☃", "x" * 50, "", "a"])]
    items += [123456789, -1.5e10, True, None, [1, [2]], "s", {"image_file": "0.png", "text": "a"}]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n \n", encoding="utf-8")
    whole = annotations.read_annotations(path)
    monkeypatch.setattr(annotations, "_CHUNK", 3)  # every value cut by a chunk boundary somewhere
    streamed = annotations.read_annotations(path)
    assert [(e.index, e.image_file, e.text, e.problem) for e in streamed] == [
        (e.index, e.image_file, e.text, e.problem) for e in whole
    ]
    scan = annotations.scan_annotations(path)
    assert scan.total == 12 and np.flatnonzero(scan.duplicates).tolist() == [11]  # index 4 differs: "a" vs "" file
    assert [e.problem for e in scan.entries(9)] == ["malformed_entry", "malformed_entry", "duplicate"]


def test_a_large_report_is_returned_truncated(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(build_report, "SMALL_REPORT_BYTES", 0)
    monkeypatch.setattr(build_report, "RETURNED_EXAMPLES", 3)
    out = str(tmp_path / "out")
    _, report = builder.build_dataset(spec["json"], spec["root"], out, max_skip_fraction=0.5, shard_examples=3)
    assert report["examples_truncated"] and report["skipped"] == 13 and report["written"] == 18
    assert [s["index"] for s in report["skipped_examples"]] == sorted(spec["skips"])[:3]
    with open(os.path.join(out, "build_report.json")) as f:
        assert len(json.load(f)["skipped_examples"]) == 13
