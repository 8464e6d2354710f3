"""Harness cases for the multi-worker aggregators, run on one worker."""

import optax

import harness
import optax_sign


def _chain(transform, learning_rate):
  return optax.chain(transform, optax.scale_by_learning_rate(learning_rate))


CASES = [
    harness.Case("majority_vote_one_worker",
                 lambda learning_rate: _chain(
                     optax_sign.majority_vote(None), learning_rate),
                 {"learning_rate": 0.02}),
    harness.Case("majority_vote_alltoall_positive_one_worker",
                 lambda learning_rate: _chain(
                     optax_sign.majority_vote(None, "alltoall", "positive"),
                     learning_rate),
                 {"learning_rate": 0.02}),
    harness.Case("mean_of_signs_one_worker",
                 lambda learning_rate: _chain(
                     optax_sign.mean_of_signs(None), learning_rate),
                 {"learning_rate": 0.02}),
    harness.Case("error_feedback_sign_axis_none",
                 lambda learning_rate: _chain(
                     optax_sign.scale_by_error_feedback_sign(axis_name=None),
                     learning_rate),
                 {"learning_rate": 0.1}),
]


DEFAULTS = [
    harness.Default("majority_vote", optax_sign.majority_vote, (None,)),
    harness.Default("mean_of_signs", optax_sign.mean_of_signs, (None,)),
]
