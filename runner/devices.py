"""Edge device profiles (configs/devices/*.yaml) and the memory budget a model must fit in.

A profile is a handful of published or derived facts about one device: how much memory the OS
can see, how much of it the OS itself needs, memory bandwidth (decode is bandwidth bound) and
dense BF16 compute. Users pass a built-in name or the path of their own YAML file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEVICES_DIR = Path(__file__).resolve().parents[1] / "configs" / "devices"


class DeviceError(ValueError):
    """A device profile is unknown or invalid, or a budget request makes no sense for it."""


class DeviceProfile(BaseModel):
    """Facts about one target device; every size in bytes, rates per second."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    description: str = ""
    memory_bytes: int = Field(gt=0, description="physical memory as marketed")
    visible_bytes: int = Field(gt=0, description="memory the OS reports (after firmware carveouts)")
    os_reserve_bytes: int = Field(ge=0, description="memory to leave to the OS and runtime")
    bandwidth_bytes_per_s: float = Field(gt=0)
    bf16_flops: float = Field(gt=0, description="dense BF16 FLOP/s")
    notes: str = ""
    source: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if self.visible_bytes > self.memory_bytes:
            raise ValueError(
                f"visible_bytes {self.visible_bytes} exceeds memory_bytes {self.memory_bytes}"
            )
        if self.os_reserve_bytes >= self.visible_bytes:
            raise ValueError(
                f"os_reserve_bytes {self.os_reserve_bytes} leaves nothing of visible_bytes "
                f"{self.visible_bytes}"
            )
        return self

    @property
    def usable_bytes(self) -> int:
        """What a model may use: visible memory minus the OS reserve."""
        return self.visible_bytes - self.os_reserve_bytes


def available_devices() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or candidate.is_file() or "/" in text:
        if not candidate.is_file():
            raise DeviceError(f"device profile file not found: {candidate}")
        return candidate
    builtin = DEVICES_DIR / f"{text}.yaml"
    if not builtin.is_file():
        known = ", ".join(available_devices()) or "none"
        raise DeviceError(
            f"unknown device {text!r}; available devices: {known} (or pass a path to a profile YAML)"
        )
    return builtin


def load_device(name_or_path: str | Path) -> DeviceProfile:
    """A built-in profile by name (dgx_spark, jetson_orin_nano_8gb, ...) or a user YAML path."""
    path = _resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise DeviceError(
            f"{path}: cannot read the device profile ({exc.strerror or exc})"
        ) from None
    except UnicodeDecodeError as exc:
        raise DeviceError(
            f"{path}: not a UTF-8 YAML device profile (byte {exc.start} is not text); pass a "
            "profile YAML such as configs/devices/dgx_spark.yaml"
        ) from None
    except yaml.YAMLError as exc:
        raise DeviceError(f"{path}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise DeviceError(f"{path}: expected a mapping of device facts")
    raw.setdefault("name", path.stem)
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: "
            f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}"
            for err in exc.errors()
        )
        raise DeviceError(f"{path}: invalid device profile ({problems})") from None


def budget_bytes(
    profile: DeviceProfile, fraction: float | None = None, budget_bytes: int | None = None
) -> int:
    """Bytes a model may use on `profile`: an explicit byte count, or usable memory x fraction.

    usable = visible_bytes - os_reserve_bytes; fraction defaults to 1 (the whole usable memory).
    """
    return _budget(profile, fraction, budget_bytes)


def _budget(profile: DeviceProfile, fraction: float | None, budget_bytes: int | None) -> int:
    if fraction is not None and budget_bytes is not None:
        raise DeviceError(f"{profile.name}: give fraction or budget_bytes, not both")
    usable = profile.usable_bytes
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise DeviceError(f"{profile.name}: budget_bytes must be > 0, got {budget_bytes}")
        if budget_bytes > usable:
            raise DeviceError(
                f"{profile.name}: budget_bytes {budget_bytes} exceeds the device's usable memory "
                f"{usable} (visible {profile.visible_bytes} - OS reserve {profile.os_reserve_bytes})"
            )
        return int(budget_bytes)
    fraction = 1.0 if fraction is None else fraction
    if not 0.0 < fraction <= 1.0:
        raise DeviceError(f"{profile.name}: fraction must be in (0, 1], got {fraction}")
    return int(usable * fraction)


def resolve_budget(device: str | None, fraction: float | None, budget_bytes: int | None) -> int:
    """A job target's budget: from a device profile (x fraction, or explicit bytes), or bytes alone."""
    if device is None:
        if budget_bytes is None:
            raise DeviceError("a memory budget needs a device or budget_bytes")
        return int(budget_bytes)
    return _budget(load_device(device), fraction, budget_bytes)
