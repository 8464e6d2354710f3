"""Data loaders for the benchmark tasks: bundled defaults and standard formats.

Every loader either returns NumPy arrays or raises :class:`DataError`, whose
message names the file (and the line for text formats) and says what is wrong.
Nothing here downloads anything.

* LIBSVM / SVMlight text (``label idx:val idx:val ...``, 1-based indices,
  labels {-1, +1} or {0, 1}) for ``logreg``.
* MNIST-format idx files (``*-images-idx3-ubyte`` and ``*-labels-idx1-ubyte``,
  optionally gzipped) for ``mlp``; Debian's ``dataset-fashion-mnist`` installs
  them in ``/usr/share/datasets/fashion-mnist``.
* Any UTF-8 text file for ``charlm``; the default is the English help text in
  the standard library's ``pydoc_data.topics``.

Held-out data: :func:`split_indices` makes the deterministic (stratified)
train/held-out split of the classification tasks, and :func:`mnist_like_splits`
uses an idx directory's ``t10k-*`` test files when they are present.
"""

import dataclasses
import gzip
import os
import struct
from typing import Optional

import numpy as np


class DataError(ValueError):
  """A data file is missing, unreadable or malformed."""


@dataclasses.dataclass(frozen=True)
class SparseRows:
  """Rows of a sparse matrix, padded to the longest row.

  Attributes:
    index: int32 [n, k] zero-based column indices (padding uses column 0).
    value: float32 [n, k] values (padding uses 0, so it contributes nothing).
    num_features: number of columns.
  """
  index: np.ndarray
  value: np.ndarray
  num_features: int

  @property
  def num_rows(self) -> int:
    return self.index.shape[0]

  def to_dense(self) -> np.ndarray:
    dense = np.zeros((self.num_rows, self.num_features), np.float32)
    rows = np.repeat(np.arange(self.num_rows), self.index.shape[1])
    np.add.at(dense, (rows, self.index.ravel()), self.value.ravel())
    return dense


def _check_readable(path: str) -> None:
  if not os.path.exists(path):
    raise DataError(f"data path {path!r} does not exist")
  if os.path.isdir(path):
    raise DataError(f"data path {path!r} is a directory; expected a file")
  if not os.access(path, os.R_OK):
    raise DataError(f"data path {path!r} is not readable (permission denied)")


def _open_binary(path: str) -> bytes:
  """The bytes of a file, gunzipped if it is gzip-compressed."""
  _check_readable(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file name
      raw = gzip.decompress(raw)
    return raw
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path!r}: {e}") from e


# ----------------------------------------------------------------- LIBSVM ---


def parse_libsvm(path: str, num_features: Optional[int] = None):
  """Parses a LIBSVM-format file into sparse rows and {-1, +1} labels.

  Each non-empty line is ``label index:value index:value ...`` with strictly
  increasing 1-based indices; ``#`` starts a comment. Labels must be two
  classes given as {-1, +1} or {0, 1} (``+1`` and ``1.0`` are accepted).

  Args:
    path: the file (optionally ``.gz``).
    num_features: number of columns; by default the largest index seen.

  Returns:
    ``(rows, labels)``: a :class:`SparseRows` and float32 labels in {-1, +1}.

  Raises:
    DataError: naming the file and the 1-based line number of the first
      malformed line.
  """
  text = _open_binary(path)
  try:
    lines = text.decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise DataError(f"{path!r} is not a UTF-8 text file: {e}") from e
  labels, indices, values = [], [], []
  for lineno, raw in enumerate(lines, start=1):
    line = raw.split("#", 1)[0].strip()
    if not line:
      continue
    fields = line.split()
    where = f"{path}: line {lineno}"
    try:
      label = float(fields[0])
    except ValueError:
      raise DataError(f"{where}: label {fields[0]!r} is not a number") from None
    idx: list[int] = []
    val: list[float] = []
    for field in fields[1:]:
      key, sep, number = field.partition(":")
      if not sep:
        raise DataError(f"{where}: expected 'index:value', got {field!r}")
      try:
        j = int(key)
        v = float(number)
      except ValueError:
        raise DataError(
            f"{where}: expected 'index:value' with an integer index and a "
            f"numeric value, got {field!r}") from None
      if j < 1:
        raise DataError(f"{where}: index {j} is not 1-based (must be >= 1)")
      if idx and j - 1 <= idx[-1]:
        raise DataError(
            f"{where}: indices must be strictly increasing ({idx[-1] + 1} "
            f"then {j})")
      if not np.isfinite(v):
        raise DataError(f"{where}: value {number!r} is not finite")
      idx.append(j - 1)
      val.append(v)
    labels.append((label, lineno))
    indices.append(idx)
    values.append(val)
  if not labels:
    raise DataError(f"{path!r} contains no data lines")
  negative = -1.0 if any(lab == -1.0 for lab, _ in labels) else 0.0
  for lab, lineno in labels:
    if lab not in (negative, 1.0):
      raise DataError(
          f"{path}: line {lineno}: label {lab:g} is not allowed; labels must "
          f"be {{-1, +1}} or {{0, 1}} (this file uses {negative:g} for the "
          "negative class)")
  y = np.array([1.0 if lab > 0 else -1.0 for lab, _ in labels], np.float32)
  widest = max(max((len(r) for r in indices)), 1)
  max_index = max((r[-1] for r in indices if r), default=-1) + 1
  if num_features is None:
    num_features = max(max_index, 1)
  elif max_index > num_features:
    raise DataError(f"{path!r}: index {max_index} exceeds num_features="
                    f"{num_features}")
  index = np.zeros((len(labels), widest), np.int32)
  value = np.zeros((len(labels), widest), np.float32)
  for i, (row_index, row_value) in enumerate(zip(indices, values)):
    index[i, :len(row_index)] = row_index
    value[i, :len(row_value)] = row_value
  return SparseRows(index, value, num_features), y


