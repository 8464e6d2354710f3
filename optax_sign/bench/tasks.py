"""Benchmark tasks: models, losses and batch samplers.

A :class:`Task` is purely functional so that every optimizer sees the same
initial parameters and the same batch sequence: ``loss(params, batch)`` is a
scalar, ``sample(data, key)`` draws a mini-batch inside ``jit`` from arrays
passed as arguments (never baked into the compiled program), and
``eval_loss(params, data)`` is the full objective used for the curves.

Every task also holds out data no optimizer trains on: ``heldout`` (arrays)
and ``eval_metrics(params, heldout) -> dict`` give ``test_loss`` and
``test_accuracy`` for the classifiers and ``val_loss`` for the language model.
The split is deterministic and does not depend on ``seed`` (every run of every
seed is scored on the same rows):

* ``logreg``, ``mlp``: a stratified 20% of the rows (:data:`HOLDOUT`), seeded
  with :data:`SPLIT_SEED`; for ``mlp`` on an idx directory (or a ``train-*``
  images file) with ``t10k-*`` test files next to it, those files instead.
  ``logreg``'s default data is standardized with training-split statistics.
* ``charlm``: the last 10% of the text (:data:`TEXT_HOLDOUT`); the model
  never samples a training window from it.

* ``logreg``: L2-regularized logistic regression (breast cancer, or LIBSVM).
* ``mlp``: a Flax NNX MLP classifier (digits, or MNIST-format idx files).
* ``charlm``: a small Flax NNX causal Transformer on characters (the standard
  library's pydoc topics, or any UTF-8 text file).
"""

import dataclasses
from typing import Any, Callable, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sign.bench import data as data_lib

TASKS = ("logreg", "mlp", "charlm")

# Default steps and batch sizes (full size, tiny size); batch 0 = full batch.
DEFAULT_STEPS = {"logreg": (300, 20), "mlp": (300, 20), "charlm": (300, 10)}
DEFAULT_BATCH = {"logreg": (0, 0), "mlp": (128, 32), "charlm": (32, 8)}

HOLDOUT = 0.2  # fraction of rows held out by logreg and mlp (stratified)
TEXT_HOLDOUT = 0.1  # fraction of the text (its end) held out by charlm
SPLIT_SEED = 0  # the held-out split is the same for every --seed
# Tiny sizes: (training rows, held-out rows).
TINY_ROWS = {"logreg": (128, 32), "mlp": (256, 64)}


@dataclasses.dataclass
class Task:
  """A benchmark problem.

  Attributes:
    name: task name.
    description: one line for the report (data set, sizes).
    params: initial parameters (a pytree of arrays).
    data: a dict of arrays handed to ``sample`` and ``eval_loss``.
    loss: ``loss(params, batch) -> scalar``.
    sample: ``sample(data, key) -> batch``.
    eval_loss: ``eval_loss(params, data) -> scalar``, the plotted objective.
    f_lower: a known lower bound of the loss (for ALIAS's lower-bound option).
    heldout: a dict of held-out arrays (disjoint from ``data``), or None.
    eval_metrics: ``eval_metrics(params, heldout) -> {name: scalar}``, the
      held-out metrics (``test_loss``/``test_accuracy`` or ``val_loss``), or
      None for a task without held-out data.
    num_params: number of scalar parameters.
  """
  name: str
  description: str
  params: Any
  data: dict
  loss: Callable[..., jax.Array]
  sample: Callable[..., Any]
  eval_loss: Callable[..., jax.Array]
  f_lower: float = 0.0
  heldout: Optional[dict] = None
  eval_metrics: Optional[Callable[..., dict]] = None

  @property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.params)))


def _rows(data: dict, key: jax.Array, batch_size: int, n: int) -> dict:
  """A mini-batch of rows (with replacement); the full data if batch_size 0."""
  if batch_size <= 0 or batch_size >= n:
    return data
  idx = jax.random.randint(key, (batch_size,), 0, n)
  return {k: v[idx] for k, v in data.items()}


# ----------------------------------------------------------------- logreg ---


