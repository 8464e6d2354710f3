"""The harness checks with real collectives: N = 4 workers under a named vmap.

``test_harness.py`` runs the communicating transformations with
``axis_name=None`` only. Here each of them runs with ``axis_name="i"`` under
``jax.vmap(..., axis_name="i")`` on the harness's quadratic, where worker ``k``
sees the target shifted by its own zero-mean random offset, so the workers'
gradients differ and every collective (psum, all-gather, all-to-all, pmean)
is exercised. ``optax.apply_if_finite`` is left out on purpose: it decides per
worker, which the library documents as unsupported with collectives.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import harness
import optax_sign

N = 4
AXIS = "i"


def _shifts():
  """Per-worker target offsets [N, ...], zero mean over the workers."""
  leaves, treedef = jax.tree.flatten(harness.TARGET)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  out = []
  for key, leaf in zip(keys, leaves):
    s = 0.3 * jax.random.normal(key, (N,) + leaf.shape, jnp.float32)
    out.append(s - s.mean(axis=0, keepdims=True))
  return treedef.unflatten(out)


SHIFTS = _shifts()


def _worker_loss(params, shift):
  """The harness loss with this worker's target ``TARGET + shift``."""
  return harness.loss_fn(
      jax.tree.map(lambda p, s: p.astype(jnp.float32) - s, params, shift))


def _stack(tree):
  return jax.tree.map(lambda x: jnp.stack([x] * N), tree)


def _stacked_params(dtype=jnp.float32):
  return _stack(harness.init_params(dtype))


def _worker_step(opt, params, state, shift):
  value, grads = jax.value_and_grad(_worker_loss)(params, shift)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  updates, state = opt.update(grads, state, params, value=value,
                              unknown_extra_argument=1.0)
  return optax.apply_updates(params, updates), state, value


def make_step(opt):
  """All workers' step: (params[N], state[N], shifts[N]) -> same."""
  return jax.vmap(functools.partial(_worker_step, opt), axis_name=AXIS)


def init_state(opt, params):
  return jax.vmap(opt.init)(params)


def run(opt, steps, step=None, params=None):
  params = _stacked_params() if params is None else params
  state = init_state(opt, params)
  step = jax.jit(make_step(opt)) if step is None else step
  for _ in range(steps):
    params, state, _ = step(params, state, SHIFTS)
  return params, state


@dataclasses.dataclass(frozen=True)
class MultiCase:
  """A communicating optimizer; ``sync_every`` > 0 for local-steps methods."""
  name: str
  make: Callable[..., optax.GradientTransformation]
  hparams: Dict[str, Any]
  sync_every: int = 0


def _lr(transform, learning_rate):
  return optax.chain(transform, optax.scale_by_learning_rate(learning_rate))