def breast_cancer(standardize: bool = True):
  """scikit-learn's bundled breast-cancer data, labels {-1,+1}.

  Args:
    standardize: scale every feature to mean 0 and variance 1 over all rows;
      ``False`` returns the raw features (float32), e.g. to standardize with
      the statistics of a training split only (:func:`standardize`).
  """
  from sklearn.datasets import load_breast_cancer  # pylint: disable=g-import-not-at-top
  data = load_breast_cancer()
  x = data.data.astype(np.float64)
  if standardize:
    x = (x - x.mean(0)) / x.std(0)
  y = np.where(data.target > 0, 1.0, -1.0)
  return x.astype(np.float32), y.astype(np.float32)


def standardize(train: np.ndarray, *others: np.ndarray):
  """Features scaled by the mean and deviation of ``train``.

  Returns:
    A tuple: ``train`` and each of ``others``, standardized with the
    statistics of ``train`` alone (float32), so held-out rows leak nothing.
  """
  mean = train.mean(0, dtype=np.float64)
  std = train.std(0, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)
  return tuple(((a - mean) / std).astype(np.float32) for a in (train, *others))


# ------------------------------------------------------------ held out ---


def split_indices(n: int, holdout: float, seed: int = 0,
                  labels: Optional[np.ndarray] = None):
  """A deterministic split of ``n`` rows into disjoint train and held-out rows.

  With ``labels`` the split is stratified: each class contributes
  ``round(holdout * count)`` rows to the held-out side, and a class with at
  least two rows has at least one row on each side. Both index arrays come
  in a seeded random order (so a prefix is a random subset).

  Args:
    n: number of rows.
    holdout: fraction of rows held out, in (0, 1).
    seed: seed of the shuffle; the same seed gives the same split.
    labels: optional [n] class labels to stratify by.

  Returns:
    ``(train, heldout)``: int64 index arrays, disjoint, covering ``range(n)``.

  Raises:
    ValueError: on a fraction outside (0, 1) or labels of the wrong length.
    DataError: when one side would be empty (too few rows).
  """
  if not 0.0 < holdout < 1.0:
    raise ValueError(f"holdout must be in (0, 1), got {holdout}")
  if labels is not None and len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries for {n} rows")
  rng = np.random.default_rng(seed)
  if labels is None:
    groups = [np.arange(n)]
  else:
    labels = np.asarray(labels)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  train_parts, heldout_parts = [], []
  for group in groups:
    group = rng.permutation(group)
    k = int(round(holdout * group.size))
    if group.size >= 2:
      k = min(max(k, 1), group.size - 1)
    heldout_parts.append(group[:k])
    train_parts.append(group[k:])
  train = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
  heldout = rng.permutation(np.concatenate(heldout_parts)).astype(np.int64)
  if train.size == 0 or heldout.size == 0:
    raise DataError(f"cannot hold out {holdout:g} of {n} rows: need at least "
                    "one row on each side")
  return train, heldout


# -------------------------------------------------------------------- idx ---

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def parse_idx(path: str) -> np.ndarray:
  """Reads one idx file (the MNIST format), optionally gzipped.

  The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B
  int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions,
  then one big-endian uint32 per dimension.

  Raises:
    DataError: on a bad magic number, an unknown type, or a size mismatch.
  """
  raw = _open_binary(path)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DataError(f"{path!r} is not an idx file (bad magic number "
                    f"{raw[:4].hex() or 'empty'})")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES:
    raise DataError(f"{path!r}: unknown idx type code 0x{code:02x}")
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise DataError(f"{path!r}: truncated idx header ({ndim} dimensions)")
  dims = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(_IDX_DTYPES[code])
  expected = int(np.prod(dims)) * dtype.itemsize
  if len(raw) - header != expected:
    raise DataError(f"{path!r}: header says dims {dims} ({expected} bytes of "
                    f"data) but the file has {len(raw) - header}")
  return np.frombuffer(raw, dtype, offset=header).reshape(dims)


