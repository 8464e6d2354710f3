"""Bad input raises naming the argument; arrays (inject_hyperparams) pass."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import harness
import optax_sign


@pytest.mark.parametrize("make,name", [
    (lambda: optax_sign.sign_momentum(b1="0.9"), "b1"),
    (lambda: optax_sign.sign_sgd("1e-3"), "learning_rate"),
    (lambda: optax_sign.scale_by_alias(d0=optax.constant_schedule(1.0)), "d0"),
    (lambda: optax_sign.scale_by_alias(eta0=lambda t: 0.0), "eta0"),
    (lambda: optax_sign.sign_momentum(b2=lambda t: 0.9), "b2"),
    (lambda: optax_sign.scale_by_randomized_sign(jax.random.key(0),
                                                 bound=lambda t: 1.0), "bound"),
    (lambda: optax_sign.lion_like(1e-3, b1=True), "b1"),
    (lambda: optax_sign.lion_like(1e-3, b1=np.ones(2)), "b1"),
])
def test_non_numbers_raise_type_error_naming_the_argument(make, name):
  with pytest.raises(TypeError, match=rf"^{name} must be a real number"):
    make()


@pytest.mark.parametrize("make,name", [
    (lambda: optax_sign.scale_by_alias(d0=float("inf")), "d0"),
    (lambda: optax_sign.scale_by_alias(initial_stepsize=float("inf")),
     "initial_stepsize"),
    (lambda: optax_sign.scale_by_alias(eta0=float("inf")), "eta0"),
    (lambda: optax_sign.scale_by_alias("lower_bound", f_lower=-float("inf")),
     "f_lower"),
    (lambda: optax_sign.alias_sign_sgd(weight_decay=float("inf")),
     "weight_decay"),
    (lambda: optax_sign.sign_sgd(float("inf")), "learning_rate"),
    (lambda: optax_sign.alias_sign_sgd(update_gap=2**31), "update_gap"),
    (lambda: optax_sign.dsm_ls(1e-3, sync_every=2**31), "sync_every"),
    (lambda: optax_sign.alias_sign_sgd(warmup_steps=2**40,
                                       warmup_stepsize=1e-3), "warmup_steps"),
    (lambda: optax_sign.alias_sign_sgd_released(100, max_stepsize=-1.0),
     "max_stepsize"),
    (lambda: optax_sign.dsm_ls(1e-3, mask="vectors"), "mask"),
])
def test_infinite_or_overflowing_values_raise_naming_the_argument(make, name):
  with pytest.raises(ValueError, match=rf"^{name} must"):
    make()


def test_nesterov_must_be_a_bool():
  with pytest.raises(TypeError, match="nesterov must be True or False"):
    optax_sign.alias_sign_sgd(momentum=0.9, nesterov="yes")


def test_concrete_integer_arrays_are_integers():
  a = optax_sign.alias_sign_sgd(update_gap=jnp.asarray(3))
  b = optax_sign.alias_sign_sgd(update_gap=3)
  pa, _ = harness.run(a, 7)
  pb, _ = harness.run(b, 7)
  jax.tree.map(np.testing.assert_allclose, pa, pb)
  with pytest.raises(ValueError, match="update_gap must be an integer"):
    optax_sign.alias_sign_sgd(update_gap=jnp.asarray(2.0))
  with pytest.raises(ValueError, match="memory='sign' requires update_gap=1"):
    optax_sign.alias_sign_sgd(memory="sign", update_gap=jnp.asarray(2))


def test_structure_follows_python_values_only():
  """A Python zero drops a buffer; an array never does (it may be traced)."""
  params = harness.init_params()
  plain = optax_sign.scale_by_alias(momentum=0.0).init(params)
  injected = optax_sign.scale_by_alias(momentum=jnp.asarray(0.0)).init(params)
  assert plain.direction == optax.EmptyState()
  assert plain.memory.window == optax.EmptyState()
  assert jax.tree.structure(injected.direction.momentum) == jax.tree.structure(
      params)
  # The same trajectory either way: a zero momentum is the plain sign (to
  # float32 rounding: the plain path multiplies the step into the sums after
  # reducing, the general one reads the stored step).
  pa, _ = harness.run(optax_sign.scale_by_alias(initial_stepsize=1e-2), 6)
  pb, _ = harness.run(optax_sign.scale_by_alias(
      initial_stepsize=1e-2, momentum=jnp.asarray(0.0),
      weight_decay=jnp.asarray(0.0), update_gap=jnp.asarray(1)), 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               pa, pb)


@pytest.mark.parametrize("tx", [
    optax_sign.alias_sign_sgd(), optax_sign.majority_vote(None),
    optax_sign.scale_by_error_feedback_sign(),
    optax_sign.model_averaging(1e-2)], ids=["alias", "vote", "ef", "local"])
def test_misspelled_extra_argument_warns_once(tx):
  params = harness.init_params()
  grads = jax.grad(harness.loss_fn)(params)
  state = tx.init(params)
  name = "prev_grad"  # one letter off
  optax_sign._checks._warned.discard(name)
  with pytest.warns(UserWarning, match="did you mean 'prev_grads'"):
    tx.update(grads, state, params, **{name: grads})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.update(grads, state, params, **{name: grads})  # once only
    tx.update(grads, state, params, unrelated_argument=1.0)


def test_per_example_loss_as_value_is_refused():
  tx = optax_sign.alias_sign_sgd("lower_bound")
  params = harness.init_params()
  grads = jax.grad(harness.loss_fn)(params)
  with pytest.raises(ValueError, match=r"value= must be the scalar loss.*\(8,\)"):
    tx.update(grads, tx.init(params), params, value=jnp.ones(8))


def test_mask_default_decays_matrices_only():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  tx = optax_sign.global_sign_momentum(1.0, weight_decay=0.5)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5)
  np.testing.assert_allclose(updates["b"], 0.0)


@pytest.mark.parametrize("make", [
    lambda: optax_sign.sign_sgd(0.1), lambda: optax_sign.lion_like(0.1),
    lambda: optax_sign.alias_sign_sgd(), lambda: optax_sign.majority_vote(None),
    lambda: optax_sign.scale_by_error_feedback_sign(),
    lambda: optax_sign.dsm_ls(0.1)], ids=["sign_sgd", "lion_like", "alias",
                                          "vote", "ef", "dsm_ls"])
def test_integer_only_params_are_refused(make):
  with pytest.raises(TypeError, match=r"integer or boolean array \(int32\)"):
    make().init({"a": jnp.arange(3), "b": jnp.zeros(2, jnp.int32)})
  make().init({"a": jnp.arange(3), "b": jnp.zeros(2)})  # mixed trees are fine


@pytest.mark.parametrize("make, packed", [
    (lambda: optax_sign.alias_sign_sgd(memory="sign"), True),
    (lambda: optax_sign.alias_sign_sgd(memory="sign", tie="positive"), True),
    (lambda: optax_sign.alias_sign_sgd(), False),
    (lambda: optax_sign.scale_by_alias_momentum(), False),
], ids=["sign_zero", "sign_positive", "full", "momentum"])
@pytest.mark.parametrize("before, after", [((8,), (4,)), ((16,), (2, 8)),
                                           ((3, 5), (5, 3)), ((3, 16), (3, 8))])
def test_updates_shaped_unlike_init_raise(make, packed, before, after):
  """Updates shaped unlike ``init``'s params raise, naming the shapes. Sign
  memory keeps only packed bits, which cannot tell lengths within one byte
  apart (4 and 8 pack alike): there the check is against ``params``."""
  tx = make()
  state = tx.init({"w": jnp.zeros(before)})
  with pytest.raises(ValueError, match=r"shape"):
    tx.update({"w": jnp.ones(after)}, state, {"w": jnp.zeros(before)})
  from optax_sign import _bits
  if packed and _bits.bit_layout(before) == _bits.bit_layout(after):
    return  # params changed alike: nothing in the state tells
  with pytest.raises(ValueError, match=r"shape"):
    tx.update({"w": jnp.ones(after)}, state, {"w": jnp.zeros(after)})
  with pytest.raises(ValueError, match=r"shape"):
    tx.update({"w": jnp.ones(after)}, state)
