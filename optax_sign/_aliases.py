"""Ready optimizers: each one a ``chain`` of public pieces of this package."""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sign import _checks
from optax_sign import _local_steps
from optax_sign import _outer
from optax_sign import _sign
from optax_sign import _stepsize


def sign_sgd(learning_rate: optax.ScalarOrSchedule,
             *,
             tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Sign-SGD: :math:`x_{t+1} = x_t - \gamma_t \operatorname{tsign}(g_t)`.

  ``chain(scale_by_sign(tie), scale_by_learning_rate(learning_rate))``; with
  ``tie="zero"`` it equals ``optax.sign_sgd(learning_rate)``.

  Args:
    learning_rate: a scalar or a schedule of the step count.
    tie: tie policy for exact zeros (keyword only).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = sign_sgd(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state)

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex
    Problems", arXiv 1802.04434.
  """
  _checks.check_nonnegative_or_schedule("learning_rate", learning_rate)
  return optax.chain(_sign.scale_by_sign(tie),
                     optax.scale_by_learning_rate(learning_rate))


def signum(learning_rate: optax.ScalarOrSchedule,
           beta: float = 0.9,
           accumulator_dtype: Any = None,
           *,
           weight_decay: float = 0.0,
           mask: Optional[Any] = None,
           tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Signum: sign of an exponential moving average of gradients.

  .. math::
    m_t = \beta m_{t-1} + (1 - \beta) g_t,\qquad
    x_{t+1} = x_t - \gamma_t\big(\operatorname{tsign}(m_t) + \lambda x_t\big).

  It is :func:`lion_like` with ``b1 = b2 = beta``; without weight decay and
  with ``tie="zero"`` it equals ``optax.signum(learning_rate, beta,
  accumulator_dtype)``, whose arguments it keeps.

  Args:
    learning_rate: a scalar or a schedule of the step count.
    beta: momentum coefficient :math:`\beta` in [0, 1].
    accumulator_dtype: dtype of the momentum (``None``: the parameter's).
    weight_decay: decoupled decay :math:`\lambda \ge 0` (needs ``params``;
      keyword only, like the arguments after it).
    mask: optional tree or callable choosing the leaves that decay.
    tie: tie policy for exact zeros.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = signum(1e-4, beta=0.9, weight_decay=0.1)
    >>> updates, state = tx.update(grads, tx.init(params), params)

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex
    Problems", arXiv 1802.04434.
  """
  _checks.check_interval("beta", beta, 0.0, 1.0)
  return lion_like(learning_rate, beta, beta, accumulator_dtype, weight_decay,
                   mask, tie=tie)


def lion_like(learning_rate: optax.ScalarOrSchedule,
              b1: float = 0.9,
              b2: float = 0.99,
              mu_dtype: Any = None,
              weight_decay: optax.ScalarOrSchedule = 1e-3,
              mask: Optional[Any] = None,
              *,
              tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Sign momentum with decoupled weight decay (Lion).

  .. math::
    x_{t+1} = x_t - \gamma_t\Big(\operatorname{tsign}\big(\beta_1 m_{t-1}
    + (1 - \beta_1) g_t\big) + \lambda x_t\Big),\qquad
    m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t.

  ``chain(sign_momentum(b1, b2), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``. It keeps ``optax.lion``'s
  arguments, order and defaults (``weight_decay=1e-3``) and equals it with
  ``tie="zero"``.

  Args:
    learning_rate: a scalar or a schedule of the step count.
    b1, b2: sign-momentum coefficients in [0, 1].
    mu_dtype: dtype of the momentum (``None``: the parameter's).
    weight_decay: decoupled decay :math:`\lambda \ge 0` (needs ``params``).
    mask: optional tree or callable choosing the leaves that decay.
    tie: tie policy for exact zeros (keyword only).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (needs ``params`` when
    ``weight_decay`` is not zero).

  Example:
    >>> tx = lion_like(3e-4, b1=0.9, b2=0.99, weight_decay=1e-2)
    >>> updates, state = tx.update(grads, tx.init(params), params)

  References:
    Chen et al., "Symbolic Discovery of Optimization Algorithms",
    arXiv 2302.06675.
  """
  _checks.check_nonnegative_or_schedule("learning_rate", learning_rate)
  _checks.check_nonnegative_or_schedule("weight_decay", weight_decay)
  momentum = _sign.sign_momentum(b1, b2, mu_dtype, tie=tie)
  return optax.chain(momentum,
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def _local_adamw(learning_rate: optax.ScalarOrSchedule,
                 weight_decay: float) -> optax.GradientTransformation:
  """The released DSM-LS code's local AdamW: betas (0.9, 0.95), eps 1e-8."""
  return optax.adamw(learning_rate, b1=0.9, b2=0.95, eps=1e-8,
                     weight_decay=weight_decay, mask=_outer.matrix_mask)


def _check_inner(inner_learning_rate: optax.ScalarOrSchedule,
                 inner_weight_decay: float) -> None:
  _checks.check_nonnegative_or_schedule("inner_learning_rate",
                                        inner_learning_rate)
  _checks.check_nonnegative("inner_weight_decay", inner_weight_decay)


def dsm_ls(inner_learning_rate: optax.ScalarOrSchedule,
           inner: Optional[optax.GradientTransformation] = None,
           sync_every: int = 12,
           axis_name: Any = None,
           learning_rate: optax.ScalarOrSchedule = 1.0,
           b1: float = 0.95,
           b2: float = 0.98,
           weight_decay: float = 0.1,
           mask: Optional[Any] = "matrices",
           key: Optional[Any] = None,
           bound: Optional[float] = None,
           ) -> optax.GradientTransformationExtraArgs:
  r"""DSM-LS: local steps with global sign momentum.

  Each worker runs ``inner`` for ``sync_every`` steps; then, with
  :math:`g_t = (x_{t,0} - \bar x_{t,\tau})/\gamma_t`,

  .. math::
    x_{t+1,0} = x_{t,0} - \eta\gamma_t\big(\operatorname{sign}(\beta_1 m_t
    + (1 - \beta_1) g_t) + \lambda x_{t,0}\big),\qquad
    m_{t+1} = \beta_2 m_t + (1 - \beta_2) g_t.

  ``local_steps(inner, global_sign_momentum(learning_rate, b1, b2,
  weight_decay, mask, key, bound), sync_every, axis_name, "inner_lr",
  inner_learning_rate)``. Defaults are the released code's (tau 12, b1 0.95,
  b2 0.98, global lr 1.0); its README uses weight decay 0.1 while its launch
  script runs 0.2. The default inner optimizer is AdamW with betas
  (0.9, 0.95), eps 1e-8 and no weight decay, so decay is applied once per
  round, to the anchor (leaves with ``ndim >= 2``). The released configuration
  is ``inner=optax.adamw(lr, 0.9, 0.95, weight_decay=0.1,
  mask=matrix_mask)``, ``weight_decay=0.2, mask=None``.

  Args:
    inner_learning_rate: the inner learning rate :math:`\gamma` (scalar or
      schedule of the local step); it must be the one ``inner`` uses.
    inner: the per-worker optimizer (default: the AdamW above).
    sync_every: steps per round :math:`\tau`.
    axis_name: the workers' axis name; ``None`` for one worker.
    learning_rate: the global learning rate :math:`\eta`.
    b1, b2: sign-momentum coefficients.
    weight_decay: global decoupled decay :math:`\lambda` of the anchor.
    mask: decay mask (default ``"matrices"``: :func:`matrix_mask`; ``None``
      decays all).
    key: PRNG key for the randomized sign; ``None`` for the hard sign.
    bound: bound of the randomized sign (default ``sync_every``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (a :func:`local_steps`
    transformation; needs ``params``).

  Example:
    >>> tx = dsm_ls(optax.warmup_cosine_decay_schedule(0, 5e-4, 2000, 10**5),
    ...             axis_name="x")

  References:
    Yu et al., "Distributed Sign Momentum with Local Steps for Training
    Transformers", arXiv 2411.17866.
  """
  _checks.check_int("sync_every", sync_every, 1)
  _checks.check_nonnegative_or_schedule("inner_learning_rate",
                                        inner_learning_rate)
  if inner is None:
    inner = _local_adamw(inner_learning_rate, 0.0)
  outer = _outer.global_sign_momentum(
      learning_rate, b1, b2, weight_decay, mask, key,
      sync_every * 1.0 if bound is None else bound)
  return _local_steps.local_steps(inner, outer, sync_every, axis_name,
                                  "inner_lr", inner_learning_rate)


def diloco(inner_learning_rate: optax.ScalarOrSchedule,
           inner: Optional[optax.GradientTransformation] = None,
           sync_every: int = 12,
           axis_name: Any = None,
           learning_rate: optax.ScalarOrSchedule = 0.7,
           momentum: float = 0.9,
           inner_weight_decay: float = 0.1,
           ) -> optax.GradientTransformationExtraArgs:
  r"""DiLoCo: local steps with a Nesterov outer step on the raw model difference.

  With :math:`\Delta_t = x_{t,0} - \bar x_{t,\tau}`:
  :math:`b_{t+1} = \mu b_t + \Delta_t`,
  :math:`x_{t+1,0} = x_{t,0} - \alpha(\Delta_t + \mu b_{t+1})`.

  ``local_steps(inner, optax.sgd(learning_rate, momentum, nesterov=True),
  sync_every, axis_name, "none")``. DiLoCo's outer defaults (0.7, 0.9); the
  paper syncs about every 500 steps, the default here (12) matches the other
  presets so that runs communicate equally. The default inner optimizer is
  AdamW (0.9, 0.95), eps 1e-8, decay ``inner_weight_decay`` on ``ndim >= 2``.

  Args:
    inner_learning_rate: the inner learning rate :math:`\gamma` (scalar or
      schedule of the local step), used by the default inner optimizer.
    inner: the per-worker optimizer (default: the AdamW above).
    sync_every: steps per round :math:`\tau`.
    axis_name: the workers' axis name; ``None`` for one worker.
    learning_rate: the outer learning rate :math:`\alpha \ge 0`.
    momentum: the outer Nesterov momentum :math:`\mu` in [0, 1).
    inner_weight_decay: decay :math:`\ge 0` of the default inner AdamW.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (a :func:`local_steps`
    transformation; needs ``params``).

  Example:
    >>> tx = diloco(1e-3, sync_every=50, axis_name="workers")

  References:
    Douillard et al., "DiLoCo: Distributed Low-Communication Training of
    Language Models", arXiv 2311.08105.
  """
  _checks.check_nonnegative_or_schedule("learning_rate", learning_rate)
  _checks.check_interval("momentum", momentum, 0.0, 1.0, high_open=True)
  _check_inner(inner_learning_rate, inner_weight_decay)
  if inner is None:
    inner = _local_adamw(inner_learning_rate, inner_weight_decay)
  outer = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  return _local_steps.local_steps(inner, outer, sync_every, axis_name, "none")


def slowmo(inner_learning_rate: optax.ScalarOrSchedule,
           inner: Optional[optax.GradientTransformation] = None,
           sync_every: int = 12,
           axis_name: Any = None,
           learning_rate: optax.ScalarOrSchedule = 1.0,
           momentum: float = 0.2,
           weight_decay: float = 0.0,
           mask: Optional[Any] = None,
           inner_weight_decay: float = 0.1,
           ) -> optax.GradientTransformationExtraArgs:
  r"""SlowMo: local steps with slow (heavy-ball) momentum on the pseudo-gradient.

  With :math:`g_t = (x_{t,0} - \bar x_{t,\tau})/\gamma_t`:
  :math:`b_{t+1} = \mu b_t + g_t`,
  :math:`x_{t+1,0} = x_{t,0}(1 - \eta\gamma_t\lambda') - \eta\gamma_t b_{t+1}`.

  ``local_steps(inner, chain(optax.trace(momentum), add_decayed_weights(
  weight_decay, mask), scale_by_learning_rate(learning_rate)), sync_every,
  axis_name, "inner_lr", inner_learning_rate)``. Defaults are the DSM-LS
  released baseline (momentum 0.2, slow lr 1.0, no global decay, local AdamW
  (0.9, 0.95) with decay 0.1 on ``ndim >= 2``).

  Args:
    inner_learning_rate: the inner learning rate :math:`\gamma` (scalar or
      schedule of the local step); it must be the one ``inner`` uses.
    inner: the per-worker optimizer (default: the AdamW above).
    sync_every: steps per round :math:`\tau`.
    axis_name: the workers' axis name; ``None`` for one worker.
    learning_rate: the slow learning rate :math:`\eta \ge 0`.
    momentum: the slow momentum :math:`\mu` in [0, 1].
    weight_decay: global decoupled decay :math:`\lambda' \ge 0` of the
      anchor.
    mask: decay mask (``None`` decays all leaves).
    inner_weight_decay: decay :math:`\ge 0` of the default inner AdamW.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (a :func:`local_steps`
    transformation; needs ``params``).

  Example:
    >>> tx = slowmo(1e-3, sync_every=12, axis_name="workers", momentum=0.5)

  References:
    Wang et al., "SlowMo: Improving Communication-Efficient Distributed SGD
    with Slow Momentum", ICLR 2020 (arXiv 1910.00643).
  """
  _checks.check_nonnegative_or_schedule("learning_rate", learning_rate)
  _checks.check_interval("momentum", momentum, 0.0, 1.0)
  _checks.check_nonnegative_or_schedule("weight_decay", weight_decay)
  _check_inner(inner_learning_rate, inner_weight_decay)
  if inner is None:
    inner = _local_adamw(inner_learning_rate, inner_weight_decay)
  outer = optax.chain(optax.trace(momentum),
                      optax.add_decayed_weights(weight_decay, mask),
                      optax.scale_by_learning_rate(learning_rate))
  return _local_steps.local_steps(inner, outer, sync_every, axis_name,
                                  "inner_lr", inner_learning_rate)


def model_averaging(inner_learning_rate: optax.ScalarOrSchedule,
                    inner: Optional[optax.GradientTransformation] = None,
                    sync_every: int = 12,
                    axis_name: Any = None,
                    inner_weight_decay: float = 0.1,
                    ) -> optax.GradientTransformationExtraArgs:
  r"""Local SGD / Local AdamW / FedAvg: :math:`x_{t+1,0} = \bar x_{t,\tau}`.

  ``local_steps(inner, optax.sgd(1.0), sync_every, axis_name, "none")``: the
  outer step subtracts the raw model difference from the anchor. The default
  inner optimizer is AdamW (0.9, 0.95), eps 1e-8, decay ``inner_weight_decay``
  on ``ndim >= 2``.

  Args:
    inner_learning_rate: the inner learning rate :math:`\gamma` (scalar or
      schedule of the local step), used by the default inner optimizer.
    inner: the per-worker optimizer (default: the AdamW above).
    sync_every: steps per round :math:`\tau`.
    axis_name: the workers' axis name; ``None`` for one worker.
    inner_weight_decay: decay :math:`\ge 0` of the default inner AdamW.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (a :func:`local_steps`
    transformation; needs ``params``).

  Example:
    >>> tx = model_averaging(1e-3, inner=optax.sgd(1e-3), sync_every=8,
    ...                      axis_name="workers")

  References:
    Stich, "Local SGD Converges Fast and Communicates Little", arXiv
    1805.09767; McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", arXiv 1602.05629.
  """
  _check_inner(inner_learning_rate, inner_weight_decay)
  if inner is None:
    inner = _local_adamw(inner_learning_rate, inner_weight_decay)
  return _local_steps.local_steps(inner, optax.sgd(1.0), sync_every,
                                  axis_name, "none")


def alias_sign_sgd(
    distance: str = "gap",
    *,
    learning_rate: optax.ScalarOrSchedule = 1.0,
    d0: float = 1e-6,
    f_lower: float = 0.0,
    initial_value: Optional[float] = None,
    eta0: float = 0.0,
    initial_stepsize: float = 1e-6,
    max_stepsize: Optional[float] = None,
    update_gap: int = 1,
    warmup_steps: int = 0,
    warmup_stepsize: Optional[optax.ScalarOrSchedule] = None,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    momentum: float = 0.0,
    nesterov: bool = False,
    memory: str = "full",
    tie: str = "zero",
    state_dtype: Any = "float32",
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sign-SGD without a learning rate: the ALIAS stepsize.

  .. math::
    x_{t+1} = x_t - \alpha_t\gamma_t\big(\operatorname{tsign}(g_t) + \lambda x_t\big),
    \qquad \gamma_t = \sqrt{D_t / \eta_t}.

  ``chain(scale_by_alias(...))`` with the same arguments (see
  :func:`optax_sign.scale_by_alias`). Chain ``optax.clip_by_global_norm`` in
  front if wanted; nothing may follow it. For ``distance="lower_bound"``
  pass the loss as ``value=`` to ``update``. The stepsize is readable as
  ``optax.tree.get(state, "stepsize")``.

  The arguments are listed briefly below; :func:`optax_sign.scale_by_alias`
  documents them in full.

  All arguments but ``distance`` are keyword-only.

  Args:
    distance: ``"gap"`` (Option I) or ``"lower_bound"`` (Option II).
    learning_rate: a multiplier :math:`\alpha_t` (scalar or schedule) of
      the ALIAS stepsize, 1 by default.
    d0: Option I floor of the distance estimate, > 0.
    f_lower: Option II lower bound of the loss.
    initial_value: Option II :math:`f(x_0)` (``None``: the first ``value=``).
    eta0: initial smoothness accumulator :math:`\eta_0 \ge 0`.
    initial_stepsize: stepsize at a recompute while :math:`\eta = 0`.
    max_stepsize: optional cap on :math:`\gamma_t`.
    update_gap: steps :math:`k \ge 1` between statistics.
    warmup_steps: steps of plain Sign-SGD before ALIAS starts.
    warmup_stepsize: scalar or schedule used during the warmup.
    weight_decay: decoupled decay :math:`\lambda \ge 0`, scaled by
      :math:`\gamma_t`.
    mask: tree or callable choosing the decayed leaves (``None``: all).
    momentum: :math:`0 \le \mu < 1`, momentum of the sign direction.
    nesterov: Nesterov form of the momentum.
    memory: ``"full"`` or ``"sign"`` (keeps only the packed direction).
    tie: tie policy of the sign.
    state_dtype: dtype of the gradient snapshot and momentum buffer.
    axis_name: optional named axis of workers (majority-vote direction,
      one shared stepsize).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that must come last in a
    chain (its output already includes the stepsize).

  Example:
    >>> tx = alias_sign_sgd()                        # no learning rate
    >>> tx = alias_sign_sgd("lower_bound", memory="sign", tie="positive")

  References:
    Medyakov et al., "Sign-SGD is the Golden Gate between Multi-Node to
    Single-Node Learning: Significant Boost via Parameter-Free Optimization",
    arXiv 2506.03725.
  """
  return optax.chain(_stepsize.scale_by_alias(
      distance=distance, learning_rate=learning_rate, d0=d0, f_lower=f_lower,
      initial_value=initial_value,
      eta0=eta0, initial_stepsize=initial_stepsize, max_stepsize=max_stepsize,
      update_gap=update_gap, warmup_steps=warmup_steps,
      warmup_stepsize=warmup_stepsize, weight_decay=weight_decay, mask=mask,
      momentum=momentum, nesterov=nesterov, memory=memory, tie=tie,
      state_dtype=state_dtype, axis_name=axis_name))


def alias_sign_sgd_stochastic(
    distance: str = "gap",
    *,
    learning_rate: optax.ScalarOrSchedule = 1.0,
    update_gap: int = 20,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: Optional[Any] = None,
    initial_stepsize: float = 1e-6,
    max_stepsize: Optional[float] = None,
    state_dtype: Any = "float32",
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ALIAS Sign-SGD for mini-batches: statistics over snapshot gaps and a
  momentum direction, one gradient per step.

  :func:`alias_sign_sgd` with ``update_gap`` :math:`k = 20` and
  ``momentum`` :math:`\mu = 0.9`. With a new batch at every step the
  gradient difference of a smoothness sample carries the noise
  :math:`\xi_t - \xi_{t-k}` whatever the step, so with :math:`k = 1`

  .. math::
    \hat L_t \approx \frac{\|\xi_t - \xi_{t-1}\|_1}{\gamma},

  which grows as the stepsize shrinks: Option I stalls near its first
  stepsize. Snapshots :math:`k` steps apart divide the noise term by the
  iterate difference :math:`\|x_t - x_{t-k}\|_\infty \approx k\gamma` and take
  :math:`k` times fewer samples, so the noise in :math:`\eta_t` grows about
  :math:`k^2` times more slowly; the direction is the sign of the momentum
  :math:`m_t = \mu m_{t-1} + g_t` (the statistics stay on raw gradients).
  The two constants are the best of a small sweep on the benchmark's digits
  task (README, "Mini-batches"), used unchanged on the others.

  Args:
    distance: ``"gap"`` (Option I) or ``"lower_bound"`` (Option II).
    learning_rate: multiplier :math:`\alpha_t` of the stepsize.
    update_gap: steps :math:`k \ge 1` between statistics.
    momentum: :math:`0 \le \mu < 1` of the direction.
    nesterov: Nesterov form of the momentum.
    weight_decay: decoupled decay :math:`\lambda \ge 0`.
    mask: tree or callable choosing the decayed leaves.
    initial_stepsize: stepsize at a recompute while :math:`\eta = 0`.
    max_stepsize: optional cap on :math:`\gamma_t`.
    state_dtype: dtype of the snapshot and momentum buffers.
    axis_name: optional named axis of workers (majority-vote direction).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that must come last in a
    chain; its state holds the gradient snapshot and the momentum (8 bytes
    per float32 parameter).

  Example:
    >>> tx = alias_sign_sgd_stochastic()   # mini-batches, no learning rate

  References:
    Medyakov et al., arXiv 2506.03725 (the released code takes statistics
    10 or 20 steps apart).
  """
  return alias_sign_sgd(
      distance, learning_rate=learning_rate, update_gap=update_gap,
      momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
      mask=mask, initial_stepsize=initial_stepsize, max_stepsize=max_stepsize,
      state_dtype=state_dtype,
      axis_name=axis_name)


def alias_sign_sgd_released(
    total_steps: int,
    max_stepsize: float = 1e-3,
    eta0: float = 100.0,
    update_gap: int = 20,
    warmup_fraction: float = 0.1,
    weight_decay: float = 1e-3,
    f_lower: float = 0.0,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ALIAS Sign-SGD as the released code ran it for LLaMA pre-training.

  Option II with :math:`\tilde f` = ``f_lower``, :math:`\eta_0` = ``eta0``,
  stepsize cap ``max_stepsize``, statistics every ``update_gap`` steps, a
  linear warmup :math:`0 \to` ``max_stepsize`` over
  ``int(warmup_fraction * total_steps)`` steps, and decoupled weight decay
  scaled by :math:`\gamma_t`. A recompute with :math:`\eta = 0` uses the cap,
  as the released code's ``min(inf, cap)`` does.

  The released training loop clipped gradients to global norm 1 first, so use

  >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
  ...                  alias_sign_sgd_released(total_steps=100_000))

  and pass the step-0 loss as ``value=`` (the statistics then use the clipped
  gradients, the distance the raw loss). The full "ALIAS" of the LLM runs puts
  the output layer on AdamW with ``optax.multi_transform``.

  Args:
    total_steps: training length, which sets the warmup length.
    max_stepsize: the cap, also the warmup's peak.
    eta0: initial smoothness accumulator.
    update_gap: steps between statistics (the released scripts: 10 or 20).
    warmup_fraction: fraction of ``total_steps`` spent in warmup, in [0, 1].
    weight_decay: decoupled decay, scaled by the stepsize.
    f_lower: lower bound of the loss.
    axis_name: optional named axis of workers (see ``scale_by_alias``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that must come last in a
    chain (pass ``value=`` to ``update``).

  References:
    Medyakov et al., arXiv 2506.03725; released code
    ``evseevgrv/SignSGD_GoldenGate`` (``AIDsignSGD``).
  """
  _checks.check_positive("max_stepsize", max_stepsize)
  _checks.check_int("total_steps", total_steps, 1)
  _checks.check_interval("warmup_fraction", warmup_fraction, 0.0, 1.0)
  warmup_steps: Any
  if _checks.static_int(total_steps) is not None and not isinstance(
      warmup_fraction, jax.Array):
    warmup_steps = int(warmup_fraction * total_steps)
  else:  # traced, e.g. under optax.inject_hyperparams
    warmup_steps = jnp.floor(warmup_fraction * total_steps).astype(jnp.int32)
  return optax.chain(_stepsize.scale_by_alias(
      distance="lower_bound", f_lower=f_lower, eta0=eta0,
      initial_stepsize=max_stepsize, max_stepsize=max_stepsize,
      update_gap=update_gap, warmup_steps=warmup_steps,
      warmup_stepsize=_linear_warmup(max_stepsize, warmup_steps),
      weight_decay=weight_decay, axis_name=axis_name))


def _linear_warmup(peak: Any, steps: Any) -> optax.Schedule:
  """``optax.linear_schedule(0, peak, max(steps, 1))`` for traced ``steps``."""
  steps = jnp.maximum(steps, 1)

  def schedule(count):
    frac = 1.0 - jnp.clip(count, 0, steps) / steps
    return -peak * frac + peak

  return schedule
