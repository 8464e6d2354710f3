"""optax_sign: composable optax transformations for sign-based training."""

from optax_sign._aliases import alias_sign_sgd
from optax_sign._aliases import alias_sign_sgd_released
from optax_sign._aliases import alias_sign_sgd_stochastic
from optax_sign._aliases import diloco
from optax_sign._aliases import dsm_ls
from optax_sign._aliases import lion_like
from optax_sign._aliases import model_averaging
from optax_sign._aliases import sign_sgd
from optax_sign._aliases import signum
from optax_sign._aliases import slowmo
from optax_sign._checks import TIE_POLICIES
from optax_sign._communication import majority_vote
from optax_sign._communication import mean_of_signs
from optax_sign._communication import mean_signs
from optax_sign._communication import per_worker
from optax_sign._communication import select_transport
from optax_sign._communication import SignAggregationState
from optax_sign._communication import vote_bytes
from optax_sign._communication import vote_signs
from optax_sign._sharded_vote import sharded_majority_vote
from optax_sign._sharded_vote import sharded_vote_bytes
from optax_sign._sharded_vote import vote_signs_sharded
from optax_sign._data_parallel import data_parallel
from optax_sign._worker_grad import worker_grad
from optax_sign._worker_grad import worker_value_and_grad
from optax_sign._error_feedback import ErrorFeedbackState
from optax_sign._error_feedback import scale_by_error_feedback_sign
from optax_sign._local_steps import broadcast_params
from optax_sign._local_steps import local_steps
from optax_sign._local_steps import local_steps_anchor
from optax_sign._local_steps import local_steps_vmap_state
from optax_sign._local_steps import LocalStepsState
from optax_sign._outer import global_sign_momentum
from optax_sign._outer import matrix_mask
from optax_sign._sign import randomized_sign
from optax_sign._sign import RandomizedSignState
from optax_sign._sign import scale_by_randomized_sign
from optax_sign._sign import scale_by_sign
from optax_sign._sign import sign_momentum
from optax_sign._sign import LionMomentumState
from optax_sign._sign import scale_by_lion_momentum
from optax_sign._sign import tie_sign
from optax_sign._sos import sign_sgd_probe
from optax_sign._sos import SOSProbe
from optax_sign._sos import SOSResult
from optax_sign._sos import sos_search
from optax_sign._alias_momentum import AliasMomentumState
from optax_sign._alias_momentum import scale_by_alias_momentum
from optax_sign._bits import SignBits
from optax_sign._stepsize import alias_previous_params
from optax_sign._stepsize import AliasState
from optax_sign._stepsize import GapState
from optax_sign._stepsize import GradientMemory
from optax_sign._stepsize import LowerBoundState
from optax_sign._stepsize import MomentumBuffer
from optax_sign._stepsize import scale_by_alias
from optax_sign._stepsize import SignMemory
from optax_sign._wire import Collective
from optax_sign._wire import communication_bytes
from optax_sign._wire import CommunicationReport

__version__ = "0.1.0"

__all__ = (
    "AliasMomentumState",
    "AliasState",
    "Collective",
    "CommunicationReport",
    "ErrorFeedbackState",
    "GapState",
    "GradientMemory",
    "LocalStepsState",
    "LowerBoundState",
    "MomentumBuffer",
    "RandomizedSignState",
    "LionMomentumState",
    "SignAggregationState",
    "SignBits",
    "SignMemory",
    "TIE_POLICIES",
    "SOSProbe",
    "SOSResult",
    "alias_previous_params",
    "alias_sign_sgd",
    "alias_sign_sgd_released",
    "alias_sign_sgd_stochastic",
    "broadcast_params",
    "communication_bytes",
    "data_parallel",
    "diloco",
    "dsm_ls",
    "global_sign_momentum",
    "lion_like",
    "local_steps",
    "local_steps_anchor",
    "local_steps_vmap_state",
    "majority_vote",
    "matrix_mask",
    "mean_of_signs",
    "mean_signs",
    "model_averaging",
    "per_worker",
    "randomized_sign",
    "scale_by_alias",
    "scale_by_alias_momentum",
    "scale_by_error_feedback_sign",
    "scale_by_lion_momentum",
    "scale_by_randomized_sign",
    "scale_by_sign",
    "select_transport",
    "sharded_majority_vote",
    "sharded_vote_bytes",
    "sign_momentum",
    "sign_sgd",
    "sign_sgd_probe",
    "signum",
    "sos_search",
    "slowmo",
    "tie_sign",
    "vote_bytes",
    "vote_signs",
    "vote_signs_sharded",
    "worker_grad",
    "worker_value_and_grad",
)
