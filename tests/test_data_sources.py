"""Class-folder, tfds (array_record) and Fashion-MNIST sources."""

import gzip
import io
import os

import numpy as np
import pytest
from PIL import Image

from udit_jax.data import sources


def png(seed=0, size=(6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_class_folder_labels_follow_sorted_folder_names(tmp_path):
    layout = {"n02": ["b.JPEG", "a.png", "notes.txt"], "n01": ["z.jpeg", "sub/y.PNG"], "Zed": ["x.bmp"]}
    for folder, names in layout.items():
        for name in names:
            path = tmp_path / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"whatever")
    (tmp_path / "stray.jpg").write_bytes(b"not in a class folder")
    source = sources.ClassFolderSource(tmp_path)
    # sorted() is case-sensitive, as torchvision's: 'Zed' < 'n01' < 'n02'.
    assert source.class_names == ["Zed", "n01", "n02"]
    listed = [(source.key(i), source.read(i)[1]) for i in range(len(source))]
    assert listed == [("Zed/x.bmp", 0), ("n01/z.jpeg", 1), (os.path.join("n01", "sub", "y.PNG"), 1),
                      ("n02/a.png", 2), ("n02/b.JPEG", 2)]
    assert source.read(0)[0] == b"whatever"
    assert source.describe()["num_items"] == 5


def test_class_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        sources.ClassFolderSource(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        sources.ClassFolderSource(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_class"):
        sources.ClassFolderSource(tmp_path)


def write_idx(path, array, gz=True):
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), np.uint8)
    labels = rng.integers(0, 10, 7)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    source = sources.FashionMnistSource(tmp_path)
    assert len(source) == 7 and source.num_classes == 10
    image, label = source.read(3)
    np.testing.assert_array_equal(image[..., 0], images[3])
    assert label == labels[3] and image.shape == (28, 28, 1)


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        sources.FashionMnistSource(tmp_path / "nowhere")


def test_fashion_mnist_rejects_wrong_idx(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(5))  # a label file in the image slot
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(ValueError, match="magic"):
        sources.FashionMnistSource(tmp_path)


def test_tfds_array_record_source_reads_encoded_images(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    payloads = [png(seed=i, size=(5 + i, 7)) for i in range(4)]

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, data in enumerate(payloads):  # encoded bytes: preparing needs no TensorFlow
                yield i, {"image": io.BytesIO(data), "label": i % 3}

    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.TfdsSource("tiny_images", split="train", data_dir=str(tmp_path))
    assert len(source) == 4 and source.num_classes == 3 and source.class_names == ["a", "b", "c"]
    by_label = {}
    for i in range(4):
        data, label = source.read(i)
        decoded = np.asarray(Image.open(io.BytesIO(data)))
        by_label.setdefault(label, []).append(decoded.shape)
    expected = {}
    for i in range(4):
        expected.setdefault(i % 3, []).append((5 + i, 7, 3))
    assert {k: sorted(v) for k, v in by_label.items()} == {k: sorted(v) for k, v in expected.items()}
    with pytest.raises(FileNotFoundError, match="array_record"):
        sources.TfdsSource("tiny_images", split="train", data_dir=str(tmp_path / "elsewhere"))


def test_source_from_config_validates():
    from udit_jax import config as config_lib
    data = config_lib.base_config().data
    data.update({"source": "nope", "dir": ""})
    with pytest.raises(ValueError, match="unknown"):
        sources.source_from_config(data)
    data.source = "folder"
    with pytest.raises(ValueError, match="data.dir"):
        sources.source_from_config(data)


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_has_the_published_counts():
    train = sources.FashionMnistSource()
    test = sources.FashionMnistSource(split="test")
    assert (len(train), len(test)) == (60000, 10000)
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.read(0)[0].shape == (28, 28, 1)
