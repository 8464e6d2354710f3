"""Validation of hyperparameters at construction time.

Every public factory validates its arguments here so that a bad value raises a
``ValueError`` (or ``TypeError``) that names the argument and the allowed range,
instead of turning into NaN deep inside a jitted update.

Numbers may arrive as Python or NumPy scalars or as 0-d JAX arrays (this is how
``optax.inject_hyperparams`` passes them: concrete at ``init``, traced inside a
jitted ``update``). Concrete values are checked; traced ones cannot be and are
accepted. Which state buffers exist never depends on a value that may be
traced: :func:`is_static_zero` is true only for a Python or NumPy zero.
"""

import difflib
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TIE_POLICIES = ("zero", "positive", "negative")
INT32_MAX = 2**31 - 1
# Extra arguments of ``update`` that some transformation of this package reads.
EXTRA_ARGS = ("value", "prev_grads", "alive", "sync")
_warned: set = set()


def _number(name: str, value: Any) -> Optional[float]:
  """``value`` as a Python float; None if it is traced; TypeError if no number."""
  if isinstance(value, jax.core.Tracer):
    return None
  if (isinstance(value, (str, bytes, bool, np.bool_)) or callable(value)
      or np.ndim(value) != 0):
    kind = ("a schedule" if callable(value) else f"{type(value).__name__} "
            f"{value!r}")
    raise TypeError(f"{name} must be a real number, got {kind}")
  try:
    return float(value)
  except (TypeError, ValueError) as err:
    raise TypeError(f"{name} must be a real number, got {value!r}") from err


def check_interval(name: str, value: Any, low: float, high: float,
                   *, low_open: bool = False, high_open: bool = False) -> None:
  """Raises unless ``value`` is a number with ``low (<|<=) value (<|<=) high``.

  An infinite bound is always open: infinities are never accepted.
  """
  v = _number(name, value)
  if v is None:
    return
  low_open = low_open or low == -float("inf")
  high_open = high_open or high == float("inf")
  too_low = v <= low if low_open else v < low
  too_high = v >= high if high_open else v > high
  if too_low or too_high or v != v:  # v != v catches NaN
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    raise ValueError(
        f"{name} must lie in {left}{low}, {high}{right}, got {value!r}")


def check_real(name: str, value: Any) -> None:
  """Raises unless ``value`` is a finite real number."""
  check_interval(name, value, -float("inf"), float("inf"))


def check_positive(name: str, value: Any) -> None:
  check_interval(name, value, 0.0, float("inf"), low_open=True)


def check_nonnegative(name: str, value: Any) -> None:
  check_interval(name, value, 0.0, float("inf"))


def check_nonnegative_or_schedule(name: str, value: Any) -> None:
  """A schedule (callable of the step count) or a finite number >= 0."""
  if not callable(value):
    check_nonnegative(name, value)


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_tie(tie: Any) -> None:
  check_choice("tie", tie, TIE_POLICIES)


def check_int(name: str, value: Any, minimum: int) -> None:
  """Raises unless ``value`` is an integer in ``[minimum, 2**31 - 1]``.

  Python and NumPy integers and 0-d integer arrays are accepted (a traced one
  is not checked further).
  """
  integral = (not isinstance(value, (bool, np.bool_, str, bytes))
              and np.ndim(value) == 0
              and jnp.issubdtype(getattr(value, "dtype", type(value)),
                                 np.integer))
  if not integral:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if isinstance(value, jax.core.Tracer):
    return
  if int(value) < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if int(value) > INT32_MAX:
    raise ValueError(f"{name} must be an integer <= {INT32_MAX} (int32 step "
                     f"counters), got {value!r}")


def is_static_zero(value: Any) -> bool:
  """True for a Python or NumPy zero: a value that may decide state structure.

  Arrays (concrete or traced, as ``optax.inject_hyperparams`` passes them)
  count as nonzero, so an injected hyperparameter keeps its buffer at ``init``
  and inside a jitted ``update`` alike.
  """
  if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
    return float(value) == 0.0
  return False


def static_int(value: Any) -> Optional[int]:
  """``value`` as a Python int if it is a Python or NumPy integer, else None."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  return None


def check_float_dtype(name: str, dtype: Any) -> Optional[jnp.dtype]:
  """``dtype`` as a NumPy dtype (``None`` stays None: the parameter's dtype).

  Raises unless it names a floating dtype.
  """
  if dtype is None:
    return None
  try:
    dt = jnp.dtype(dtype)
  except TypeError as err:
    raise ValueError(f"{name} must be a floating dtype, got {dtype!r}") from err
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {dtype!r}")
  return dt


def check_key(name: str, key: Any) -> jax.Array:
  """Returns ``key`` if it is a JAX PRNG key (typed or raw uint32[2])."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype,
                                                   jax.dtypes.prng_key):
    if key.shape != ():
      raise TypeError(f"{name} must be a single PRNG key, got shape {key.shape}")
    return key
  if (isinstance(key, jax.Array) and key.dtype == jnp.uint32
      and key.shape == (2,)):
    return key
  raise TypeError(
      f"{name} must be a JAX PRNG key (jax.random.key(seed) or "
      f"jax.random.PRNGKey(seed)), got {type(key).__name__}")


def warn_misspelled(extra_args: Mapping[str, Any]) -> None:
  """Warns once per name for an extra argument close to one this package reads.

  Unknown extra arguments are ignored (optax's convention), so a misspelled
  ``prev_grad=`` would otherwise silently change the algorithm.
  """
  for name in extra_args:
    if name in EXTRA_ARGS or name in _warned:
      continue
    close = difflib.get_close_matches(name, EXTRA_ARGS, n=1, cutoff=0.75)
    if close:
      _warned.add(name)
      warnings.warn(
          f"update() got the extra argument {name!r}, which no optax_sign "
          f"transformation reads; did you mean {close[0]!r}?", stacklevel=3)


def check_float_params(params: Any) -> None:
  """Raises ``TypeError`` if every leaf of ``params`` is an integer array.

  Sign updates of integer parameters round to zero when they are applied, so
  training would silently stand still.
  """
  leaves = jax.tree.leaves(params)
  dtypes = {jnp.dtype(x.dtype) for x in leaves if hasattr(x, "dtype")}
  if dtypes and not any(jnp.issubdtype(d, jnp.inexact) for d in dtypes):
    raise TypeError(
        "optax_sign updates floating-point parameters; every leaf of params "
        f"is an integer or boolean array ({', '.join(sorted(map(str, dtypes)))})"
        ": cast them to a float dtype, or leave them out with optax.masked")


def check_shapes(updates: Any, shapes: Sequence[Sequence[int]],
                 source: str) -> None:
  """Raises ``ValueError`` naming the first leaf of ``updates`` whose shape
  differs from the one ``source`` (``init``'s state, or ``params``) holds.

  A static check: shapes are known when the update is traced.
  """
  leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  if len(leaves) != len(shapes):
    raise ValueError(f"updates has {len(leaves)} leaves, {source} has "
                     f"{len(shapes)}")
  for (path, leaf), shape in zip(leaves, shapes):
    if tuple(jnp.shape(leaf)) != tuple(shape):
      raise ValueError(
          f"updates{jax.tree_util.keystr(path)} has shape "
          f"{tuple(jnp.shape(leaf))}, {source} has {tuple(shape)}: the "
          "updates must have the shapes of the parameters given to init")
