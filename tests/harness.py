"""The shared harness: every public transformation registers a ``Case`` here.

A case module is any ``tests/cases_*.py`` file defining ``CASES``, a list of
:class:`Case`, and ``DEFAULTS``, a list of :class:`Default` (every public
factory called with its defaults). ``test_harness.py`` discovers them all and
runs every check on every entry, so a new transformation joins the suite by
adding one entry to each list.
"""

import dataclasses
import glob
import importlib
import os
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Case:
  """One optimizer under test.

  Attributes:
    name: test id.
    make: factory called as ``make(**hparams)``; returns a full optimizer (with
      its learning rate) whose updates are added to the parameters.
    hparams: numeric hyperparameters, also passed to
      ``optax.inject_hyperparams(make)``.
    steps: steps for the convergence check.
    tol: the convergence check asks ``loss_final <= tol * loss_initial``.
  """
  name: str
  make: Callable[..., optax.GradientTransformation]
  hparams: Dict[str, Any]
  steps: int = 300
  tol: float = 0.05


@dataclasses.dataclass(frozen=True)
class Default:
  """A public factory called the way users call it: required arguments only.

  Attributes:
    name: the factory's public name (test id).
    factory: the public factory itself (never a wrapper hiding arguments).
    args: its required positional arguments.
    kwargs: required keyword arguments (an argument that is optional in the
      signature but required by the defaults of another).
    steps: steps to run (long enough to cross a sync or a warmup).
    rounding_tol: (rtol, atol) between two compilations of the same run
      (jit or not, hyperparameters injected or constant): float32 rounding,
      compounded by the optimizer.
  """
  name: str
  factory: Callable[..., optax.GradientTransformation]
  args: Tuple[Any, ...] = ()
  kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  steps: int = 13
  rounding_tol: Tuple[float, float] = (1e-5, 1e-6)


def _gather(attribute: str) -> list:
  found = []
  here = os.path.dirname(__file__)
  for path in sorted(glob.glob(os.path.join(here, "cases_*.py"))):
    module = importlib.import_module(os.path.basename(path)[:-3])
    found.extend(getattr(module, attribute, []))
  names = [c.name for c in found]
  assert len(names) == len(set(names)), f"duplicate {attribute}: {names}"
  return found


def discover() -> List[Case]:
  return _gather("CASES")


def discover_defaults() -> List[Default]:
  return _gather("DEFAULTS")


# A small convex problem on a two-leaf pytree:
#   f(x) = 1/2 sum_i a_i (x_i - c_i)^2, with curvatures spread over [0.5, 2].
TARGET = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
          "b": jnp.array([0.5, -0.25, 1.0])}
CURV = {"w": jnp.linspace(0.5, 2.0, 12).reshape(3, 4),
        "b": jnp.array([1.0, 2.0, 0.5])}


def init_params(dtype=jnp.float32):
  return jax.tree.map(lambda t: jnp.zeros_like(t, dtype), TARGET)


def loss_fn(params):
  terms = jax.tree.map(
      lambda x, a, c: 0.5 * jnp.sum(a * (x.astype(jnp.float32) - c) ** 2),
      params, CURV, TARGET)
  return sum(jax.tree.leaves(terms))


def make_step(opt):
  """A train step that always passes ``value=`` and an unknown extra kwarg."""

  def step(params, state):
    value, grads = jax.value_and_grad(loss_fn)(params)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, state = opt.update(grads, state, params, value=value,
                                unknown_extra_argument=1.0)
    return optax.apply_updates(params, updates), state, value

  return step


def run(opt, steps, params=None, jit=True):
  params = init_params() if params is None else params
  state = opt.init(params)
  step = make_step(opt)
  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state, _ = step(params, state)
  return params, state
