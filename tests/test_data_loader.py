"""Loader order, per-process slices, flips, state save/restore, workers and the pixel path."""

import gzip

import jax
import numpy as np
import pytest

from udit_jax.data import loader as loader_lib
from udit_jax.data.loader import ImageTable, Loader


def index_table(n: int, size: int = 4) -> ImageTable:
    """Image i is an asymmetric pattern whose top-left pixel is i (n <= 256), label i % 7."""
    images = np.zeros((n, size, size, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return ImageTable(images, np.arange(n) % 7, num_classes=7)


def decode(batch) -> tuple[list[int], list[bool]]:
    """(record ids, flipped?) of an ImageTable batch, read back from the pixels."""
    pixels = np.rint((batch["image"][..., 0] + 1) * 127.5).astype(int)
    flipped = pixels[:, 0, -1] != 0
    ids = np.where(flipped, pixels[:, 0, -1], pixels[:, 0, 0])
    flipped &= pixels[:, 0, 0] == 0  # record 0 looks the same both ways; call it unflipped
    return ids.tolist(), flipped.tolist()


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


def ids_of(batches):
    return [i for b in batches for i in decode(b)[0]]


def make(n=20, batch=4, seed=0, **kw):
    return Loader(index_table(n), global_batch_size=batch, seed=seed, num_threads=2, **kw)


def test_same_seed_same_order_and_each_epoch_is_a_permutation():
    n, batch = 20, 4
    first = ids_of(take(make(n, batch), 3 * n // batch))
    assert first == ids_of(take(make(n, batch), 3 * n // batch))
    epochs = [first[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n)), "every example exactly once per epoch"
    assert epochs[0] != epochs[1] != epochs[2], "each epoch is shuffled anew"
    assert epochs[0] != list(range(n))
    assert ids_of(take(make(n, batch, seed=1), n // batch)) != epochs[0]


def test_epochs_need_not_align_with_batches():
    n, batch = 10, 4  # 10 % 4 != 0: batches straddle epochs
    stream = ids_of(take(make(n, batch), 5))
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))


def test_labels_and_flips_travel_with_examples():
    batches = take(make(40, 8), 10)
    flips = []
    for b in batches:
        ids, flipped = decode(b)
        assert b["label"].tolist() == [i % 7 for i in ids]
        assert b["image"].dtype == np.float32 and b["image"].min() == -1.0
        flips += flipped
    assert 0.3 < np.mean(flips) < 0.7, "about half the examples are mirrored"
    no_flip = Loader(index_table(40), global_batch_size=8, seed=0, random_flip=False)
    assert not any(f for b in take(no_flip, 10) for f in decode(b)[1])


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_see_disjoint_complete_slices(processes):
    n, batch, steps = 24, 8, 6
    single = take(make(n, batch), steps)
    per_process = [take(make(n, batch, process_index=p, process_count=processes), steps)
                   for p in range(processes)]
    for step in range(steps):
        parts = [decode(per_process[p][step])[0] for p in range(processes)]
        assert all(len(part) == batch // processes for part in parts)
        union = [i for part in parts for i in part]
        assert len(set(union)) == batch, "disjoint"
        assert union == decode(single[step])[0], "together exactly the global batch"


def test_restoring_state_yields_the_exact_next_batch():
    reference = make(30, 6)
    take(reference, 4)
    state = reference.get_state()
    expected = take(reference, 3)
    assert state == {"version": 1, "examples_seen": 24, "seed": 0, "num_examples": 30}

    restored = make(30, 6)
    next(restored)  # state is replaced, not added to
    restored.set_state(state)
    got = take(restored, 3)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_restoring_with_other_process_count_and_batch_size_continues_the_stream():
    reference = make(30, 6)
    take(reference, 4)
    state = reference.get_state()
    expected = ids_of(take(reference, 4))  # the next 24 stream positions
    pieces = []
    for p in range(3):
        loader = make(30, 12, process_index=p, process_count=3)
        loader.set_state(state)
        pieces.append([decode(b)[0] for b in take(loader, 2)])
    continued = [i for step in range(2) for p in range(3) for i in pieces[p][step]]
    assert continued == expected


def test_state_from_other_seed_or_data_is_refused():
    loader = make(30, 6)
    state = loader.get_state()
    with pytest.raises(ValueError, match="same data and seed"):
        make(31, 6).set_state(state)
    with pytest.raises(ValueError, match="same data and seed"):
        make(30, 6, seed=3).set_state(state)


def test_bad_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        make(30, 8, process_index=0, process_count=3)


def test_worker_processes_give_the_same_batches():
    expected = take(make(40, 8), 6)
    with_workers = make(40, 8, num_workers=2)
    try:
        got = take(with_workers, 6)
    finally:
        with_workers.close()
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_example_order_depends_only_on_positions():
    whole, whole_flips = loader_lib.example_order(np.arange(0, 35), 10, seed=4)
    records, flips = loader_lib.example_order(np.arange(5, 35), 10, seed=4)
    np.testing.assert_array_equal(records, whole[5:])
    np.testing.assert_array_equal(flips, whole_flips[5:])
    assert sorted(records[5:15]) == list(range(10))  # positions 10..19: epoch 1


def test_sample_latents_is_mean_plus_std_times_noise_scaled():
    rng = np.random.default_rng(0)
    batch = {"mean": rng.standard_normal((3, 4, 4, 2)).astype(np.float16),
             "std": rng.uniform(0.01, 0.1, (3, 4, 4, 2)).astype(np.float16)}
    key = jax.random.key(7)
    z = np.asarray(loader_lib.sample_latents(batch, key, 0.18215))
    eps = np.asarray(jax.random.normal(key, (3, 4, 4, 2)))
    expected = (batch["mean"].astype(np.float64) + batch["std"].astype(np.float64) * eps) * 0.18215
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-7)
    z2 = np.asarray(loader_lib.sample_latents(batch, jax.random.key(8), 0.18215))
    assert not np.allclose(z, z2)


def write_fashion(directory, n=12):
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, (n, 28, 28), np.uint8)
    labels = np.arange(n) % 10
    for name, array, magic in (("train-images-idx3-ubyte.gz", images, 0x803),
                               ("train-labels-idx1-ubyte.gz", labels, 0x801)):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(directory / name, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())
    return images, labels


def test_fashion_mnist_pixel_loader_pads_to_32_with_black(tmp_path):
    from udit_jax import config as config_lib

    images, labels = write_fashion(tmp_path)
    config = config_lib.base_config()
    config.data.update({
        "space": "pixel", "source": "fashion_mnist", "dir": str(tmp_path), "image_size": 32, "channels": 1,
        "random_flip": False, "num_classes": 10})
    loader = loader_lib.make_loader(config, global_batch_size=4, seed=0, workdir=str(tmp_path))
    batch = next(loader)
    assert batch["image"].shape == (4, 32, 32, 1) and batch["image"].dtype == np.float32
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(batch["image"][:, border, 0] == -1.0)
    for image, label in zip(batch["image"], batch["label"]):
        inner = np.rint((image[2:30, 2:30, 0] + 1) * 127.5).astype(np.uint8)
        match = [i for i in range(len(images)) if np.array_equal(images[i], inner)]
        assert len(match) == 1 and labels[match[0]] == label


def test_pixel_table_from_class_folders_crops_and_skips_bad_files(tmp_path):
    from PIL import Image

    from udit_jax.data.sources import ClassFolderSource

    rng = np.random.default_rng(2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    color = rng.integers(0, 256, (30, 45, 3), np.uint8)
    Image.fromarray(color).save(tmp_path / "a" / "color.png")
    Image.fromarray(color[..., 0]).save(tmp_path / "b" / "gray.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    table = loader_lib.image_table_from_source(ClassFolderSource(tmp_path), 16, max_bad_fraction=0.5,
                                               decode_threads=2)
    assert table.images.shape == (2, 16, 16, 3) and table.labels.tolist() == [0, 1]
    # ADM crop of the 45x30 image: BICUBIC to 24x16, then columns 4..19.
    expected = np.asarray(Image.fromarray(color).resize((24, 16), Image.Resampling.BICUBIC))[:, 4:20]
    np.testing.assert_array_equal(table.images[0], expected)
    gray = table.images[1]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    with pytest.raises(ValueError, match="max_bad_fraction"):
        loader_lib.image_table_from_source(ClassFolderSource(tmp_path), 16, max_bad_fraction=0.1)
