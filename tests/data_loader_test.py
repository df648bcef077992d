"""The grain loader: epoch order, process shards, resume, worker processes and global arrays."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data import builder, loader, preprocess
from ipadapter_jax.testing import data_files
from ipadapter_jax.training import encode

NUM_RECORDS = 18


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    spec = data_files.make_dataset(root)
    path, _ = builder.build_dataset(spec["json"], spec["root"], os.path.join(root, "out"), max_skip_fraction=0.5)
    tokenizer = data_files.tiny_clip_tokenizer(os.path.join(root, "tokenizer"))
    dataset = loader.open_dataset(
        path, preprocess.Preprocessor([tokenizer], resolution=32, clip=preprocess.ClipPreprocessing.default(24))
    )
    assert len(dataset.source) == NUM_RECORDS and not dataset.cached
    return dataset


def _run(data, steps, **kwargs):
    it = loader.DataIterator(data, num_threads=2, **kwargs)
    return [next(it) for _ in range(steps)], it


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_batch_contents(data):
    (batch,), _ = _run(data, 1, global_batch_size=4, seed=0)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "pixel_values": ((4, 32, 32, 3), np.float32),
        "clip_pixel_values": ((4, 24, 24, 3), np.float32),
        "input_ids": ((4, 77), np.int32),
        "original_size": ((4, 2), np.int32),
        "crop_top_left": ((4, 2), np.int32),
        "target_size": ((4, 2), np.int32),
        "index": ((4,), np.int32),
        "drop_image": ((4,), np.bool_),
        "drop_text": ((4,), np.bool_),
    }
    # Each row is the preprocessed record it names.
    for row, index in enumerate(batch["index"]):
        expected = data.example_fn(data.source[int(index)])
        for key, value in expected.items():
            np.testing.assert_array_equal(batch[key][row], value)


def test_epoch_order_is_a_seeded_permutation(data):
    batches, it = _run(data, 6, global_batch_size=6, seed=5, num_epochs=2)
    with pytest.raises(StopIteration):  # 2 epochs * 18 records / 6 = 6 steps
        next(it)
    order = np.concatenate([b["index"] for b in batches])
    epochs = order.reshape(2, NUM_RECORDS)
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_RECORDS))
    assert (epochs[0] != epochs[1]).any()  # reshuffled every epoch
    # Identical for the same seed, different for another seed.
    again, _ = _run(data, 6, global_batch_size=6, seed=5)
    _assert_batches_equal(batches, again)
    other, _ = _run(data, 3, global_batch_size=6, seed=6)
    assert (np.concatenate([b["index"] for b in other]) != epochs[0]).any()
    # Condition-drop flags are the (seed, index, epoch) draws.
    for position, (index, drop_image, drop_text) in enumerate(
        zip(order, *(np.concatenate([b[k] for b in batches]) for k in ("drop_image", "drop_text")))
    ):
        assert (drop_image, drop_text) == preprocess.condition_drop(5, int(index), position // NUM_RECORDS)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_complete(data, process_count):
    steps, global_batch = 9, 8  # 72 positions = 4 epochs of 18 records
    single, _ = _run(data, steps, global_batch_size=global_batch, seed=1)
    local = global_batch // process_count
    records_at = {}  # global position -> record read there, over all processes
    for p in range(process_count):
        batches, _ = _run(
            data, steps, global_batch_size=global_batch, seed=1, process_index=p, process_count=process_count
        )
        for step, batch in enumerate(batches):
            assert len(batch["index"]) == local
            # Process p's rows are block p of the global batch, identical to the single-process run.
            block = {k: v[p * local : (p + 1) * local] for k, v in single[step].items()}
            _assert_batches_equal([batch], [block])
            for row, index in enumerate(batch["index"]):
                position = step * global_batch + p * local + row
                assert position not in records_at
                records_at[position] = int(index)
    assert sorted(records_at) == list(range(steps * global_batch))  # every position read exactly once
    for epoch in range(4):  # within an epoch no two processes read the same record
        records = [records_at[epoch * NUM_RECORDS + k] for k in range(NUM_RECORDS)]
        assert sorted(records) == list(range(NUM_RECORDS))


def test_resume_equals_uninterrupted_run(data, tmp_path):
    import orbax.checkpoint as ocp

    uninterrupted, _ = _run(data, 8, global_batch_size=4, seed=3)
    first, it = _run(data, 3, global_batch_size=4, seed=3)
    # The state goes through an orbax checkpoint as the training loop will save it.
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
        manager.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        state = manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    assert state == {"step": 3, "seed": 3, "global_batch_size": 4, "num_records": NUM_RECORDS}
    resumed = loader.DataIterator(data, global_batch_size=4, seed=3, num_threads=2)
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(5)]
    _assert_batches_equal(first + rest, uninterrupted)
    assert resumed.get_state()["step"] == 8
    # The state is process-independent: two processes' states resume a one-process run.
    halves = []
    for p in range(2):
        _, it = _run(data, 3, global_batch_size=4, seed=3, process_index=p, process_count=2)
        halves.append(it.get_state())
    assert halves[0] == halves[1] == state
    # Resuming an iterator in the middle of its own run rewinds it exactly.
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(5)], rest)


def test_set_state_rejects_a_different_run(data):
    it = loader.DataIterator(data, global_batch_size=4, seed=3)
    with pytest.raises(ValueError, match="seed"):
        it.set_state({"step": 2, "seed": 4, "global_batch_size": 4, "num_records": NUM_RECORDS})


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data):
    expected, _ = _run(data, 4, global_batch_size=4, seed=2)
    it = loader.DataIterator(data, global_batch_size=4, seed=2, num_threads=1, worker_count=2)
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    it.close()
    it.set_state(state)  # restart the workers mid-run
    got += [next(it) for _ in range(2)]
    it.close()
    _assert_batches_equal(got, expected)


def test_global_arrays_with_named_sharding(data):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch_size = 2 * len(jax.devices())
    expected, _ = _run(data, 2, global_batch_size=batch_size, seed=0)
    got, _ = _run(data, 2, global_batch_size=batch_size, seed=0, sharding=sharding)
    for batch in got:
        for value in batch.values():
            assert isinstance(value, jax.Array) and value.sharding == sharding
    _assert_batches_equal(got, expected)


@pytest.mark.parametrize("threads", [0, 5])
def test_threads_outside_the_prefetch_buffer_are_one_clear_error(data, threads):
    with pytest.raises(
        ValueError, match=rf"num_threads must be between 1 and prefetch_buffer_size \(4\), got {threads}"
    ):
        loader.DataIterator(data, global_batch_size=4, seed=0, num_threads=threads, prefetch_buffer_size=4)


def test_random_crop_batches_carry_their_sdxl_time_ids(data):
    """crop='random' (tutorial_train_sdxl.py): each row is its stored image resized and cropped at the offsets the
    row reports, which reach SDXL's time ids as [orig h, orig w, top, left, 32, 32]; the offsets change by epoch."""
    random_crop = dataclasses.replace(data, example_fn=dataclasses.replace(data.example_fn, crop="random"))
    batches, _ = _run(random_crop, 2 * NUM_RECORDS // 6, global_batch_size=6, seed=0)  # two epochs
    offsets = {}
    for batch in batches:
        time_ids = np.asarray(encode.sdxl_time_ids(batch))
        for row, index in enumerate(batch["index"]):
            image = preprocess.decode_rgb(data.source[int(index)]["image"])
            w, h = image.size
            size = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)
            resized = np.asarray(image.resize(size, Image.BILINEAR)).astype(np.float32) / 127.5 - 1
            top, left = (int(v) for v in batch["crop_top_left"][row])
            assert 0 <= top <= size[1] - 32 and 0 <= left <= size[0] - 32
            np.testing.assert_array_equal(batch["pixel_values"][row], resized[top : top + 32, left : left + 32])
            assert time_ids[row].tolist() == [h, w, top, left, 32, 32]
            offsets.setdefault(int(index), []).append((top, left))
    assert len(offsets) == NUM_RECORDS and all(len(v) == 2 for v in offsets.values())
    assert any(a != b for a, b in offsets.values())  # a new crop each epoch
