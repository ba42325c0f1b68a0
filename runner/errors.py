"""The errors a user can fix: the CLI prints them as one line and exits 2 (docs/ERRORS.md).

JobError is defined here; every other module keeps its own error class next to the code that
raises it, and this module collects them (none of those modules imports this one).
"""

from __future__ import annotations

from cluster.executor import ClusterCapacityError
from cluster.shards import ShardExportError
from cluster.submit import SubmitError
from cluster.train_loop import DistributedRecoveryError
from runner.config import ConfigError
from runner.data.bearing import DataError
from runner.data.text_files import TextDataError
from runner.demo_models import DemoModelError
from runner.devices import DeviceError
from runner.exporters import ExportError
from runner.models import ModelError
from runner.preflight import PreflightError
from runner.smollm2 import SmolLM2Error
from runner.validate import ValidationFailed
from stages.arch import UnsupportedArchitecture
from stages.checkpoint import CheckpointError
from stages.guards import NumericalError
from stages.selection import SelectionError
from stages.streaming.lazy_weights import LazyWeightsError


class JobError(RuntimeError):
    """The job cannot continue; the message says why and where."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    JobError,
    PreflightError,
    ModelError,
    SmolLM2Error,
    TextDataError,
    DemoModelError,
    CheckpointError,
    DataError,
    UnsupportedArchitecture,
    SelectionError,
    NumericalError,
    LazyWeightsError,
    ShardExportError,
    SubmitError,
    DistributedRecoveryError,
    ClusterCapacityError,
    DeviceError,
    ExportError,
    ValidationFailed,
)


def user_errors() -> tuple[type[BaseException], ...]:
    return USER_ERRORS
