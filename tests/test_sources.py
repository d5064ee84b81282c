"""Each loader against small fixtures written in the real on-disk formats."""

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from longtail.config import DataConfig
from longtail.data import build_data
from longtail.data import images as images_mod
from longtail.data.sources import load_cifar10, load_cifar100, load_idx, load_imagefolder, load_split_list
from longtail.errors import DataError


def _cifar_batch(n, num_classes, key, rs):
    data = rs.randint(0, 256, size=(n, 3072)).astype(np.uint8)
    return {b"data": data, key: [int(v) for v in rs.randint(0, num_classes, n)]}


def write_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(_cifar_batch(n, 10, b"labels", rs), fh)
    test = _cifar_batch(n, 10, b"labels", rs)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(test, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    return folder, test


def test_cifar10_pickles(tmp_path):
    folder, test = write_cifar10(tmp_path)
    raw = load_cifar10(DataConfig(source="cifar10", root=str(tmp_path)))
    assert raw.train_images.shape == (100, 32, 32, 3) and raw.train_images.dtype == np.uint8
    assert raw.class_names[3] == "c3"
    # CHW rows -> HWC: pixel (0, 0) channel 1 is byte 1024 of the row
    assert raw.test_images[0, 0, 0, 1] == test[b"data"][0, 1024]
    assert raw.test_labels.tolist() == test[b"labels"]
    assert load_cifar10(DataConfig(source="cifar10", root=str(folder))).train_images.shape[0] == 100


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rs = np.random.RandomState(1)
    for name in ("train", "test"):
        with open(folder / name, "wb") as fh:
            pickle.dump(_cifar_batch(30, 100, b"fine_labels", rs), fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, fh)
    raw = load_cifar100(DataConfig(source="cifar100", root=str(tmp_path)))
    assert raw.train_images.shape == (30, 32, 32, 3) and len(raw.class_names) == 100


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": _Evil()}, fh)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_cifar10(DataConfig(source="cifar10", root=str(tmp_path)))


def _png(color, size=(6, 6), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color, size=(6, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_imagefolder(root, per_class=(5, 3), test_per_class=2):
    files = {}
    for split, counts in (("train", per_class), ("test", (test_per_class,) * len(per_class))):
        for c, n in enumerate(counts):
            for i in range(n):
                data = _png((40 * c, 10, 200)) if i % 2 else _jpeg((40 * c, 10, 200))
                ext = "png" if i % 2 else "jpg"
                files[f"{split}/class{c}/{i:03d}.{ext}"] = data
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def test_imagefolder_folder(tmp_path):
    write_imagefolder(tmp_path / "ds")
    # a grayscale and an RGBA image are converted to RGB
    (tmp_path / "ds/train/class1/gray.png").write_bytes(_png(128, mode="L"))
    (tmp_path / "ds/train/class1/alpha.png").write_bytes(_png((1, 2, 3, 4), mode="RGBA"))
    (tmp_path / "ds/train/class1/notes.txt").write_text("ignored")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    raw = load_imagefolder(cfg)
    assert raw.class_names == ["class0", "class1"]
    assert raw.train_images.shape == (10, 6, 6, 3)
    assert np.bincount(raw.train_labels).tolist() == [5, 5]
    assert raw.test_images.shape == (4, 6, 6, 3)
    gray = raw.train_images[list(raw.train_labels).index(1) + 3]  # sorted: 000..002, alpha, gray
    assert gray.shape == (6, 6, 3)


def test_imagefolder_archive_equals_folder(tmp_path):
    write_imagefolder(tmp_path / "ds")
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "ds" / "train", arcname="train")
        tar.add(tmp_path / "ds" / "test", arcname="test")
    a = load_imagefolder(DataConfig(source="imagefolder", root=str(archive), cache_dir=str(tmp_path / "c1")))
    b = load_imagefolder(DataConfig(source="imagefolder", root=str(tmp_path / "ds"), cache_dir=str(tmp_path / "c2")))
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.train_labels, b.train_labels)


def test_prepared_store_is_reused_without_decoding(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "ds")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    first = load_imagefolder(cfg)
    monkeypatch.setattr(images_mod, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    second = load_imagefolder(cfg)
    assert isinstance(second.train_images, np.memmap)
    assert np.array_equal(first.train_images, second.train_images)


def test_imagefolder_errors(tmp_path):
    root = tmp_path / "ds"
    write_imagefolder(root)
    cfg = DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    bad = root / "train/class0/999.jpg"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="empty \\(0 bytes\\).*999.jpg"):
        load_imagefolder(cfg)
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="cannot decode image train/class0/999.jpg"):
        load_imagefolder(cfg)
    bad.write_bytes(_png((0, 0, 0), size=(9, 9)))
    with pytest.raises(DataError, match="999.jpg is 9x9 but .* is 6x6; set data.image_size"):
        load_imagefolder(cfg)
    cfg.image_size = 6
    assert load_imagefolder(cfg).train_images.shape[1:] == (6, 6, 3)
    bad.unlink()
    (root / "train/empty").mkdir()
    with pytest.raises(DataError, match="class 'empty' has no images"):
        load_imagefolder(DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "c3")))
    with pytest.raises(DataError, match="dataset path does not exist"):
        load_imagefolder(DataConfig(source="imagefolder", root=str(tmp_path / "nope")))


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path, gz):
    rs = np.random.RandomState(0)
    arrays = {"train-images-idx3-ubyte": rs.randint(0, 256, (12, 5, 4)), "train-labels-idx1-ubyte": np.arange(12) % 3,
              "t10k-images-idx3-ubyte": rs.randint(0, 256, (6, 5, 4)), "t10k-labels-idx1-ubyte": np.arange(6) % 3}
    for name, a in arrays.items():
        data = _idx(a)
        (tmp_path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    raw = load_idx(DataConfig(source="idx", root=str(tmp_path)))
    assert raw.train_images.shape == (12, 5, 4, 1)
    assert np.array_equal(raw.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    assert raw.test_labels.tolist() == (np.arange(6) % 3).tolist() and raw.class_names == ["0", "1", "2"]


def test_idx_truncated(tmp_path):
    data = _idx(np.zeros((4, 3, 3)))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-5])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(4)))
    with pytest.raises(DataError, match="truncated"):
        load_idx(DataConfig(source="idx", root=str(tmp_path)))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="bad magic"):
        load_idx(DataConfig(source="idx", root=str(tmp_path)))