_TEST_PREFIXES = ("t10k", "test")


def _find_idx_pair(path: str):
  """(images, labels) paths from a directory or an images file."""
  if not os.path.exists(path):
    raise DataError(f"data path {path!r} does not exist")
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    def pick(kind):
      found = [n for n in names if kind in n and "ubyte" in n]
      train = [n for n in found if n.startswith("train")]
      if not (train or found):
        raise DataError(f"no '*{kind}-ubyte[.gz]' file in directory {path!r}")
      return os.path.join(path, (train or found)[0])
    return pick("images-idx3"), pick("labels-idx1")
  images = path
  labels = path.replace("images-idx3", "labels-idx1")
  if labels == images:
    raise DataError(f"{path!r}: expected an '*-images-idx3-ubyte[.gz]' file or "
                    "a directory holding it and its labels file")
  return images, labels


def idx_test_files(path: str):
  """The (images, labels) test files next to training idx data, or None.

  For a directory: its ``t10k-*`` (or ``test-*``) images and labels files.
  For a ``train-*-images-idx3-ubyte[.gz]`` file: the same name with
  ``train`` replaced by ``t10k`` (or ``test``), when both files exist.
  """
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    def pick(kind):
      found = [n for n in names if kind in n and "ubyte" in n
               and n.startswith(_TEST_PREFIXES)]
      return os.path.join(path, found[0]) if found else None
    images, labels = pick("images-idx3"), pick("labels-idx1")
    return (images, labels) if images and labels else None
  folder, name = os.path.split(path)
  if not name.startswith("train") or "images-idx3" not in name:
    return None
  for prefix in _TEST_PREFIXES:
    images = os.path.join(folder, prefix + name[len("train"):])
    labels = images.replace("images-idx3", "labels-idx1")
    if os.path.isfile(images) and os.path.isfile(labels):
      return images, labels
  return None


def _read_idx_pair(images_path: str, labels_path: str):
  """(x, y) from an images file and its labels file."""
  images = parse_idx(images_path)
  labels = parse_idx(labels_path)
  if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise DataError(f"{images_path!r} has {images.shape[0]} images but "
                    f"{labels_path!r} has shape {labels.shape}")
  x = images.reshape(images.shape[0], -1).astype(np.float32)
  if images.dtype == np.uint8:
    x /= 255.0
  return x, labels.astype(np.int32)


def mnist_like(path: str):
  """Images and labels from MNIST-format idx files.

  Args:
    path: a directory holding ``train-images-idx3-ubyte[.gz]`` and
      ``train-labels-idx1-ubyte[.gz]`` (e.g. ``/usr/share/datasets/
      fashion-mnist`` from Debian's ``dataset-fashion-mnist``), or the path of
      an images file whose labels file has the matching ``labels-idx1`` name.

  Returns:
    ``(x, y)``: float32 [n, features] scaled to [0, 1] and int32 labels.
  """
  return _read_idx_pair(*_find_idx_pair(path))


def mnist_like_splits(path: str):
  """Training data and, when present, the separate test files.

  Args:
    path: as for :func:`mnist_like`.

  Returns:
    ``((x, y), test)``: the training images and labels, and ``(x, y)`` of the
    test files found by :func:`idx_test_files` (None when there are none, or
    when they are the files already read as training data).

  Raises:
    DataError: as :func:`mnist_like`, for either pair; also when the test
      images do not have the training images' number of features.
  """
  train_files = _find_idx_pair(path)
  train = _read_idx_pair(*train_files)
  test_files = idx_test_files(path)
  if test_files is None or test_files == train_files:
    return train, None
  test = _read_idx_pair(*test_files)
  if test[0].shape[1] != train[0].shape[1]:
    raise DataError(f"{test_files[0]!r} has {test[0].shape[1]} features per "
                    f"image but {train_files[0]!r} has {train[0].shape[1]}")
  return train, test


def digits():
  """scikit-learn's bundled 8x8 digits, scaled to [0, 1]."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


# ------------------------------------------------------------------- text ---


def text_file(path: str) -> str:
  """Reads a UTF-8 text file (clear error if missing, unreadable or binary)."""
  raw = _open_binary(path)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path!r} is not UTF-8 text ({e})") from e
  if len(text) < 2:
    raise DataError(f"{path!r} holds fewer than 2 characters")
  return text


def pydoc_topics() -> str:
  """English help text bundled with the standard library (``pydoc_data``)."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
