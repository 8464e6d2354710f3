"""Finite in, finite out, over random trees of every registered optimizer.

Each registered case (tests/harness.py) runs three jitted steps on a tree of
odd, empty, scalar and matrix leaves in float32, bfloat16 and float16 with
values of magnitude 1e-30, 1 and 1e30 (float16: 1e-7 and 1e4, its range):
updates, parameters and state stay finite, updates keep the gradients'
dtypes and the state keeps its shapes and dtypes. Seeded NumPy draws stand in
for a property-based search, so a failure reproduces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import harness

_SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (17, 9)]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}
_SCALES = {"tiny": {"float16": 1e-7}, "unit": {}, "huge": {"float16": 1e4}}
_DEFAULT_SCALE = {"tiny": 1e-30, "unit": 1.0, "huge": 1e30}

# Adam-style second moments g^2 overflow at |g| ~ 1e19 (float32 and
# bfloat16), as in optax.adam: the state holds inf, the update stays finite.
_SQUARES_OVERFLOW = {("local_steps_model_averaging", "huge"),
                     ("alias_momentum", "huge")}
# Not finite at all: optax.adamw's eps=1e-8 is 0 in float16, so a zero second
# moment gives 0/0 (optax.adamw alone does the same); the momentum variant's
# distance estimate grows like d |g| n per step, so at |g| ~ 1e30 d g
# overflows (an open defect of that experimental reconstruction).
_KNOWN_NOT_FINITE = {("local_steps_model_averaging", "float16", "tiny"),
                     ("alias_momentum", "float32", "huge"),
                     ("alias_momentum", "bfloat16", "huge")}


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact))


def _types(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.parametrize("scale", list(_SCALES))
@pytest.mark.parametrize("dtype", list(_DTYPES))
@pytest.mark.parametrize("case", harness.discover(), ids=lambda c: c.name)
def test_finite_in_finite_out(case, dtype, scale):
  if (case.name, dtype, scale) in _KNOWN_NOT_FINITE:
    pytest.skip("known, see _KNOWN_NOT_FINITE")
  magnitude = _SCALES[scale].get(dtype, _DEFAULT_SCALE[scale])
  rng = np.random.RandomState(len(case.name) * 7 + len(dtype) + len(scale))
  draw = lambda shape: jnp.asarray(rng.randn(*shape) * magnitude,
                                   _DTYPES[dtype])
  params = {f"p{i}": draw(s) for i, s in enumerate(_SHAPES)}
  opt = case.make(**case.hparams)
  state = opt.init(params)
  types = _types(state)
  update = jax.jit(opt.update)
  for _ in range(3):
    grads = jax.tree.map(lambda p: draw(p.shape), params)
    updates, state = update(grads, state, params, value=jnp.float32(1.0))
    params = optax.apply_updates(params, updates)
    assert _finite(updates) and _finite(params)
    assert _types(updates) == _types(grads)
    assert _types(state) == types
    if (case.name, scale) not in _SQUARES_OVERFLOW:
      assert _finite(state)
