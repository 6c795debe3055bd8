"""Random-access image sources: class-folder trees, tfds array_record datasets, Fashion-MNIST.

Every source has the same small interface:

    len(source)                       number of items (good and bad files alike)
    payload, label = source.read(i)   encoded image bytes, or a uint8 [h, w, C] array; int label
    source.key(i)                     a human-readable name for item i (file path), for reports
    source.num_classes, source.class_names
    source.describe()                 JSON-able identity (kind, location, count, fingerprint)

Reading an item never decodes it: decoding and its failures belong to preprocessing, so bad
files are reported per item instead of failing the listing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import time
import zlib
from typing import Any, Protocol

import numpy as np

# torchvision's ImageFolder extensions (case-insensitive): the same files, so the same labels.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


class Source(Protocol):
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[bytes | np.ndarray, int]: ...

    def key(self, index: int) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def _fingerprint(lines) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


class ClassFolderSource:
    """root/<class>/**/<image>: ImageNet's train/nXXXXXXXX/*.JPEG or any custom dataset.

    Labels are indices into the sorted class-folder names and files are listed in sorted
    os.walk order, exactly as torchvision's ImageFolder (so ImageNet labels match the official
    code). Files with other extensions are ignored, as there.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.dir={str(root)!r} is not a directory; point it at a folder "
                                    "with one sub-folder per class (ImageNet: the 'train' folder)")
        self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.class_names:
            raise FileNotFoundError(f"no class folders in {self.root}; expected "
                                    f"{self.root}/<class>/<image files>")
        self.num_classes = len(self.class_names)
        paths, labels, empty = [], [], []
        for label, name in enumerate(self.class_names):
            count = len(paths)
            for dirpath, _, filenames in sorted(os.walk(self.root / name, followlinks=True)):
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMG_EXTENSIONS):
                        paths.append(os.path.relpath(os.path.join(dirpath, filename), self.root))
                        labels.append(label)
            if len(paths) == count:
                empty.append(name)
        if empty:
            raise FileNotFoundError(f"class folders without image files ({', '.join(IMG_EXTENSIONS)}) "
                                    f"in {self.root}: {empty[:10]}; remove them or add images")
        self._paths = paths
        self._labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def read(self, index: int) -> tuple[bytes, int]:
        with open(self.root / self._paths[index], "rb") as f:
            return f.read(), int(self._labels[index])

    def key(self, index: int) -> str:
        return self._paths[index]

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "root": str(self.root.resolve()), "num_items": len(self),
                "num_classes": self.num_classes,
                "fingerprint": _fingerprint(f"{p}\t{l}" for p, l in zip(self._paths, self._labels))}