def test_split_list(tmp_path):
    write_imagefolder(tmp_path / "ds")
    lines = [f"train/class{c}/{i:03d}.{'png' if i % 2 else 'jpg'} {c}" for c, n in ((0, 5), (1, 3)) for i in range(n)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("test/class0/000.jpg 0\ntest/class1/001.png 1\n")
    (tmp_path / "val.txt").write_text("test/class0/001.png 0\ntest/class1/000.jpg 1\n")
    cfg = DataConfig(source="split_list", root=str(tmp_path / "ds"), train_list=str(tmp_path / "train.txt"),
                     val_list=str(tmp_path / "val.txt"), test_list=str(tmp_path / "test.txt"), profile="none",
                     cache_dir=str(tmp_path / "cache"))
    raw = load_split_list(cfg)
    assert raw.train_images.shape == (8, 6, 6, 3) and raw.val_labels.tolist() == [0, 1]
    data = build_data(cfg)
    assert data.class_counts.tolist() == [5, 3] and len(data.val) == 2 and len(data.test) == 2
    (tmp_path / "train.txt").write_text("train/class0/000.jpg zero\n")
    with pytest.raises(DataError, match="train.txt:1: label 'zero' is not an integer"):
        load_split_list(cfg)
    (tmp_path / "train.txt").write_text("train/class0/missing.jpg 0\ntrain/class1/001.png 1\n")
    with pytest.raises(DataError, match="does not exist"):
        load_split_list(cfg)


def test_decode_image_converts_cmyk_and_palette():
    buf = io.BytesIO()
    Image.new("CMYK", (3, 2), (0, 0, 0, 0)).save(buf, format="JPEG")
    assert images_mod.decode_image(buf.getvalue(), "x.jpg").shape == (2, 3, 3)
    assert images_mod.decode_image(_png(3, mode="P"), "p.png", channels=1).shape == (6, 6, 1)


# ------------------------------------------------- labels out of range, every source, train and test parts


def _idx_int8(array: np.ndarray) -> bytes:
    """An IDX file of signed bytes (type 0x09), so a label can be negative."""
    header = bytes([0, 0, 0x09, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.int8).tobytes()


def _write_idx(root, train_labels, test_labels):
    rs = np.random.RandomState(0)
    for stem, labels in (("train", train_labels), ("t10k", test_labels)):
        (root / f"{stem}-images-idx3-ubyte").write_bytes(_idx(rs.randint(0, 256, (len(labels), 5, 4))))
        (root / f"{stem}-labels-idx1-ubyte").write_bytes(_idx_int8(np.asarray(labels)))
    return DataConfig(source="idx", root=str(root), profile="none")


def _set_cifar_label(path, key, index, label):
    with open(path, "rb") as fh:
        d = pickle.load(fh)
    d[key][index] = label
    with open(path, "wb") as fh:
        pickle.dump(d, fh)


def _write_lists(tmp_path, train="", val="", test=""):
    """Split lists over the imagefolder fixture: classes 0 and 1 unless a line says otherwise."""
    write_imagefolder(tmp_path / "ds")
    base = {"train": "train/class0/000.jpg 0\ntrain/class1/001.png 1\n" + train,
            "val": "test/class0/001.png 0\n" + val, "test": "test/class1/000.jpg 1\n" + test}
    for split, text in base.items():
        (tmp_path / f"{split}.txt").write_text(text)
    return DataConfig(source="split_list", root=str(tmp_path / "ds"), profile="none", cache_dir=str(tmp_path / "c"),
                      **{f"{s}_list": str(tmp_path / f"{s}.txt") for s in base})


@pytest.mark.parametrize("part, label", [("train", 10), ("train", -1), ("test", 10), ("test", -1)])
def test_cifar10_label_out_of_range(tmp_path, part, label):
    folder, _ = write_cifar10(tmp_path)
    name = "data_batch_3" if part == "train" else "test_batch"
    _set_cifar_label(folder / name, b"labels", 7, label)
    with pytest.raises(DataError, match=rf"^label {label} out of range \[0, 10\) in .*{name} \(index 7\)$"):
        build_data(DataConfig(source="cifar10", root=str(tmp_path), profile="none"))


@pytest.mark.parametrize("part, label", [("train", 100), ("test", -1)])
def test_cifar100_label_out_of_range(tmp_path, part, label):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rs = np.random.RandomState(1)
    for name in ("train", "test"):
        batch = _cifar_batch(300, 100, b"fine_labels", rs)
        batch[b"fine_labels"] = [i % 100 for i in range(300)]
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, fh)
    _set_cifar_label(folder / part, b"fine_labels", 5, label)
    with pytest.raises(DataError, match=rf"^label {label} out of range \[0, 100\) in .*{part} \(index 5\)$"):
        build_data(DataConfig(source="cifar100", root=str(tmp_path), profile="none"))


@pytest.mark.parametrize("train, test, message", [
    ([0, 1, 2, 0, 1, 2], [0, 1, 3, 2], r"^label 3 out of range \[0, 3\) in .*t10k-labels-idx1-ubyte \(index 2\)$"),
    ([0, 1, 2, 0, 1, 2], [0, -1, 1, 2], r"^label -1 out of range \[0, 3\) in .*t10k-labels-idx1-ubyte \(index 1\)$"),
    ([0, 1, -1, 0, 1, 2], [0, 1, 2], r"^label -1 out of range \[0, 3\) in .*train-labels-idx1-ubyte \(index 2\)$"),
    ([0, 1, 2, 0, 9, 2], [0, 1, 2], r"^class '3' has no training images in .*train-labels-idx1-ubyte: classes are "
                                    r"numbered by label from 0 to the largest training label, 9 at .* \(index 4\)$"),
])
def test_idx_label_out_of_range(tmp_path, train, test, message):
    with pytest.raises(DataError, match=message):
        build_data(_write_idx(tmp_path, train, test))


@pytest.mark.parametrize("names, part, label, message", [
    (["a", "b", "c"], "train", 3, r"^label 3 out of range \[0, 3\) in train_labels \(index 4\)$"),
    (["a", "b", "c"], "train", -1, r"^label -1 out of range \[0, 3\) in train_labels \(index 4\)$"),
    (["a", "b", "c"], "test", 3, r"^label 3 out of range \[0, 3\) in test_labels \(index 4\)$"),
    (None, "test", 3, r"^label 3 out of range \[0, 3\) in test_labels \(index 4\)$"),
    (None, "test", -1, r"^label -1 out of range \[0, 3\) in test_labels \(index 4\)$"),
    (None, "train", -1, r"^label -1 out of range \[0, 3\) in train_labels \(index 4\)$"),
    (None, "train", 7, r"^class '3' has no training images in train_labels: .* largest training label, 7 at "
                       r"train_labels \(index 4\)$"),
])
def test_arrays_label_out_of_range(names, part, label, message):
    from conftest import tiny_arrays

    arrays = tiny_arrays(num_classes=3, per_class=6, test_per_class=2, size=4)
    arrays[f"{part}_labels"][4] = label
    if names is not None:
        arrays["class_names"] = names
    with pytest.raises(DataError, match=message):
        build_data(DataConfig(source="arrays", profile="none"), arrays=arrays)


@pytest.mark.parametrize("lists, message", [
    ({"train": "train/class0/002.jpg -1\n"}, r"train\.txt:3: label -1 out of range"),
    ({"train": "train/class0/002.jpg 7\n"}, r"^class '2' has no training images in .*train\.txt: classes are "
                                            r"numbered .* largest training label, 7 at .*train\.txt:3$"),
    ({"val": "test/class1/001.png 2\n"}, r"val\.txt:2: label 2 out of range \[0, 2\)$"),
    ({"val": "test/class1/001.png -1\n"}, r"val\.txt:2: label -1 out of range"),
    ({"test": "# a comment\ntest/class0/000.jpg 2\n"}, r"test\.txt:3: label 2 out of range \[0, 2\)$"),
    ({"test": "test/class0/000.jpg -1\n"}, r"test\.txt:2: label -1 out of range"),
])
def test_split_list_label_out_of_range(tmp_path, lists, message):
    with pytest.raises(DataError, match=message):
        build_data(_write_lists(tmp_path, **lists))


@pytest.mark.parametrize("split", ["test", "val"])
def test_imagefolder_class_missing_from_train(tmp_path, split):
    """ImageFolder labels are the train folders' indices, so no label can be out of range; a val / test
    class folder that training lacks is the same mistake, and is named."""
    write_imagefolder(tmp_path / "ds")
    (tmp_path / "ds" / split / "zebra").mkdir(parents=True)
    (tmp_path / "ds" / split / "zebra" / "0.png").write_bytes(_png((1, 2, 3)))
    with pytest.raises(DataError, match=rf"class 'zebra' of {split}/ has no images in train/"):
        build_data(DataConfig(source="imagefolder", root=str(tmp_path / "ds"), profile="none",
                              cache_dir=str(tmp_path / "c")))
