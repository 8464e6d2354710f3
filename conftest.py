"""Doctest setup for the library's docstring examples.

``python -m pytest --doctest-modules optax_sign --ignore=optax_sign/bench``
runs every ``>>>`` example in the library's docstrings. Each example sees the
names below: the usual imports, every public ``optax_sign`` name, and a small
least-squares problem: ``params``, ``batch``, ``loss_fn(params, batch)``,
``loss(params)`` (``loss_fn`` on ``batch``), ``value`` (the loss at ``params``)
and ``grads`` (its gradient).
The tests under ``tests/`` do not use any of this.
"""

import jax

# 8 simulated CPU devices, as tests/conftest.py, before any JAX computation:
# examples that build a mesh need more than one device.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_sign  # noqa: E402


def _problem():
  """A 3 -> 2 least-squares problem with a batch of 8 rows."""
  x = jax.random.normal(jax.random.key(0), (8, 3))
  y = x @ jnp.arange(6.0).reshape(3, 2)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  def loss(params):
    return loss_fn(params, (x, y))

  value, grads = jax.value_and_grad(loss)(params)
  return {"params": params, "batch": (x, y), "loss_fn": loss_fn, "loss": loss,
          "value": value, "grads": grads}


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace):
  """Fills the namespace of doctest items; other tests are left alone."""
  if not isinstance(request.node, pytest.DoctestItem):
    return
  doctest_namespace.update(
      jax=jax, jnp=jnp, np=np, optax=optax, lax=lax, P=P,
      optax_sign=optax_sign,
      **{name: getattr(optax_sign, name) for name in optax_sign.__all__})
  doctest_namespace.update(_problem())