def logreg(path: Optional[str] = None, batch_size: int = 0, l2: float = 1e-3,
           tiny: bool = False, seed: int = 0, holdout: float = HOLDOUT) -> Task:
  """L2-regularized logistic regression with labels in {-1, +1}.

  .. math:: f(w, b) = \\frac1n\\sum_i \\log(1 + e^{-y_i(a_i^\\top w + b)})
    + \\frac{\\lambda}{2}\\|w\\|_2^2

  Dense features for the default data; LIBSVM files keep their sparse rows
  (padded index/value arrays), so wide files never become dense matrices.
  A stratified ``holdout`` fraction of the rows is held out; its metrics are
  ``test_loss`` (this objective, regularizer included, on the held-out rows)
  and ``test_accuracy`` (sign of the logit against the label).
  """
  del seed  # the initial point is zero
  if path is None:
    x, y = data_lib.breast_cancer(standardize=False)
  else:
    rows, y = data_lib.parse_libsvm(path)
  train, test = data_lib.split_indices(len(y), holdout, SPLIT_SEED, y)
  if tiny:
    train, test = train[:TINY_ROWS["logreg"][0]], test[:TINY_ROWS["logreg"][1]]
  if path is None:
    x_train, x_test = data_lib.standardize(x[train], x[test])
    arrays = {"x": jnp.asarray(x_train), "y": jnp.asarray(y[train])}
    heldout = {"x": jnp.asarray(x_test), "y": jnp.asarray(y[test])}
    dim = x.shape[1]
    source = "sklearn breast_cancer (standardized on the training split)"
  else:
    arrays, heldout = ({"index": jnp.asarray(rows.index[i]),
                        "value": jnp.asarray(rows.value[i]),
                        "y": jnp.asarray(y[i])} for i in (train, test))
    dim, source = rows.num_features, f"LIBSVM {path}"
  n = int(arrays["y"].shape[0])

  def logits(params, batch):
    if "x" in batch:
      z = batch["x"] @ params["w"]
    else:
      z = jnp.sum(params["w"][batch["index"]] * batch["value"], axis=-1)
    return z + params["b"]

  def loss(params, batch):
    margin = batch["y"] * logits(params, batch)
    return (jnp.mean(jax.nn.softplus(-margin))
            + 0.5 * l2 * jnp.sum(jnp.square(params["w"])))

  def eval_metrics(params, d):
    correct = (logits(params, d) > 0) == (d["y"] > 0)
    return {"test_loss": loss(params, d),
            "test_accuracy": jnp.mean(correct.astype(jnp.float32))}

  params = {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
  return Task(
      name="logreg",
      description=f"{source}: n={n} (+{test.size} held out, stratified "
                  f"{holdout:.0%}), d={dim}, l2={l2:g}, "
                  f"batch={'full' if batch_size <= 0 or batch_size >= n else batch_size}",
      params=params, data=arrays, loss=loss,
      sample=lambda d, key: _rows(d, key, batch_size, n),
      eval_loss=loss, heldout=heldout, eval_metrics=eval_metrics)


# -------------------------------------------------------------------- mlp ---


class MLP(nnx.Module):
  """A ReLU multilayer perceptron classifier."""

  def __init__(self, sizes, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def _functional(model: nnx.Module):
  """(apply(params, *args), params) for an NNX module without other state."""
  graphdef, params = nnx.split(model)
  return (lambda p, *args: nnx.merge(graphdef, p)(*args)), params


def mlp(path: Optional[str] = None, batch_size: int = 128, hidden: int = 128,
        tiny: bool = False, seed: int = 0, max_eval: int = 10000,
        holdout: float = HOLDOUT) -> Task:
  """A Flax NNX MLP with two hidden layers and softmax cross-entropy.

  Held out: the ``t10k-*`` idx files next to the training files when there
  are any, else a stratified ``holdout`` fraction of the rows. Metrics:
  ``test_loss`` (cross-entropy) and ``test_accuracy`` (arg-max), on at most
  ``max_eval`` held-out rows.
  """
  test = None
  if path is None:
    x, y = data_lib.digits()
    source = "sklearn digits"
  else:
    (x, y), test = data_lib.mnist_like_splits(path)
    source = f"idx {path}"
  if test is None:
    train, held = data_lib.split_indices(len(y), holdout, SPLIT_SEED, y)
    (x, y), test = (x[train], y[train]), (x[held], y[held])
    split = f"stratified {holdout:.0%}"
  else:
    split = "t10k files"
  x_test, y_test = test
  if tiny:
    rows, held_rows = TINY_ROWS["mlp"]
    x, y = x[:rows], y[:rows]
    x_test, y_test = x_test[:held_rows], y_test[:held_rows]
    hidden = 16
  n = x.shape[0]
  num_classes = int(max(y.max(), y_test.max())) + 1
  apply, params = _functional(
      MLP((x.shape[1], hidden, hidden, num_classes), rngs=nnx.Rngs(seed)))

  def loss(params, batch):
    logits = apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  def eval_metrics(params, d):
    logits = apply(params, d["x"])
    correct = jnp.argmax(logits, axis=-1) == d["y"]
    return {"test_loss": optax.softmax_cross_entropy_with_integer_labels(
                logits, d["y"]).mean(),
            "test_accuracy": jnp.mean(correct.astype(jnp.float32))}

  arrays = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  m, m_test = min(n, max_eval), min(x_test.shape[0], max_eval)
  heldout = {"x": jnp.asarray(x_test[:m_test]),
             "y": jnp.asarray(y_test[:m_test])}
  return Task(
      name="mlp",
      description=f"{source}: n={n} (+{m_test} held out, {split}), "
                  f"features={x.shape[1]}, classes={num_classes}, "
                  f"hidden={hidden}x2, batch={batch_size}",
      params=params, data=arrays, loss=loss,
      sample=lambda d, key: _rows(d, key, batch_size, n),
      eval_loss=lambda p, d: loss(p, {k: v[:m] for k, v in d.items()}),
      heldout=heldout, eval_metrics=eval_metrics)


# ----------------------------------------------------------------- charlm ---


class Block(nnx.Module):
  """Pre-norm Transformer block: causal self-attention and an MLP."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CharTransformer(nnx.Module):
  """A small decoder-only Transformer over characters."""

  def __init__(self, vocab: int, context: int, width: int, depth: int,
               heads: int, *, rngs: nnx.Rngs):
    self.tokens = nnx.Embed(vocab, width, rngs=rngs)
    self.positions = nnx.Embed(context, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, ids):
    x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[-1]))
    mask = nnx.make_causal_mask(ids)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def charlm(path: Optional[str] = None, batch_size: int = 32, context: int = 64,
           width: int = 64, depth: int = 2, heads: int = 4, tiny: bool = False,
           seed: int = 0, eval_windows: int = 64, val_windows: int = 128,
           holdout: float = TEXT_HOLDOUT) -> Task:
  """Next-character prediction with a small causal Transformer (nats/char).

  The last ``holdout`` fraction of the text is held out (training windows
  never reach into it); ``val_loss`` is the mean next-character loss over at
  most ``val_windows`` evenly spaced windows of it. The vocabulary is the
  whole text's.
  """
  if path is None:
    text, source = data_lib.pydoc_topics(), "pydoc_data.topics"
  else:
    text, source = data_lib.text_file(path), f"text {path}"
  if tiny:
    text, context, width, depth, heads = text[:20000], 16, 16, 1, 2
  vocab = sorted(set(text))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  cut = int(round((1.0 - holdout) * ids.size))
  ids, val = ids[:cut], ids[cut:]
  if min(ids.size, val.size) <= context + 1:
    raise data_lib.DataError(
        f"{source} has {len(text)} characters: {ids.size} for training and "
        f"{val.size} held out (the last {holdout:.0%}); each part needs more "
        f"than {context + 1}")
  apply, params = _functional(CharTransformer(
      len(vocab), context, width, depth, heads, rngs=nnx.Rngs(seed)))
  starts = np.random.default_rng(seed).integers(
      0, ids.size - context - 1, eval_windows)
  val_starts = np.unique(np.linspace(0, val.size - context - 1,
                                     val_windows).astype(np.int64))

  def windows(ids, starts):
    offsets = starts[:, None] + jnp.arange(context + 1)
    return ids[offsets]

  def loss(params, batch):
    logits = apply(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()

  def sample(d, key):
    s = jax.random.randint(key, (batch_size,), 0, d["ids"].shape[0] - context - 1)
    return windows(d["ids"], s)

  evaluate = lambda p, d: loss(p, windows(d["ids"], d["eval_starts"]))
  return Task(
      name="charlm",
      description=f"{source}: {ids.size} chars (+{val.size} held out, the "
                  f"last {holdout:.0%}), vocab={len(vocab)}, "
                  f"context={context}, width={width}, depth={depth}, "
                  f"batch={batch_size}",
      params=params, data={"ids": jnp.asarray(ids),
                            "eval_starts": jnp.asarray(starts, jnp.int32)},
      loss=loss, sample=sample, eval_loss=evaluate,
      heldout={"ids": jnp.asarray(val),
               "eval_starts": jnp.asarray(val_starts, jnp.int32)},
      eval_metrics=lambda p, d: {"val_loss": evaluate(p, d)})


def make_task(name: str, path: Optional[str] = None,
              batch_size: Optional[int] = None, tiny: bool = False,
              seed: int = 0) -> Task:
  """Builds a task by name; ``batch_size=None`` picks the task's default."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
  if batch_size is None:
    batch_size = DEFAULT_BATCH[name][1 if tiny else 0]
  builders: dict[str, Callable[..., Task]] = {
      "logreg": logreg, "mlp": mlp, "charlm": charlm}
  return builders[name](path=path, batch_size=batch_size, tiny=tiny, seed=seed)
