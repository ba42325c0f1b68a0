"""The errors a user can fix: the CLI prints them as one line and exits 2 (docs/ERRORS.md)."""

from __future__ import annotations


class JobError(RuntimeError):
    """The job cannot continue; the message says why and where."""


def user_errors() -> tuple[type[BaseException], ...]:
    from runner.config import ConfigError
    from runner.data import DataError
    from runner.models import ModelError
    from runner.preflight import PreflightError
    from stages.arch import UnsupportedArchitecture
    from stages.checkpoint import CheckpointError
    from stages.guards import NumericalError
    from stages.selection import SelectionError

    errors: list[type[BaseException]] = [
        ConfigError,
        JobError,
        PreflightError,
        ModelError,
        CheckpointError,
        DataError,
        UnsupportedArchitecture,
        SelectionError,
        NumericalError,
    ]
    try:  # cluster errors exist only where ray is installed
        from cluster.shards import ShardExportError
        from cluster.submit import SubmitError
        from cluster.train_loop import DistributedRecoveryError

        errors += [ShardExportError, SubmitError, DistributedRecoveryError]
    except ImportError:
        pass
    try:
        from runner.devices import DeviceError

        errors.append(DeviceError)
    except ImportError:
        pass
    try:
        from stages.validate import ValidationFailed

        errors.append(ValidationFailed)
    except ImportError:
        pass
    return tuple(errors)
