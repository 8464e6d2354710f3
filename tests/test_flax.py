"""optax_sign inside a Flax NNX training loop on real data (sklearn digits)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_sign


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 64, rngs=rngs)
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_mlp_on_digits_with_sign_momentum():
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25,
                                            random_state=0, stratify=y)
  model = MLP(nnx.Rngs(0))
  tx = optax.chain(optax_sign.sign_momentum(),
                   optax.scale_by_learning_rate(3e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, xb, yb):
    def loss_fn(model):
      logits = model(xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)  # extra kwargs are forwarded
    return loss

  rng = np.random.default_rng(0)
  losses = []
  for _ in range(15):
    order = rng.permutation(len(x_tr))
    for i in range(0, len(order) - 63, 64):
      idx = order[i:i + 64]
      losses.append(float(train_step(model, optimizer, x_tr[idx], y_tr[idx])))
  accuracy = float(jnp.mean(jnp.argmax(model(x_te), -1) == y_te))
  assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
  assert accuracy > 0.9, accuracy


def _same_batch_nnx_step(memory):
  """An NNX loop with the same-batch estimator: alias_previous_params takes
  ``nnx.state(model, nnx.Param)`` and ``optimizer.opt_state`` as they are."""
  x, y = load_digits(return_X_y=True)
  x = (x[:256] / 16.0).astype(np.float32)
  y = y[:256]
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax_sign.alias_sign_sgd(memory=memory),
                            wrt=nnx.Param)
  graphdef, _ = nnx.split(model)

  def loss_at(params, xb, yb):
    logits = nnx.merge(graphdef, params)(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @nnx.jit
  def train_step(model, optimizer, xb, yb):
    params = nnx.state(model, nnx.Param)
    prev = optax_sign.alias_previous_params(params, optimizer.opt_state)
    prev_grads = jax.grad(loss_at)(prev, xb, yb)
    loss, grads = jax.value_and_grad(loss_at)(params, xb, yb)
    optimizer.update(model, grads, prev_grads=prev_grads)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(60)]
  return losses, model


def test_nnx_same_batch_estimator_with_previous_params():
  for memory in ("full", "sign"):
    losses, _ = _same_batch_nnx_step(memory)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], (memory, losses[0], losses[-1])


def test_previous_params_equal_for_nnx_and_plain_trees():
  model = MLP(nnx.Rngs(1))
  tx = optax_sign.alias_sign_sgd(weight_decay=1e-2, memory="sign",
                                 tie="positive")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  plain = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = tx.init(plain)
  grads = jax.tree.map(jnp.ones_like, plain)
  updates, state = tx.update(grads, state, plain)
  plain = optax.apply_updates(plain, updates)
  optimizer.update(model, jax.tree.map(jnp.ones_like,
                                       nnx.state(model, nnx.Param)))
  got = optax_sign.alias_previous_params(nnx.state(model, nnx.Param),
                                         optimizer.opt_state)
  want = optax_sign.alias_previous_params(plain, state)
  np.testing.assert_array_equal(
      nnx.to_pure_dict(got)["out"]["kernel"], want["out"]["kernel"])