CASES = [
    MultiCase("majority_vote_psum", lambda learning_rate: _lr(
        optax_sign.majority_vote(AXIS, "psum"), learning_rate),
              {"learning_rate": 0.02}),
    MultiCase("majority_vote_allgather", lambda learning_rate: _lr(
        optax_sign.majority_vote(AXIS, "allgather"), learning_rate),
              {"learning_rate": 0.02}),
    MultiCase("majority_vote_alltoall", lambda learning_rate: _lr(
        optax_sign.majority_vote(AXIS, "alltoall"), learning_rate),
              {"learning_rate": 0.02}),
    MultiCase("majority_vote_psum_positive", lambda learning_rate: _lr(
        optax_sign.majority_vote(AXIS, "psum", "positive"), learning_rate),
              {"learning_rate": 0.02}),
    MultiCase("majority_vote_alltoall_negative", lambda learning_rate: _lr(
        optax_sign.majority_vote(AXIS, "alltoall", "negative"), learning_rate),
              {"learning_rate": 0.02}),
    MultiCase("majority_vote_allgather_positive", lambda learning_rate: _lr(
        optax_sign.majority_vote(AXIS, "allgather", "positive"),
        learning_rate), {"learning_rate": 0.02}),
    MultiCase("mean_of_signs_psum", lambda learning_rate: _lr(
        optax_sign.mean_of_signs(AXIS, "psum"), learning_rate),
              {"learning_rate": 0.02}),
    MultiCase("mean_of_signs_allgather_positive", lambda learning_rate: _lr(
        optax_sign.mean_of_signs(AXIS, "allgather", "positive"),
        learning_rate), {"learning_rate": 0.02}),
    MultiCase("error_feedback_sign", lambda learning_rate: _lr(
        optax_sign.scale_by_error_feedback_sign(axis_name=AXIS),
        learning_rate), {"learning_rate": 0.1}),
    MultiCase("alias_sign_sgd", lambda d0: optax_sign.alias_sign_sgd(
        d0=d0, initial_stepsize=1e-2, axis_name=AXIS), {"d0": 1e-3}),
    MultiCase("alias_sign_sgd_sign_memory_positive",
              lambda d0: optax_sign.alias_sign_sgd(
                  d0=d0, memory="sign", tie="positive", initial_stepsize=1e-2,
                  axis_name=AXIS), {"d0": 1e-3}),
    MultiCase("alias_sign_sgd_lower_bound_momentum",
              lambda max_stepsize: optax_sign.alias_sign_sgd(
                  "lower_bound", max_stepsize=max_stepsize, update_gap=3,
                  warmup_steps=2, warmup_stepsize=0.01, momentum=0.5,
                  axis_name=AXIS), {"max_stepsize": 0.1}),
    MultiCase("alias_sign_sgd_released",
              lambda max_stepsize: optax_sign.alias_sign_sgd_released(
                  300, max_stepsize=max_stepsize, eta0=1.0,
                  warmup_fraction=0.0, axis_name=AXIS),
              {"max_stepsize": 0.02}),
    MultiCase("dsm_ls", lambda inner_learning_rate: optax_sign.dsm_ls(
        inner_learning_rate, inner=optax.sgd(inner_learning_rate),
        sync_every=2, weight_decay=0.0, axis_name=AXIS),
              {"inner_learning_rate": 0.1}, sync_every=2),
    MultiCase("diloco", lambda inner_learning_rate: optax_sign.diloco(
        inner_learning_rate, inner=optax.sgd(inner_learning_rate),
        sync_every=2, axis_name=AXIS),
              {"inner_learning_rate": 0.1}, sync_every=2),
    MultiCase("slowmo", lambda inner_learning_rate: optax_sign.slowmo(
        inner_learning_rate, inner=optax.sgd(inner_learning_rate),
        sync_every=2, axis_name=AXIS),
              {"inner_learning_rate": 0.1}, sync_every=2),
    MultiCase("model_averaging",
              lambda inner_learning_rate: optax_sign.model_averaging(
                  inner_learning_rate, sync_every=2, inner_weight_decay=0.0,
                  axis_name=AXIS),
              {"inner_learning_rate": 0.05}, sync_every=2),
]
by_name = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


_COMPILED = {}


def _compiled(case):
  """One optimizer and one jitted all-worker step per case, with a trace count."""
  if case.name not in _COMPILED:
    _COMPILED[case.name] = _build(case)
  return _COMPILED[case.name]


def _build(case):
  opt = case.make(**case.hparams)
  traces = []

  def counted(params, state, shifts):
    traces.append(1)
    return make_step(opt)(params, state, shifts)

  return opt, jax.jit(counted), traces


