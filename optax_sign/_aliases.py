"""Ready optimizers: each one a ``chain`` of public pieces of this package."""

from typing import Any, Optional

import optax

from optax_sign import _checks
from optax_sign import _sign


def _check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
  if not callable(learning_rate):
    _checks.check_nonnegative("learning_rate", learning_rate)


def sign_sgd(learning_rate: optax.ScalarOrSchedule,
             tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Sign-SGD: :math:`x_{t+1} = x_t - \gamma_t \operatorname{tsign}(g_t)`.

  ``chain(scale_by_sign(tie), scale_by_learning_rate(learning_rate))``.

  Args:
    learning_rate: a scalar or a schedule of the step count.
    tie: tie policy for exact zeros.

  References:
    Bernstein et al., arXiv 1802.04434.
  """
  _check_learning_rate(learning_rate)
  return optax.chain(_sign.scale_by_sign(tie),
                     optax.scale_by_learning_rate(learning_rate))


def signum(learning_rate: optax.ScalarOrSchedule,
           beta: float = 0.9,
           weight_decay: float = 0.0,
           state_dtype: Any = None,
           tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Signum: sign of an exponential moving average of gradients.

  .. math::
    m_t = \beta m_{t-1} + (1 - \beta) g_t,\qquad
    x_{t+1} = x_t - \gamma_t\big(\operatorname{tsign}(m_t) + \lambda x_t\big).

  It is :func:`lion_like` with ``b1 = b2 = beta``.

  References:
    Bernstein et al., arXiv 1802.04434.
  """
  return lion_like(learning_rate, b1=beta, b2=beta, weight_decay=weight_decay,
                   state_dtype=state_dtype, tie=tie)


def lion_like(learning_rate: optax.ScalarOrSchedule,
              b1: float = 0.9,
              b2: float = 0.99,
              weight_decay: float = 0.0,
              mask: Optional[Any] = None,
              state_dtype: Any = None,
              tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Sign momentum with decoupled weight decay (Lion).

  .. math::
    x_{t+1} = x_t - \gamma_t\Big(\operatorname{tsign}\big(\beta_1 m_{t-1}
    + (1 - \beta_1) g_t\big) + \lambda x_t\Big),\qquad
    m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t.

  ``chain(sign_momentum(b1, b2), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``; equal to ``optax.lion`` with the same
  settings (note that ``optax.lion`` defaults to ``weight_decay=1e-3``).

  Args:
    learning_rate: a scalar or a schedule of the step count.
    b1, b2: sign-momentum coefficients in [0, 1].
    weight_decay: decoupled decay :math:`\lambda \ge 0` (needs ``params``).
    mask: optional tree or callable choosing the leaves that decay.
    state_dtype: dtype of the momentum (``None``: float32).
    tie: tie policy for exact zeros.

  References:
    Chen et al., "Symbolic Discovery of Optimization Algorithms",
    arXiv 2302.06675.
  """
  _check_learning_rate(learning_rate)
  if not callable(weight_decay):
    _checks.check_nonnegative("weight_decay", weight_decay)
  momentum = _sign.sign_momentum(
      b1, b2, state_dtype=state_dtype or "float32", tie=tie)
  return optax.chain(momentum,
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))
