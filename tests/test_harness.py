"""The shared harness: every registered optimizer passes the same checks."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import harness

CASES = harness.discover()
IDS = [c.name for c in CASES]
by_name = pytest.mark.parametrize("case", CASES, ids=IDS)


def _numeric(tree):
  """Replaces typed PRNG keys by their raw data so that they can be compared."""
  def leaf(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x
  return jax.tree.map(leaf, tree)


def _close(a, b, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(_numeric(a), _numeric(b), rtol=rtol, atol=atol)


@by_name
def test_converges_on_convex_problem(case):
  opt = case.make(**case.hparams)
  loss0 = harness.loss_fn(harness.init_params())
  params, _ = harness.run(opt, case.steps)
  loss = harness.loss_fn(params)
  assert np.isfinite(loss)
  assert loss <= case.tol * loss0, (case.name, float(loss), float(loss0))


class JitVariantsTest(chex.TestCase):
  """With and without jit give the same trajectory."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(c.name, c) for c in CASES])
  def test_jit_and_no_jit_agree(self, case):
    opt = case.make(**case.hparams)
    step = self.variant(harness.make_step(opt))
    params = harness.init_params()
    state = opt.init(params)
    for _ in range(4):
      params, state, _ = step(params, state)
    ref_params, ref_state = harness.run(opt, 4)
    _close(params, ref_params)
    _close(state, ref_state)


@by_name
def test_no_recompilation(case):
  opt = case.make(**case.hparams)
  traces = []

  def counted(params, state):
    traces.append(1)
    return harness.make_step(opt)(params, state)

  step = jax.jit(counted)
  params = harness.init_params()
  state = opt.init(params)
  for _ in range(3):
    params, state, _ = step(params, state)
  assert len(traces) == 1
  assert step._cache_size() == 1


@by_name
def test_unknown_extra_args_are_ignored(case):
  opt = case.make(**case.hparams)
  params = harness.init_params()
  value, grads = jax.value_and_grad(harness.loss_fn)(params)
  state = opt.init(params)
  plain = opt.update(grads, state, params, value=value)
  extra = opt.update(grads, state, params, value=value, not_an_argument="x",
                     another=jnp.ones(3))
  _close(plain, extra, rtol=0, atol=0)


@by_name
def test_inject_hyperparams_gives_equal_results(case):
  opt = case.make(**case.hparams)
  injected = optax.inject_hyperparams(case.make)(**case.hparams)
  params_a, _ = harness.run(opt, 5)
  params_b, state_b = harness.run(injected, 5)
  _close(params_a, params_b)
  assert set(case.hparams) <= set(state_b.hyperparams)


@by_name
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dtypes_are_stable(case, dtype):
  opt = case.make(**case.hparams)
  params = jax.tree.map(lambda t: (0.3 * t).astype(dtype), harness.TARGET)
  state0 = opt.init(params)
  shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), state0)

  @jax.jit
  def two_steps(params, state):
    for _ in range(2):
      grads = jax.tree.map(lambda g: g.astype(dtype),
                           jax.grad(harness.loss_fn)(params))
      updates, state = opt.update(grads, state, params,
                                  value=harness.loss_fn(params))
      params = optax.apply_updates(params, updates)
    return updates, params, state

  updates, params, state = two_steps(params, state0)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
  for p in jax.tree.leaves(params):
    assert p.dtype == dtype
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes0

  # The state can be carried through both branches of a lax.cond.
  @jax.jit
  def maybe_step(pred, params, state):
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)

    def do(state):
      return opt.update(grads, state, params, value=jnp.float32(1.0))

    def skip(state):
      return jax.tree.map(jnp.zeros_like, grads), state

    return jax.lax.cond(pred, do, skip, state)

  for pred in (True, False):
    _, cond_state = maybe_step(pred, params, state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), cond_state) == shapes0


@by_name
def test_composes_with_multi_steps(case):
  opt = optax.MultiSteps(case.make(**case.hparams), every_k_schedule=2)
  step = jax.jit(harness.make_step(opt))
  params0 = harness.init_params()
  state = opt.init(params0)
  params1, state, _ = step(params0, state)
  _close(params1, params0, rtol=0, atol=0)  # accumulating: no move yet
  params2, state, _ = step(params1, state)
  moved = jax.tree.map(lambda a, b: jnp.any(a != b), params2, params1)
  assert any(jax.tree.leaves(moved))


@by_name
def test_apply_if_finite_skips_nan_gradients(case):
  opt = optax.apply_if_finite(case.make(**case.hparams), max_consecutive_errors=5)
  params, state = harness.run(opt, 2)
  nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  updates, new_state = jax.jit(opt.update)(
      nan_grads, state, params, value=jnp.float32(1.0))
  new_params = optax.apply_updates(params, updates)
  _close(new_params, params, rtol=0, atol=0)
  _close(new_state.inner_state, state.inner_state, rtol=0, atol=0)
  assert int(new_state.notfinite_count) == 1