def _close(a, b, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _workers_identical(tree):
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    for k in range(1, N):
      if not np.array_equal(x[0], x[k]):
        return False
  return True


def test_workers_see_different_gradients():
  grads = jax.vmap(jax.grad(_worker_loss), in_axes=(None, 0))(
      harness.init_params(), SHIFTS)
  assert not _workers_identical(grads)


@by_name
def test_jit_and_no_jit_agree(case):
  opt, step, _ = _compiled(case)
  eager = make_step(opt)
  params = _stacked_params()
  state = init_state(opt, params)
  for _ in range(4):
    params, state, _ = eager(params, state, SHIFTS)
  ref_params, ref_state = run(opt, 4, step)
  _close(params, ref_params)
  _close(state, ref_state)


@by_name
def test_no_recompilation(case):
  opt, step, traces = _compiled(case)
  run(opt, 3, step)
  run(opt, 2, step)
  assert len(traces) == 1
  assert step._cache_size() == 1


@by_name
def test_unknown_extra_args_are_ignored(case):
  opt, _, _ = _compiled(case)
  params = _stacked_params()
  state = init_state(opt, params)

  def update(params, state, shift, **extra):
    value, grads = jax.value_and_grad(_worker_loss)(params, shift)
    return opt.update(grads, state, params, value=value, **extra)

  plain = jax.vmap(update, axis_name=AXIS)(params, state, SHIFTS)
  extra = jax.vmap(
      functools.partial(update, unknown_extra_argument=1.0,
                        another=jnp.ones(3)),
      axis_name=AXIS)(params, state, SHIFTS)
  _close(plain, extra, rtol=0, atol=0)


@by_name
def test_inject_hyperparams_gives_equal_results(case):
  opt, step, _ = _compiled(case)
  injected = optax.inject_hyperparams(case.make)(**case.hparams)
  params_a, _ = run(opt, 5, step)
  params_b, state_b = run(injected, 5)
  _close(params_a, params_b)
  assert set(case.hparams) <= set(state_b.hyperparams)


@by_name
def test_composes_with_multi_steps(case):
  opt = optax.MultiSteps(case.make(**case.hparams), every_k_schedule=2)
  step = jax.jit(make_step(opt))
  params0 = _stacked_params()
  state = init_state(opt, params0)
  params1, state, _ = step(params0, state, SHIFTS)
  _close(params1, params0, rtol=0, atol=0)  # accumulating: no move yet
  params2, state, _ = step(params1, state, SHIFTS)
  moved = jax.tree.map(lambda a, b: jnp.any(a != b), params2, params1)
  assert any(jax.tree.leaves(moved))


@by_name
def test_workers_agree_and_loss_decreases(case):
  opt, step, _ = _compiled(case)
  steps = 8  # a multiple of every sync_every used here
  params, state = run(opt, steps, step)
  if case.sync_every:
    assert steps % case.sync_every == 0
    # The anchor (the global model) is bitwise identical everywhere; the local
    # parameters equal it to within one rounding of p + (anchor - p).
    anchor = optax_sign.local_steps_anchor(state)
    assert _workers_identical(anchor)
    _close(params, anchor, rtol=0, atol=1e-6)
    evaluated = jax.tree.map(lambda a: a[0], anchor)
  else:
    assert _workers_identical(params)
    evaluated = jax.tree.map(lambda p: p[0], params)
  loss0 = harness.loss_fn(harness.init_params())
  loss = harness.loss_fn(evaluated)
  assert np.isfinite(loss)
  assert loss < 0.9 * loss0, (case.name, float(loss), float(loss0))


@by_name
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_dtypes_are_stable(case, dtype):
  opt, _, _ = _compiled(case)
  params = _stack(jax.tree.map(lambda t: (0.3 * t).astype(dtype),
                               harness.TARGET))
  state0 = init_state(opt, params)
  shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), state0)

  def worker(params, state, shift):
    for _ in range(2):
      grads = jax.tree.map(lambda g: g.astype(dtype),
                           jax.grad(_worker_loss)(params, shift))
      updates, state = opt.update(grads, state, params,
                                  value=_worker_loss(params, shift))
      params = optax.apply_updates(params, updates)
    return updates, params, state

  updates, params, state = jax.jit(jax.vmap(worker, axis_name=AXIS))(
      params, state0, SHIFTS)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
  for p in jax.tree.leaves(params):
    assert p.dtype == dtype
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes0


def _trajectory(name, steps=6):
  case = next(c for c in CASES if c.name == name)
  opt, step, _ = _compiled(case)
  return run(opt, steps, step)[0]


@pytest.mark.parametrize("names", [
    ("majority_vote_psum", "majority_vote_allgather", "majority_vote_alltoall"),
    ("majority_vote_psum_positive", "majority_vote_allgather_positive"),
], ids=["zero", "positive"])
def test_vote_transports_give_identical_bits(names):
  first = _trajectory(names[0])
  for name in names[1:]:
    chex.assert_trees_all_equal(first, _trajectory(name))


def test_two_valued_tie_breaks_tied_votes():
  # With N = 4 workers some coordinates tie 2:2; "zero" holds them still while
  # "positive" and "negative" move them, so the three trajectories differ.
  zero = _trajectory("majority_vote_psum")
  positive = _trajectory("majority_vote_psum_positive")
  negative = _trajectory("majority_vote_alltoall_negative")
  for other in (positive, negative):
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(zero), jax.tree.leaves(other)))
