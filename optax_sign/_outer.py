"""Outer transformations for the local-steps wrapper: global sign momentum.

The outer step of :func:`optax_sign.local_steps` is any optax transformation
fed the pseudo-gradient (the anchor minus the workers' average model) with
``params`` set to the anchor. This module holds the one that is specific to
this package, the global sign momentum of DSM-LS, and the default decay mask.
The baselines are stock optax: DiLoCo is ``optax.sgd(lr, momentum,
nesterov=True)``, SlowMo is ``optax.sgd(slow_lr, momentum)``, plain model
averaging is ``optax.sgd(1.0)``.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sign import _checks
from optax_sign import _sign


def matrix_mask(params: optax.Params) -> Any:
  """Decay mask selecting leaves with at least two dimensions (not biases, norms).

  Args:
    params: a tree of arrays (or ``jax.ShapeDtypeStruct``).

  Returns:
    A tree of Python bools with the structure of ``params``.
  """
  return jax.tree.map(lambda p: len(jnp.shape(p)) >= 2, params)


def resolve_mask(mask: Any) -> Any:
  """The decay mask named by ``mask``: ``"matrices"`` is :func:`matrix_mask`."""
  if isinstance(mask, str):
    _checks.check_choice("mask", mask, ("matrices",))
    return matrix_mask
  return mask


def global_sign_momentum(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    b1: float = 0.95,
    b2: float = 0.98,
    weight_decay: float = 0.1,
    mask: Optional[Any] = "matrices",
    key: Optional[jax.Array] = None,
    bound: float = 1.0,
    mu_dtype: Any = None,
    *,
    tie: str = "zero",
) -> optax.GradientTransformationExtraArgs:
  r"""Global sign momentum: Lion applied to the pseudo-gradient (DSM-LS outer step).

  With pseudo-gradient :math:`g_t` and anchor :math:`x_t` (the ``params``):

  .. math::
    u_{t+1} = \beta_1 m_t + (1 - \beta_1) g_t,\qquad
    m_{t+1} = \beta_2 m_t + (1 - \beta_2) g_t,\\
    \text{update} = -\eta\big(S(u_{t+1}) + \lambda\,\mathrm{mask}\odot x_t\big),

  where :math:`S` is the hard sign (``key=None``) or the randomized sign
  :math:`S_R` with bound ``bound`` (``key`` given). Inside
  :func:`local_steps` with ``pseudo_grad_scale="inner_lr"`` the update is
  multiplied by the inner learning rate :math:`\gamma_t`, so the anchor moves
  by :math:`-\eta\gamma_t(S(u) + \lambda x_t)`: weight decay is applied once per
  round, to the anchor.

  It is ``chain(scale_by_lion_momentum(b1, b2), scale_by_sign(tie) or
  scale_by_randomized_sign(key, bound), add_decayed_weights(weight_decay,
  mask), scale_by_learning_rate(learning_rate))``; with the hard sign it equals
  ``optax.lion(learning_rate, b1, b2, weight_decay=weight_decay, mask=mask)``.

  Args:
    learning_rate: the global learning rate :math:`\eta` (scalar or schedule of
      the round count).
    b1: interpolation coefficient :math:`\beta_1` in [0, 1].
    b2: momentum decay :math:`\beta_2` in [0, 1].
    weight_decay: decoupled decay :math:`\lambda \ge 0` of the anchor.
    mask: tree or callable choosing the decayed leaves; the default
      ``"matrices"`` is :func:`matrix_mask` (leaves with ``ndim >= 2``), a
      string so that ``optax.inject_hyperparams`` does not take it for a
      schedule; ``None`` decays all.
    key: a PRNG key for the randomized sign; ``None`` uses the hard sign. Under
      a collective the key must be equal on every worker (it is, when the
      outer state is replicated).
    bound: the bound :math:`R > 0` of the randomized sign (e.g. about the sync
      interval for an Adam-type inner optimizer).
    mu_dtype: dtype of the momentum :math:`m` (``None``: the parameter's).
    tie: tie policy of the hard sign.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

  Example:
    >>> outer = global_sign_momentum(1.0, b1=0.95, b2=0.98, weight_decay=0.1)

  References:
    Yu et al., "Distributed Sign Momentum with Local Steps for Training
    Transformers", arXiv 2411.17866; Chen et al., "Symbolic Discovery of
    Optimization Algorithms", arXiv 2302.06675.
  """
  _checks.check_nonnegative_or_schedule("learning_rate", learning_rate)
  _checks.check_nonnegative_or_schedule("weight_decay", weight_decay)
  if key is None:
    sign = _sign.scale_by_sign(tie)
  else:
    sign = _sign.scale_by_randomized_sign(key, bound)
  return optax.chain(
      _sign.scale_by_lion_momentum(b1, b2, mu_dtype),
      sign,
      optax.add_decayed_weights(weight_decay, resolve_mask(mask)),
      optax.scale_by_learning_rate(learning_rate))
