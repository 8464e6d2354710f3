"""Benchmark tasks: models, losses and batch samplers.

A :class:`Task` is purely functional so that every optimizer sees the same
initial parameters and the same batch sequence: ``loss(params, batch)`` is a
scalar, ``sample(data, key)`` draws a mini-batch inside ``jit`` from arrays
passed as arguments (never baked into the compiled program), and
``eval_loss(params, data)`` is the full objective used for the curves.

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
           tiny: bool = False, seed: int = 0) -> Task:
  """L2-regularized logistic regression with labels in {-1, +1}.

  .. math:: f(w, b) = \\frac1n\\sum_i \\log(1 + e^{-y_i(a_i^\\top w + b)})
    + \\frac{\\lambda}{2}\\|w\\|_2^2

  Dense features for the default data; LIBSVM files keep their sparse rows
  (padded index/value arrays), so wide files never become dense matrices.
  """
  del seed  # the initial point is zero
  if path is None:
    x, y = data_lib.breast_cancer()
    if tiny:
      x, y = x[:128], y[:128]
    arrays = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    dim, source = x.shape[1], "sklearn breast_cancer (standardized)"
  else:
    rows, y = data_lib.parse_libsvm(path)
    if tiny:
      rows = data_lib.SparseRows(rows.index[:128], rows.value[:128],
                                 rows.num_features)
      y = y[:128]
    arrays = {"index": jnp.asarray(rows.index), "value": jnp.asarray(rows.value),
              "y": jnp.asarray(y)}
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

  params = {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
  return Task(
      name="logreg",
      description=f"{source}: n={n}, d={dim}, l2={l2:g}, "
                  f"batch={'full' if batch_size <= 0 or batch_size >= n else batch_size}",
      params=params, data=arrays, loss=loss,
      sample=lambda d, key: _rows(d, key, batch_size, n),
      eval_loss=loss)


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
        tiny: bool = False, seed: int = 0, max_eval: int = 10000) -> Task:
  """A Flax NNX MLP with two hidden layers and softmax cross-entropy."""
  if path is None:
    x, y = data_lib.digits()
    source = "sklearn digits"
  else:
    x, y = data_lib.mnist_like(path)
    source = f"idx {path}"
  if tiny:
    x, y, hidden = x[:256], y[:256], 16
  n, num_classes = x.shape[0], int(y.max()) + 1
  apply, params = _functional(
      MLP((x.shape[1], hidden, hidden, num_classes), rngs=nnx.Rngs(seed)))

  def loss(params, batch):
    logits = apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  arrays = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  m = min(n, max_eval)
  return Task(
      name="mlp",
      description=f"{source}: n={n}, features={x.shape[1]}, "
                  f"classes={num_classes}, hidden={hidden}x2, batch={batch_size}",
      params=params, data=arrays, loss=loss,
      sample=lambda d, key: _rows(d, key, batch_size, n),
      eval_loss=lambda p, d: loss(p, {k: v[:m] for k, v in d.items()}))


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
           seed: int = 0, eval_windows: int = 64) -> Task:
  """Next-character prediction with a small causal Transformer (nats/char)."""
  if path is None:
    text, source = data_lib.pydoc_topics(), "pydoc_data.topics"
  else:
    text, source = data_lib.text_file(path), f"text {path}"
  if tiny:
    text, context, width, depth, heads = text[:20000], 16, 16, 1, 2
  vocab = sorted(set(text))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  if ids.size <= context + 1:
    raise data_lib.DataError(
        f"{source} has {ids.size} characters; need more than {context + 1}")
  apply, params = _functional(CharTransformer(
      len(vocab), context, width, depth, heads, rngs=nnx.Rngs(seed)))
  starts = np.random.default_rng(seed).integers(
      0, ids.size - context - 1, eval_windows)

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

  return Task(
      name="charlm",
      description=f"{source}: {ids.size} chars, vocab={len(vocab)}, "
                  f"context={context}, width={width}, depth={depth}, "
                  f"batch={batch_size}",
      params=params, data={"ids": jnp.asarray(ids),
                            "eval_starts": jnp.asarray(starts, jnp.int32)},
      loss=loss, sample=sample,
      eval_loss=lambda p, d: loss(p, windows(d["ids"], d["eval_starts"])))


def make_task(name: str, path: Optional[str] = None,
              batch_size: Optional[int] = None, tiny: bool = False,
              seed: int = 0) -> Task:
  """Builds a task by name; ``batch_size=None`` picks the task's default."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
  if batch_size is None:
    batch_size = DEFAULT_BATCH[name][1 if tiny else 0]
  builder = {"logreg": logreg, "mlp": mlp, "charlm": charlm}[name]
  return builder(path=path, batch_size=batch_size, tiny=tiny, seed=seed)