@by_name
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_one_non_finite_coordinate_is_never_hidden(case, bad):
  """One non-finite gradient coordinate: either the update shows it (some
  update is not finite, so ``apply_if_finite`` skips the step and keeps the
  old state) or the update and the whole new state are finite. A finite
  update over an infinite or NaN state (a corrupted momentum or distance
  estimate) is the failure."""
  opt = case.make(**case.hparams)
  params, state = harness.run(opt, 2)
  grads = jax.grad(harness.loss_fn)(params)
  leaves, treedef = jax.tree.flatten(grads)
  leaves[0] = leaves[0].reshape(-1).at[0].set(bad).reshape(leaves[0].shape)
  updates, new_state = jax.jit(opt.update)(
      treedef.unflatten(leaves), state, params, value=jnp.float32(1.0))
  finite = lambda tree: all(bool(jnp.all(jnp.isfinite(x))) for x in
                            jax.tree.leaves(_numeric(tree))
                            if jnp.issubdtype(x.dtype, jnp.inexact))
  if finite(updates):
    assert finite(new_state), "finite update over a non-finite state"


@by_name
def test_init_on_abstract_inputs(case):
  opt = case.make(**case.hparams)
  params = harness.init_params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), opt.init(params))
  direct = jax.tree.map(lambda x: (x.shape, x.dtype), opt.init(abstract))
  traced = jax.tree.map(lambda x: (x.shape, x.dtype),
                        jax.eval_shape(opt.init, abstract))
  assert direct == expected
  assert traced == expected


@by_name
def test_pure_function(case):
  opt = case.make(**case.hparams)
  params, state = harness.run(opt, 3)
  grads = jax.grad(harness.loss_fn)(params)
  value = harness.loss_fn(params)
  first = opt.update(grads, state, params, value=value)
  second = opt.update(grads, state, params, value=value)
  _close(first, second, rtol=0, atol=0)


@by_name
def test_state_types_stable_on_explicit_mesh(case):
  _check_state_types_on_explicit_mesh(lambda: case.make(**case.hparams))


def _check_state_types_on_explicit_mesh(make):
  """optax's sharding check: on an Explicit mesh with a leaf sharded
  ``P(None, "x")``, ``jax.typeof`` of every state leaf (shape, dtype,
  sharding) is the same after init, an eager update and a jitted update."""
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = harness.init_params()
    params["w"] = jax.sharding.reshard(params["w"], jax.P(None, "x"))
    opt = make()
    grads = jax.tree.map(jnp.ones_like, params)
    update = lambda g, s, p: opt.update(g, s, p, value=jnp.float32(1.0))
    state = opt.init(params)
    eager = update(grads, state, params)[1]
    jitted = jax.jit(update)(grads, state, params)[1]
    types = [jax.tree.map(jax.typeof, s) for s in (state, eager, jitted)]
    assert types[0] == types[1] == types[2], types
    updates = jax.jit(update)(grads, state, params)[0]
    assert jax.typeof(updates["w"]).sharding.spec == jax.P(None, "x")


# Every public factory, called the way users call it (required arguments only,
# no wrapper hiding the defaults), through the optax wrappers.
DEFAULTS = harness.discover_defaults()
by_default = pytest.mark.parametrize("default", DEFAULTS,
                                     ids=[d.name for d in DEFAULTS])


def _factories():
  """Names of the public functions that return a gradient transformation."""
  import inspect
  import optax_sign
  names = []
  for name in optax_sign.__all__:
    obj = getattr(optax_sign, name)
    if inspect.isfunction(obj):
      ret = inspect.signature(obj).return_annotation
      if "GradientTransformation" in str(ret):
        names.append(name)
  return names


# Wrappers that need a device mesh; tests/test_data_parallel.py covers them.
_NEEDS_MESH = {"data_parallel", "sharded_majority_vote"}


def test_every_public_factory_has_a_default_call():
  assert sorted(set(_factories()) - _NEEDS_MESH) == sorted(
      d.name for d in DEFAULTS)


def _types(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), _numeric(tree))


@by_default
def test_inject_hyperparams_with_defaults(default):
  """``inject_hyperparams(factory)(*required)``: eager init, jitted update, the
  same trajectory as the factory itself and a state whose structure and dtypes
  never change; init under jit gives the same state."""
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    direct = default.factory(*default.args, **default.kwargs)
    injected = optax.inject_hyperparams(default.factory)(
        *default.args, **default.kwargs)
    params = harness.init_params()
    state0 = injected.init(params)
    ref_params, _ = harness.run(direct, default.steps)
    got_params, state = harness.run(injected, default.steps)
    _close(got_params, ref_params, *default.rounding_tol)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert _types(state) == _types(state0)
    jit_state0 = jax.jit(injected.init)(params)
    _close(jit_state0, state0, rtol=0, atol=0)
    assert jax.tree.structure(jit_state0) == jax.tree.structure(state0)


@by_default
def test_defaults_preserve_bf16(default):
  """optax's dtype check: bf16 parameters give bf16 updates and a state whose
  dtypes do not change under jit."""
  tx = default.factory(*default.args, **default.kwargs)
  params = harness.init_params(jnp.bfloat16)
  state0 = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.float32(1.0)))
  updates, state = update(grads, state0, params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.bfloat16
  assert _types(state) == _types(state0)


@by_default
def test_defaults_state_types_stable_on_explicit_mesh(default):
  _check_state_types_on_explicit_mesh(
      lambda: default.factory(*default.args, **default.kwargs))


@by_default
def test_defaults_jit_and_no_jit_agree(default):
  tx = default.factory(*default.args, **default.kwargs)
  eager_params, eager_state = harness.run(tx, default.steps, jit=False)
  jit_params, jit_state = harness.run(tx, default.steps)
  _close(eager_params, jit_params, *default.rounding_tol)
  _close(eager_state, jit_state, *default.rounding_tol)
