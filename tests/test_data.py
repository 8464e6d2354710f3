"""Tests of the benchmark data loaders (LIBSVM, idx, text) on files written here."""

import gzip
import os
import struct

import numpy as np
import pytest

from optax_sign.bench import data


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def write_idx(path, array, code=0x08, compress=False):
  """Writes ``array`` in the idx format (big-endian dims, type ``code``)."""
  header = bytes([0, 0, code, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  dtype = {0x08: np.uint8, 0x0D: ">f4"}[code]
  payload = header + np.asarray(array).astype(dtype).tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(payload)
  return str(path)


class TestLibsvm:

  def test_sparse_rows_and_labels_pm1(self, tmp_path):
    path = _write(tmp_path, "a.svm",
                  "+1 1:0.5 3:-2\n"
                  "# a comment line\n"
                  "\n"
                  "-1 2:1.5 # trailing comment\n"
                  "-1\n")
    rows, y = data.parse_libsvm(path)
    np.testing.assert_array_equal(y, [1, -1, -1])
    assert rows.num_features == 3
    np.testing.assert_allclose(rows.to_dense(),
                               [[0.5, 0, -2], [0, 1.5, 0], [0, 0, 0]])
    assert rows.index.shape == (3, 2)  # padded to the longest row, not dense

  def test_labels_01_map_to_pm1(self, tmp_path):
    path = _write(tmp_path, "b.svm", "1 1:1\n0 2:1\n1.0 1:2\n")
    _, y = data.parse_libsvm(path)
    np.testing.assert_array_equal(y, [1, -1, 1])

  def test_gzip_and_num_features(self, tmp_path):
    path = str(tmp_path / "c.svm.gz")
    with gzip.open(path, "wt") as f:
      f.write("1 2:3\n-1 1:1\n")
    rows, _ = data.parse_libsvm(path, num_features=10)
    assert rows.num_features == 10
    assert rows.to_dense().shape == (2, 10)
    with pytest.raises(data.DataError, match="exceeds num_features"):
      data.parse_libsvm(path, num_features=1)

  @pytest.mark.parametrize("bad_line, message", [
      ("1 3:abc", "integer index and a numeric value"),
      ("1 0:1.0", "not 1-based"),
      ("1 3:1 2:1", "strictly increasing"),
      ("1 3:1 3:2", "strictly increasing"),
      ("1 3", "expected 'index:value'"),
      ("yes 1:1", "label 'yes' is not a number"),
      ("2 1:1", "label 2 is not allowed"),
      ("1 1:nan", "not finite"),
  ])
  def test_malformed_line_names_the_line(self, tmp_path, bad_line, message):
    path = _write(tmp_path, "bad.svm", f"1 1:1\n\n{bad_line}\n-1 1:2\n")
    with pytest.raises(data.DataError, match=message) as info:
      data.parse_libsvm(path)
    assert "line 3" in str(info.value)
    assert path in str(info.value)

  def test_mixed_negative_labels(self, tmp_path):
    path = _write(tmp_path, "mix.svm", "1 1:1\n-1 1:1\n0 1:1\n")
    with pytest.raises(data.DataError, match="line 3"):
      data.parse_libsvm(path)

  def test_empty_file(self, tmp_path):
    path = _write(tmp_path, "empty.svm", "# nothing\n")
    with pytest.raises(data.DataError, match="no data lines"):
      data.parse_libsvm(path)


class TestIdx:

  def test_round_trip_uint8_and_float(self, tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(
        data.parse_idx(write_idx(tmp_path / "x-idx3-ubyte", images)), images)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    out = data.parse_idx(write_idx(tmp_path / "f.idx", floats, code=0x0D,
                                   compress=True))
    np.testing.assert_array_equal(out, floats)

  def test_mnist_directory_gz(self, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4), np.uint8)
    labels = np.array([0, 1, 2, 1, 0], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, compress=True)
    x, y = data.mnist_like(str(tmp_path))
    assert x.shape == (5, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x, images.reshape(5, 16) / 255.0)
    np.testing.assert_array_equal(y, labels)
    # An images file finds its labels file by name.
    x2, _ = data.mnist_like(str(tmp_path / "train-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(x2, x)

  def test_bad_magic(self, tmp_path):
    path = tmp_path / "junk-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="bad magic"):
      data.parse_idx(str(path))

  def test_unknown_type(self, tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(data.DataError, match="unknown idx type"):
      data.parse_idx(str(path))

  def test_size_mismatch(self, tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(bytes([0, 0, 8, 2]) + struct.pack(">2I", 3, 3) + b"\x01")
    with pytest.raises(data.DataError, match=r"dims \(3, 3\)"):
      data.parse_idx(str(path))

  def test_label_count_mismatch(self, tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((2,)))
    with pytest.raises(data.DataError, match="3 images"):
      data.mnist_like(str(tmp_path))

  def test_directory_without_idx(self, tmp_path):
    with pytest.raises(data.DataError, match="no '\\*images-idx3"):
      data.mnist_like(str(tmp_path))


class TestHeldOut:

  def test_split_is_disjoint_stratified_and_deterministic(self):
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, test = data.split_indices(100, 0.2, seed=3, labels=labels)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])),
                                  np.arange(100))
    np.testing.assert_array_equal(np.bincount(labels[test]), [10, 6, 4])
    again = data.split_indices(100, 0.2, seed=3, labels=labels)
    np.testing.assert_array_equal(again[1], test)
    other = data.split_indices(100, 0.2, seed=4, labels=labels)
    assert set(other[1]) != set(test)
    # Unstratified; a class of two rows still lands on both sides.
    train, test = data.split_indices(10, 0.25)
    assert (train.size, test.size) == (8, 2)
    _, test = data.split_indices(12, 0.1, labels=np.array([0] * 10 + [1] * 2))
    assert set(np.array([0] * 10 + [1] * 2)[test]) == {0, 1}

  def test_split_errors(self):
    with pytest.raises(ValueError, match="holdout must be in"):
      data.split_indices(10, 1.0)
    with pytest.raises(ValueError, match="3 entries for 10 rows"):
      data.split_indices(10, 0.2, labels=np.zeros(3))
    with pytest.raises(data.DataError, match="one row on each side"):
      data.split_indices(1, 0.5)

  def test_standardize_uses_training_statistics(self):
    train = np.array([[0.0, 5.0], [2.0, 5.0]], np.float32)
    test = np.array([[4.0, 6.0]], np.float32)
    train_s, test_s = data.standardize(train, test)
    np.testing.assert_allclose(train_s, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(test_s, [[3, 1]])  # constant column: std 1

  def test_t10k_files_are_the_test_split(self, tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
      write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                rng.integers(0, 256, (n, 2, 2)), compress=True)
      write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
                np.arange(n) % 2, compress=True)
    (x, y), (x_test, y_test) = data.mnist_like_splits(str(tmp_path))
    assert x.shape == (6, 4) and x_test.shape == (3, 4)
    np.testing.assert_array_equal(y_test, [0, 1, 0])
    images = str(tmp_path / "train-images-idx3-ubyte.gz")
    assert data.idx_test_files(images) == (
        str(tmp_path / "t10k-images-idx3-ubyte.gz"),
        str(tmp_path / "t10k-labels-idx1-ubyte.gz"))
    _, test = data.mnist_like_splits(images)
    np.testing.assert_array_equal(test[0], x_test)

  def test_no_test_files(self, tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 2, 2)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((3,)))
    # The only files are read as training data, never also as test data.
    (x, _), test = data.mnist_like_splits(str(tmp_path))
    assert x.shape == (3, 4) and test is None
    assert data.idx_test_files(str(tmp_path / "x-images-idx3-ubyte")) is None

  def test_test_files_of_another_shape(self, tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((3,)))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 3, 3)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((2,)))
    with pytest.raises(data.DataError, match="9 features per image"):
      data.mnist_like_splits(str(tmp_path))


class TestTextAndPaths:

  def test_text_file(self, tmp_path):
    path = _write(tmp_path, "t.txt", "héllo wörld")
    assert data.text_file(path) == "héllo wörld"

  def test_not_utf8(self, tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(data.DataError, match="not UTF-8"):
      data.text_file(str(path))

  @pytest.mark.parametrize("loader", [data.parse_libsvm, data.parse_idx,
                                      data.text_file, data.mnist_like])
  def test_missing_path(self, tmp_path, loader):
    missing = str(tmp_path / "nope")
    with pytest.raises(data.DataError, match="does not exist"):
      loader(missing)

  def test_directory_instead_of_file(self, tmp_path):
    with pytest.raises(data.DataError, match="is a directory"):
      data.text_file(str(tmp_path))

  @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
  def test_unreadable(self, tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("abc")
    path.chmod(0)
    with pytest.raises(data.DataError, match="not readable"):
      data.text_file(str(path))

  def test_defaults(self):
    x, y = data.breast_cancer()
    assert x.shape == (569, 30) and set(np.unique(y)) == {-1.0, 1.0}
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    x, y = data.digits()
    assert x.shape == (1797, 64) and x.max() <= 1.0 and y.max() == 9
    assert len(data.pydoc_topics()) > 100_000
