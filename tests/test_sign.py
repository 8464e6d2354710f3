"""Specification tests for the sign operators and the ready sign optimizers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sign


def _random_tree(key, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (5, 7)).astype(dtype),
          "b": jax.random.normal(k2, (7,)).astype(dtype)}


@pytest.mark.parametrize("tie,zero_value", [("zero", 0.0), ("positive", 1.0),
                                            ("negative", -1.0)])
def test_tie_sign_policies(tie, zero_value):
  x = jnp.array([-2.0, -0.0, 0.0, 3.0, jnp.nan], jnp.bfloat16)
  s = optax_sign.tie_sign(x, tie)
  assert s.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(s[:4], np.float32), [-1.0, zero_value, zero_value, 1.0])
  assert np.isnan(float(s[4]))  # NaN is never hidden


@pytest.mark.parametrize("tie", optax_sign.TIE_POLICIES)
def test_scale_by_sign_is_sign_of_gradient(tie):
  grads = {"a": jnp.array([1.5, 0.0, -2.0]), "b": jnp.zeros((2,), jnp.bfloat16)}
  tx = optax_sign.scale_by_sign(tie)
  updates, _ = tx.update(grads, tx.init(grads))
  zero = {"zero": 0.0, "positive": 1.0, "negative": -1.0}[tie]
  np.testing.assert_array_equal(updates["a"], [1.0, zero, -1.0])
  np.testing.assert_array_equal(np.asarray(updates["b"], np.float32), [zero] * 2)
  assert updates["b"].dtype == jnp.bfloat16


def test_sign_sgd_step_has_learning_rate_magnitude():
  params = _random_tree(jax.random.key(1))
  grads = _random_tree(jax.random.key(2))
  tx = optax_sign.sign_sgd(0.125)
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(
      updates, jax.tree.map(lambda g: -0.125 * jnp.sign(g), grads))


def _lion_runs(dtype, steps=100, weight_decay=0.01):
  """Runs optax.lion and our chain on the same gradient and parameter stream."""
  lr, b1, b2 = 3e-3, 0.9, 0.99
  ours = optax.chain(optax_sign.sign_momentum(b1, b2, jnp.float32),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(lr))
  ref = optax.lion(lr, b1, b2, mu_dtype=jnp.float32,
                   weight_decay=weight_decay)
  params = _random_tree(jax.random.key(0), dtype)
  s_ours, s_ref = ours.init(params), ref.init(params)
  upd_ours = jax.jit(ours.update)
  upd_ref = jax.jit(ref.update)
  for t in range(steps):
    grads = _random_tree(jax.random.key(100 + t), dtype)
    u_ours, s_ours = upd_ours(grads, s_ours, params)
    u_ref, s_ref = upd_ref(grads, s_ref, params)
    yield u_ours, u_ref, s_ours, s_ref
    params = optax.apply_updates(params, u_ours)


def test_sign_momentum_chain_reproduces_optax_lion_f32():
  for u_ours, u_ref, s_ours, s_ref in _lion_runs(jnp.float32):
    chex.assert_trees_all_close(u_ours, u_ref, rtol=1e-6, atol=1e-9)
    chex.assert_trees_all_close(optax.tree.get(s_ours, "mu"),
                                optax.tree.get(s_ref, "mu"), rtol=1e-6)


def test_sign_momentum_reproduces_optax_lion_bf16():
  # The sign direction and the momentum equal optax's exactly; the full update
  # differs only by our final rounding to bf16 (the gradient dtype), where
  # optax returns float32: three bf16 roundings (decay term, sum, product).
  b1, b2 = 0.9, 0.99
  ours, ref = optax_sign.sign_momentum(b1, b2, jnp.float32), optax.scale_by_lion(
      b1, b2, mu_dtype=jnp.float32)
  grads = _random_tree(jax.random.key(0), jnp.bfloat16)
  s_ours, s_ref = ours.init(grads), ref.init(grads)
  for t in range(100):
    grads = _random_tree(jax.random.key(100 + t), jnp.bfloat16)
    d_ours, s_ours = ours.update(grads, s_ours)
    d_ref, s_ref = ref.update(grads, s_ref)
    chex.assert_trees_all_equal(
        jax.tree.map(lambda d: d.astype(jnp.float32), d_ours), d_ref)
    chex.assert_trees_all_equal(optax.tree.get(s_ours, "mu"), s_ref.mu)
  for u_ours, u_ref, _, _ in _lion_runs(jnp.bfloat16):
    for leaf in jax.tree.leaves(u_ours):
      assert leaf.dtype == jnp.bfloat16
    chex.assert_trees_all_close(
        jax.tree.map(lambda u: u.astype(jnp.float32), u_ours),
        jax.tree.map(lambda u: u.astype(jnp.float32), u_ref),
        rtol=2.0 ** -6, atol=0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("tie", ["zero", "positive"])
def test_low_precision_never_flips_or_zeroes_a_sign(dtype, tie):
  # A momentum far below the dtype's range: its sign must survive the cast.
  tx = optax_sign.sign_momentum(b1=0.9, b2=0.99, tie=tie)
  grads = {"x": jnp.zeros(2, dtype)}
  state = tx.init(grads)
  tiny = 2.0 * float(jnp.finfo(jnp.float32).tiny)  # normal in float32
  mu = jnp.array([-tiny, tiny], jnp.float32)
  u, _ = tx.update(grads, (state[0]._replace(mu={"x": mu}), state[1]))
  np.testing.assert_array_equal(np.asarray(u["x"], np.float32), [-1.0, 1.0])


def test_signum_is_sign_of_ema_numpy_reference():
  beta, lr = 0.8, 0.01
  tx = optax_sign.signum(lr, beta=beta)
  rng = np.random.default_rng(0)
  params = {"x": jnp.zeros(6)}
  state = tx.init(params)
  m = np.zeros(6)
  for _ in range(20):
    g = rng.normal(size=6).astype(np.float32)
    u, state = tx.update({"x": jnp.asarray(g)}, state, params)
    m = beta * m + (1 - beta) * g
    np.testing.assert_allclose(u["x"], -lr * np.sign(m), rtol=1e-6)


def test_lion_like_applies_decoupled_decay_outside_the_sign():
  params = {"x": jnp.array([2.0, -4.0])}
  grads = {"x": jnp.array([1.0, 1.0])}
  tx = optax_sign.lion_like(0.1, b1=0.0, b2=0.0, weight_decay=0.5)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["x"], -0.1 * (np.array([1.0, 1.0])
                                             + 0.5 * np.array([2.0, -4.0])))


def test_randomized_sign_is_unbiased_and_clipped():
  bound = 2.0
  v = jnp.array([-3.0, -1.0, 0.0, 0.5, 1.5, 2.0, 5.0])
  k = 4000
  keys = jax.random.split(jax.random.key(7), k)
  samples = jax.vmap(lambda key: optax_sign.randomized_sign(key, v, bound))(keys)
  assert set(np.unique(np.asarray(samples)).tolist()) <= {-1.0, 1.0}
  expected = np.clip(np.asarray(v) / bound, -1, 1)
  np.testing.assert_allclose(samples.mean(0), expected, atol=4 / np.sqrt(k))
  # Coordinates with |v| >= R are deterministic.
  np.testing.assert_array_equal(samples[:, 0], -1.0)
  np.testing.assert_array_equal(samples[:, -1], 1.0)
  np.testing.assert_array_equal(samples[:, -2], 1.0)


def test_randomized_sign_state_gives_fresh_and_reproducible_samples():
  grads = {"a": jnp.zeros(64), "b": jnp.zeros((4, 4), jnp.bfloat16)}
  tx = optax_sign.scale_by_randomized_sign(jax.random.key(3), bound=1.0)
  s = tx.init(grads)
  u1, s = tx.update(grads, s)
  u2, _ = tx.update(grads, s)
  assert u1["b"].dtype == jnp.bfloat16
  assert np.any(np.asarray(u1["a"]) != np.asarray(u2["a"]))  # fresh samples
  # Two workers holding equal keys draw equal samples.
  other = optax_sign.scale_by_randomized_sign(jax.random.key(3), bound=1.0)
  v1, _ = other.update(grads, other.init(grads))
  chex.assert_trees_all_equal(u1, v1)
  # Raw uint32 keys are accepted too.
  raw = optax_sign.scale_by_randomized_sign(jax.random.PRNGKey(3), bound=1.0)
  w1, raw_state = raw.update(grads, raw.init(grads))
  w2, _ = raw.update(grads, raw_state)
  assert set(np.unique(np.asarray(w1["a"])).tolist()) == {-1.0, 1.0}
  assert np.any(np.asarray(w1["a"]) != np.asarray(w2["a"]))


@pytest.mark.parametrize("factory,kwargs,name", [
    (optax_sign.sign_momentum, {"b1": 1.5}, "b1"),
    (optax_sign.sign_momentum, {"b1": -0.1}, "b1"),
    (optax_sign.sign_momentum, {"b2": 1.01}, "b2"),
    (optax_sign.scale_by_lion_momentum, {"b2": float("nan")}, "b2"),
    (optax_sign.sign_momentum, {"tie": "up"}, "tie"),
    (optax_sign.scale_by_sign, {"tie": None}, "tie"),
    (optax_sign.sign_momentum, {"mu_dtype": jnp.int32}, "mu_dtype"),
    (optax_sign.scale_by_error_feedback_sign, {"state_dtype": "int8"},
     "state_dtype"),
    (optax_sign.sign_sgd, {"learning_rate": -1.0}, "learning_rate"),
    (optax_sign.signum, {"learning_rate": 0.1, "beta": 2.0}, "beta"),
    (optax_sign.lion_like, {"learning_rate": 0.1, "weight_decay": -1.0},
     "weight_decay"),
])
def test_bad_hyperparameters_raise_naming_the_argument(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)


@pytest.mark.parametrize("bound", [0.0, -1.0])
def test_randomized_sign_rejects_nonpositive_bound(bound):
  with pytest.raises(ValueError, match="bound"):
    optax_sign.scale_by_randomized_sign(jax.random.key(0), bound=bound)


@pytest.mark.parametrize("key", [0, 1.5, np.zeros(2, np.uint32),
                                 jnp.zeros(3, jnp.uint32),
                                 jax.random.split(jax.random.key(0), 2)])
def test_randomized_sign_rejects_non_keys(key):
  with pytest.raises(TypeError, match="key"):
    optax_sign.scale_by_randomized_sign(key, bound=1.0)


# The functions that mirror an optax one, called with the same positional
# arguments (every argument of the optax function, none left at its default).
_MIRRORS = [
    (optax_sign.sign_sgd, optax.sign_sgd, (0.01,)),
    (optax_sign.signum, optax.signum, (0.01, 0.8, jnp.float32)),
    (optax_sign.lion_like, optax.lion,
     (0.01, 0.8, 0.95, jnp.float32, 0.1, None)),
    (optax_sign.sign_momentum, optax.scale_by_lion, (0.8, 0.95, None)),
]


@pytest.mark.parametrize("ours,theirs,args", _MIRRORS,
                         ids=[m[0].__name__ for m in _MIRRORS])
def test_mirrors_keep_optax_names_order_and_defaults(ours, theirs, args):
  """Optax's parameters come first, in its order, with its defaults; the
  extras are keyword-only."""
  import inspect
  mine = list(inspect.signature(ours).parameters.values())
  ref = list(inspect.signature(theirs).parameters.values())
  ref = [p for p in ref if p.kind != p.KEYWORD_ONLY]
  for a, b in zip(mine, ref):
    assert (a.name, a.kind) == (b.name, b.kind), ours.__name__
    assert a.default == b.default or (a.default is b.default), a.name
  for extra in mine[len(ref):]:
    assert extra.kind == extra.KEYWORD_ONLY, (ours.__name__, extra.name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("ours,theirs,args", _MIRRORS,
                         ids=[m[0].__name__ for m in _MIRRORS])
def test_mirrors_equal_optax_called_positionally(ours, theirs, args, dtype):
  """The same positional call gives optax's updates and state dtypes."""
  tx_ours, tx_ref = ours(*args), theirs(*args)
  params = _random_tree(jax.random.key(0), dtype)
  s_ours, s_ref = tx_ours.init(params), tx_ref.init(params)
  for t in range(20):
    grads = _random_tree(jax.random.key(100 + t), dtype)
    u_ours, s_ours = tx_ours.update(grads, s_ours, params)
    u_ref, s_ref = tx_ref.update(grads, s_ref, params)
    # Ours rounds the update to the gradient dtype; optax may keep float32.
    chex.assert_trees_all_close(
        jax.tree.map(lambda u: u.astype(jnp.float32), u_ours),
        jax.tree.map(lambda u: u.astype(jnp.float32), u_ref),
        rtol=2.0 ** -7 if dtype == jnp.bfloat16 else 1e-6, atol=1e-9)
    params = optax.apply_updates(params, u_ours)
  dtypes = lambda s: sorted(str(x.dtype) for x in jax.tree.leaves(s)
                            if x.ndim > 0)
  assert dtypes(s_ours) == dtypes(s_ref)
