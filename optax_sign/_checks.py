"""Validation of hyperparameters at construction time.

Every public factory validates its arguments here so that a bad value raises a
``ValueError`` (or ``TypeError``) that names the argument and the allowed range,
instead of turning into NaN deep inside a jitted update. Values that are JAX
tracers (for example under ``optax.inject_hyperparams`` inside ``jit``) cannot be
inspected and are accepted as they are.
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TIE_POLICIES = ("zero", "positive", "negative")


def _concrete(value: Any) -> Optional[float]:
  """Returns ``value`` as a Python float, or None if it is traced or callable."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError) as err:
    raise TypeError(f"expected a real number, got {value!r}") from err


def check_interval(name: str, value: Any, low: float, high: float,
                   *, low_open: bool = False, high_open: bool = False) -> None:
  """Raises ``ValueError`` unless ``low (<|<=) value (<|<=) high``."""
  v = _concrete(value)
  if v is None:
    return
  too_low = v <= low if low_open else v < low
  too_high = v >= high if high_open else v > high
  if too_low or too_high or v != v:  # v != v catches NaN
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    raise ValueError(
        f"{name} must lie in {left}{low}, {high}{right}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
  check_interval(name, value, 0.0, float("inf"), low_open=True)


def check_nonnegative(name: str, value: Any) -> None:
  check_interval(name, value, 0.0, float("inf"))


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_tie(tie: Any) -> None:
  check_choice("tie", tie, TIE_POLICIES)


def check_int(name: str, value: Any, minimum: int) -> None:
  """Raises unless ``value`` is a Python or NumPy integer >= ``minimum``."""
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, (int, np.integer)) or value < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float_dtype(name: str, dtype: Any) -> jnp.dtype:
  """Returns ``dtype`` as a NumPy dtype, raising unless it is a float dtype."""
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
