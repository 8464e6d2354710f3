"""Tests of the SOS bisection driver (spec/alias.md section 9)."""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import optax_sign
from optax_sign import _sos

_RNG = np.random.RandomState(3)
_A = np.diag(np.linspace(0.5, 3.0, 8)).astype(np.float32)
_C = _RNG.randn(8).astype(np.float32)
_L_BOUND = float(np.abs(_A).sum())


def _loss(params):
  d = params["x"] - jnp.asarray(_C)
  return 0.5 * d @ (jnp.asarray(_A) @ d)


_RUN = optax_sign.sign_sgd_probe(_loss, {"x": jnp.zeros(8)})


def _fake_run(phi_star, num_steps):
  """phi(gamma) == phi_star for every gamma (Delta_hat 1, fixed L_hat)."""
  calls = []

  def run(gamma, steps):
    assert steps == num_steps
    calls.append(gamma)
    l_hat = 2.0 / (phi_star ** 2 * steps)
    return np.array([1.0] + [0.5] * (steps - 1) + [0.0]), np.full(steps, l_hat)

  return run, calls


def test_probe_trace_is_constant_step_sign_sgd():
  losses, l_hats = _RUN(0.01, 20)
  assert losses.shape == (21,) and l_hats.shape == (20,)
  x = np.zeros(8)
  for t in range(20):
    assert losses[t] == pytest.approx(
        0.5 * (x - _C) @ _A @ (x - _C), rel=1e-5)
    x = x - 0.01 * np.sign(_A @ (x - _C))
  assert np.all(l_hats >= 0) and np.all(l_hats <= _L_BOUND * (1 + 1e-4))


def test_bisection_on_deterministic_problem():
  lo, hi, ratio, steps = 1e-6, 1.0, 2.0, 200
  result = optax_sign.sos_search(_RUN, steps, lo=lo, hi=hi, ratio=ratio)
  mids = [p for p in result.probes if p.kind == "mid"]
  assert len(mids) == math.ceil(math.log2(math.log(hi / lo) / math.log(ratio)))
  assert len(mids) == _sos.num_bisection_probes(lo, hi, ratio) == 5
  assert [p.kind for p in result.probes[:2]] == ["lo", "hi"]
  assert result.bracket_valid
  assert lo <= result.stepsize <= hi
  # The chosen end passed the test phi(gamma) >= gamma (or is the original lo).
  passed = [p for p in result.probes if p.stepsize == result.stepsize]
  assert passed and passed[0].phi >= result.stepsize
  # The final bracket is within the ratio: the smallest failing mid above it.
  failing = [p.stepsize for p in mids if p.phi < p.stepsize]
  upper = min(failing, default=hi)
  assert upper / result.stepsize <= ratio * (1 + 1e-9)
  # Probe values follow their definitions.
  for p in result.probes:
    losses, l_hats = _RUN(p.stepsize, steps)
    assert p.distance == pytest.approx(losses[0] - losses.min(), rel=1e-6)
    assert p.smoothness == pytest.approx(l_hats.max(), rel=1e-6)
    assert p.phi == pytest.approx(
        math.sqrt(2 * p.distance / (p.smoothness * steps)), rel=1e-6)
    if p.stepsize >= 1e-4:  # below, float32 gradient differences are noise
      assert p.smoothness <= _L_BOUND * (1 + 1e-4)
  # The chosen constant step actually trains, and the best probe is the best.
  best = min(result.probes, key=lambda p: p.final_loss)
  assert result.best_stepsize == best.stepsize
  final = _RUN(result.stepsize, steps)[0][-1]
  assert final < 0.05 * _RUN(result.stepsize, steps)[0][0]


def test_bisection_finds_the_fixed_point_of_phi():
  run, calls = _fake_run(phi_star=3e-3, num_steps=10)
  result = optax_sign.sos_search(run, 10, lo=1e-8, hi=1.0, ratio=1.5)
  assert result.stepsize <= 3e-3 < result.stepsize * 1.5
  assert len(calls) == 2 + _sos.num_bisection_probes(1e-8, 1.0, 1.5)


def test_max_probes_caps_the_bisection():
  run, calls = _fake_run(phi_star=3e-3, num_steps=10)
  result = optax_sign.sos_search(run, 10, max_probes=2, check_bracket=False)
  assert len(calls) == 2 and len(result.probes) == 2
  assert "max_probes" in result.message


@pytest.mark.parametrize("lo,hi,end", [(10.0, 100.0, "lo"), (1e-6, 1e-5, "hi")])
def test_invalid_bracket_is_reported(lo, hi, end):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = optax_sign.sos_search(_RUN, 50, lo=lo, hi=hi)
  assert not result.bracket_valid
  assert "invalid bracket" in result.message
  assert any("invalid bracket" in str(w.message) for w in caught)
  assert result.stepsize == (lo if end == "lo" else hi)
  assert [p.kind for p in result.probes][-1] == end


@pytest.mark.parametrize("kwargs,name", [
    (dict(lo=1.0, hi=0.5), "lo < hi"), (dict(lo=0.0), "lo"),
    (dict(ratio=1.0), "ratio"), (dict(max_probes=-1), "max_probes"),
    (dict(num_steps=0), "num_steps"),
])
def test_bad_arguments_raise(kwargs, name):
  kwargs = dict(dict(num_steps=10), **kwargs)
  with pytest.raises(ValueError, match=name):
    optax_sign.sos_search(_RUN, **kwargs)