class TfdsSource:
    """A tfds dataset prepared in array_record format, read with `tfds.data_source`.

    Images are read as their stored encoded bytes (tfds' SkipDecoding) and decoded by our own
    preprocessing, so tfds and class-folder datasets go through identical pixels.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds  # heavy; only for this source

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                        decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as e:  # tfds raises a zoo of types for missing/unprepared data
            raise FileNotFoundError(
                f"tfds dataset {name!r} (split {split!r}) cannot be opened from data_dir={data_dir!r}: "
                f"{e}. Prepare it in array_record format first, e.g. `tfds build {name} "
                f"--file_format=array_record --data_dir=<dir>` (ImageNet needs the manual-download "
                f"tars in <dir>/downloads/manual), then set data.dir to <dir>") from e
        features = self._ds.dataset_info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(f"tfds dataset {name!r} has no feature {key!r}; features: {list(features)}")
        self.num_classes = int(features[label_key].num_classes)
        self.class_names = list(features[label_key].names)

    def __len__(self) -> int:
        return len(self._ds)

    def read(self, index: int) -> tuple[bytes, int]:
        record = self._ds[index]
        return record[self.image_key], int(record[self.label_key])

    def key(self, index: int) -> str:
        name = self._ds[index].get("file_name")
        return name.decode() if isinstance(name, bytes) else str(name or f"{self.name}/{self.split}[{index}]")

    def describe(self) -> dict[str, Any]:
        info = self._ds.dataset_info
        return {"kind": "tfds", "name": self.name, "split": self.split, "version": str(info.version),
                "data_dir": str(info.data_dir), "num_items": len(self), "num_classes": self.num_classes}


def _read_idx(path: pathlib.Path, expected_magic: int) -> np.ndarray:
    """An idx file (as distributed by MNIST / Fashion-MNIST), gzipped or not, as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e}); expected a gzipped idx "
                         "file as distributed by Fashion-MNIST: download it again, or reinstall "
                         "dataset-fashion-mnist") from e
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path} is not an idx file of the expected kind (magic {magic:#x}, "
                         f"expected {expected_magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


class FashionMnistSource:
    """Fashion-MNIST from its four idx files: items are uint8 [28, 28, 1] arrays, 10 classes.

    Any directory holding the files (gzipped or not) works; the default is where the Debian
    package `dataset-fashion-mnist` installs them.
    """

    def __init__(self, directory: str | os.PathLike | None = None, split: str = "train"):
        self.directory = pathlib.Path(directory or FASHION_MNIST_DIR)
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST split {split!r} does not exist; use 'train' or 'test'")
        self.split = split
        found, missing = [], []
        for stem in FASHION_MNIST_FILES[split]:
            candidates = [self.directory / (stem + ".gz"), self.directory / stem]
            path = next((c for c in candidates if c.is_file()), None)
            (found if path else missing).append(path or stem + ".gz")
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files {missing} not found in {self.directory}. Install them with "
                f"`apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_DIR}) or set data.dir "
                f"to a directory holding {[s + '.gz' for s in FASHION_MNIST_FILES[split]]}")
        self.images = _read_idx(found[0], 0x803)[..., None]
        self.labels = _read_idx(found[1], 0x801).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"Fashion-MNIST in {self.directory}: {len(self.images)} images but "
                             f"{len(self.labels)} labels")
        self.num_classes = len(FASHION_MNIST_CLASSES)
        self.class_names = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def key(self, index: int) -> str:
        return f"fashion_mnist/{self.split}[{index}]"

    def describe(self) -> dict[str, Any]:
        return {"kind": "fashion_mnist", "dir": str(self.directory.resolve()), "split": self.split,
                "num_items": len(self), "num_classes": self.num_classes,
                "fingerprint": hashlib.sha256(self.labels.tobytes()).hexdigest()[:16]}


SOURCE_KINDS = ("folder", "tfds", "fashion_mnist")
READ_ATTEMPTS = 4        # a transient OSError is retried this many times in all ...
READ_BACKOFF_S = 0.5     # ... after 0.5, 1, 2 s (network filesystems have passing errors)
_PERMANENT_OSERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def read_with_retry(source: Source, index: int) -> tuple[bytes | np.ndarray, int]:
    """source.read(index), retrying an OSError (other than a missing or forbidden file) with
    exponential backoff; the last attempt's OSError propagates (the caller counts the item bad)."""
    for attempt in range(READ_ATTEMPTS - 1):
        try:
            return source.read(index)
        except _PERMANENT_OSERRORS:
            raise
        except OSError:
            time.sleep(READ_BACKOFF_S * 2 ** attempt)
    return source.read(index)


def check_num_classes(source: Source, num_classes: int) -> None:
    """Raises ValueError unless the source's class count is data.num_classes: labels beyond it
    would be the null class of guidance or index past the class embedding."""
    if source.num_classes != num_classes:
        names = ", ".join(source.class_names[:5]) + (", ..." if source.num_classes > 5 else "")
        raise ValueError(f"data.num_classes={num_classes} but the data source has "
                         f"{source.num_classes} classes ({names}); set "
                         f"--config.data.num_classes={source.num_classes}")


def source_from_config(data) -> Source:
    """The source named by `data.source` ('folder' | 'tfds' | 'fashion_mnist').

    Fields read: data.dir (folder root, tfds data_dir, Fashion-MNIST directory; may be empty for
    tfds and Fashion-MNIST defaults), data.split ('train'), data.tfds_name (for 'tfds').
    """
    kind = data.source
    directory = data.dir or None
    split = data.split
    if kind == "folder":
        if not directory:
            raise ValueError("data.source='folder' needs data.dir (the folder of class sub-folders)")
        return ClassFolderSource(directory)
    if kind == "tfds":
        if not data.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name (e.g. 'imagenet2012')")
        return TfdsSource(data.tfds_name, split=split, data_dir=directory)
    if kind == "fashion_mnist":
        return FashionMnistSource(directory, split=split)
    raise ValueError(f"data.source={kind!r} is unknown; use one of {SOURCE_KINDS}")
