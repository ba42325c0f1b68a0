"""Bearing-fault data: CWRU-like vibration synthesis, a local CWRU .mat loader, and text serialisation.

Small LMs read a vibration window as a short text of quantised features (time-domain statistics and
envelope-spectrum peaks in ORDERS of shaft speed, so they transfer across loads). The synthetic
signals follow the usual bearing-fault model (impulse train at the fault frequency with random slip,
each impulse a decaying structural resonance, load-zone/cage amplitude modulation, shaft harmonics,
sensor noise), tuned so the 10-class task is learnable but not trivial.
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import scipy.io
from pydantic import BaseModel, Field, model_validator

if TYPE_CHECKING:  # imported where a dataset is built: validate/scale run without `datasets`
    import datasets

CLASS_NAMES: tuple[str, ...] = (
    "normal",
    *(f"{kind}_{size}" for kind in ("IR", "B", "OR") for size in ("007", "014", "021")),
)
LOAD_RPM: dict[int, float] = {0: 1797.0, 1: 1772.0, 2: 1750.0, 3: 1730.0}

# 6205-2RS drive-end bearing: fault frequencies as multiples (orders) of shaft speed.
FAULT_ORDERS: dict[str, float] = {"IR": 5.4152, "OR": 3.5848, "B": 4.7135}  # B: 2x BSF convention
CAGE_ORDER = 0.39828

SHAFT_RMS = 0.07  # g; healthy drive-end level in CWRU
REFERENCE_FAULT_RMS = 0.15  # g; ~rms of a nominal 0.007-in impulse train: the snr_db reference
SIZE_GAIN = {"007": 1.0, "014": 1.6, "021": 2.5}  # impulse amplitude grows with fault size
SIZE_SPREAD = 0.1  # per-signal log-normal amplitude spread (defects of one size differ)
BALL_GAIN = 0.7  # ball impacts are weaker than race impacts
LOAD_GAIN = 0.06  # per hp: heavier load, harder impacts

ORDER_RANGE = (0.5, 11.0)  # envelope-spectrum orders that are serialised
KNOWN_ORDERS = {"bpfi": FAULT_ORDERS["IR"], "bpfo": FAULT_ORDERS["OR"], "bsf": FAULT_ORDERS["B"]}
TOP_PEAKS = 3
LOG_STEPS_PER_DECADE = 40  # positive magnitudes are quantised on a 6 % log grid (bounded vocab)


class DataError(ValueError):
    """Bad data input: missing CWRU folder, unreadable or unrecognised .mat file, bad features."""


Load = Annotated[int, Field(ge=0, le=3)]


MAX_SEED = 2**32 - 1  # numpy and torch seeds: non-negative, and job seeds get small offsets added


class DataConfig(BaseModel, extra="forbid"):
    """The YAML `data:` section.

    calibration_mix adds text "domains" to the calibration split (same signals, other serialisations),
    so importance scores are not tuned to one exact prompt layout:
      * "shuffled_fields": the "name value" pairs of each text in a random order;
      * "raw_numbers": only the values, field names dropped.
    """

    source: Literal["synthetic", "cwru"] = "synthetic"
    cwru_dir: str | None = None
    samples_per_class_per_load: int = Field(80, ge=2)
    window: int = Field(4096, ge=512)
    sample_rate: int = Field(12000, ge=1000)
    snr_db: float = Field(
        0.0,
        ge=-60.0,
        le=120.0,
        allow_inf_nan=False,
        description="REFERENCE_FAULT_RMS over sensor-noise rms (dB); same noise for every class",
    )
    train_loads: list[Load] = Field(default_factory=lambda: [0, 1, 2])
    heldout_loads: list[Load] = Field(default_factory=lambda: [3])
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    calibration_size: int = Field(64, ge=1)
    calibration_mix: list[Literal["shuffled_fields", "raw_numbers"]] = Field(default_factory=list)
    text_style: Literal["features", "sentences"] = Field(
        "features",
        description="features: compact 'name value' text; sentences: English inspection notes (same numbers)",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _check_consistency(self) -> DataConfig:
        problems = []
        if not self.train_loads:
            problems.append("data.train_loads must name at least one load")
        loads = [*self.train_loads, *self.heldout_loads]
        if len(set(loads)) != len(loads) and not set(self.train_loads) & set(self.heldout_loads):
            problems.append("data.train_loads/heldout_loads contain duplicates")
        if overlap := sorted(set(self.train_loads) & set(self.heldout_loads)):
            problems.append(f"data.train_loads and data.heldout_loads share loads {overlap}")
        if self.validation_fraction + self.test_fraction >= 1:
            problems.append("data.validation_fraction + data.test_fraction must be < 1")
        if self.calibration_mix and self.text_style != "features":
            problems.append(
                "data.calibration_mix rewrites 'name value' fields: needs text_style features"
            )
        if (self.source == "cwru") != (self.cwru_dir is not None):
            problems.append("data.cwru_dir must be given exactly when data.source == 'cwru'")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ----------------------------------------------------------------------------- synthesis


def resonance_kernel(freq_hz: float, damping: float, sample_rate: int) -> np.ndarray:
    """One impact response: a decaying sinusoid (single-degree-of-freedom structural mode)."""
    omega = 2 * np.pi * freq_hz
    length = int(7 / (damping * omega) * sample_rate) + 1
    t = np.arange(length) / sample_rate
    return np.exp(-damping * omega * t) * np.sin(omega * np.sqrt(1 - damping**2) * t)


def impulse_times(period_s: float, duration_s: float, jitter: float, rng: np.random.Generator):
    """Impact instants with random slip: each interval is the period times (1 + N(0, jitter))."""
    count = int(duration_s / period_s) + 2
    intervals = period_s * (1 + jitter * rng.standard_normal(count))
    times = rng.uniform(0, period_s) + np.concatenate([[0.0], np.cumsum(intervals[:-1])])
    return times[times < duration_s]


def fault_vibration(
    kind: str, amplitude: float, shaft_hz: float, n: int, fs: int, rng: np.random.Generator
) -> np.ndarray:
    """Impulse train of one localised fault (IR, B or OR) exciting a random resonance."""
    times = impulse_times(1 / (FAULT_ORDERS[kind] * shaft_hz), n / fs, rng.uniform(0.01, 0.02), rng)
    amps = amplitude * (1 + 0.1 * rng.standard_normal(times.size))
    if kind == "IR":  # defect rotates with the shaft through the load zone
        depth = rng.uniform(0.3, 0.8)
        amps *= 1 + depth * np.cos(2 * np.pi * shaft_hz * times + rng.uniform(0, 2 * np.pi))
    elif kind == "B":  # ball is carried by the cage; its spin axis wanders, so impacts come and go
        depth = rng.uniform(0.3, 0.8)
        amps *= 1 + depth * np.cos(
            2 * np.pi * CAGE_ORDER * shaft_hz * times + rng.uniform(0, 2 * np.pi)
        )
        amps *= rng.random(times.size) < rng.uniform(0.5, 0.9)
    train = np.zeros(n)
    np.add.at(train, np.minimum(np.round(times * fs).astype(int), n - 1), amps)
    kernel = resonance_kernel(rng.uniform(0.25, 0.42) * fs, rng.uniform(0.04, 0.06), fs)
    return np.convolve(train, kernel)[:n]


def synthesize_signal(
    label: str, load: int, rng: np.random.Generator, cfg: DataConfig
) -> np.ndarray:
    """One CWRU-like drive-end acceleration window (g) for a class label at a motor load (hp)."""
    if label not in CLASS_NAMES or load not in LOAD_RPM:
        raise DataError(f"synthesize_signal: unknown label {label!r} or load {load!r}")
    n, fs = cfg.window, cfg.sample_rate
    shaft_hz = LOAD_RPM[load] / 60 * (1 + 0.003 * rng.standard_normal())
    t = np.arange(n) / fs
    signal = np.zeros(n)
    for harmonic, weight in ((1, 1.0), (2, 0.4), (3, 0.15)):
        amp = np.sqrt(2) * SHAFT_RMS * weight * rng.uniform(0.6, 1.4)
        signal += amp * np.sin(2 * np.pi * harmonic * shaft_hz * t + rng.uniform(0, 2 * np.pi))
    if label != "normal":
        kind, size = label.split("_")
        gain = SIZE_GAIN[size] * (1 + LOAD_GAIN * load) * (BALL_GAIN if kind == "B" else 1.0)
        gain *= np.exp(SIZE_SPREAD * rng.standard_normal())
        signal += fault_vibration(kind, gain, shaft_hz, n, fs, rng)
    noise_rms = REFERENCE_FAULT_RMS * 10 ** (-cfg.snr_db / 20)
    return signal + noise_rms * rng.standard_normal(n)


# ----------------------------------------------------------------------------- features


def envelope_order_spectrum(
    signal: np.ndarray, rpm: float, sample_rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude spectrum of the Hilbert envelope of the high-passed signal, on an order axis."""
    n = signal.size
    spectrum = np.fft.fft(signal - signal.mean())
    freqs = np.fft.fftfreq(n, 1 / sample_rate)
    analytic = np.fft.ifft(np.where(freqs > 0.17 * sample_rate, 2 * spectrum, 0))  # HP + Hilbert
    envelope = np.abs(analytic)
    padded = 4 * n  # zero padding: finer order grid for peak location
    amp = np.abs(np.fft.rfft((envelope - envelope.mean()) * np.hanning(n), padded)) * 2 / n
    orders = np.fft.rfftfreq(padded, 1 / sample_rate) / (rpm / 60)
    keep = (orders >= ORDER_RANGE[0]) & (orders <= ORDER_RANGE[1])
    return orders[keep], amp[keep]


def spectral_peaks(orders: np.ndarray, amp: np.ndarray, count: int, min_gap: float = 0.3):
    """The `count` largest local maxima at least `min_gap` orders apart, strongest first."""
    is_peak = np.r_[False, (amp[1:-1] > amp[:-2]) & (amp[1:-1] >= amp[2:]), False]
    chosen: list[int] = []
    for i in np.flatnonzero(is_peak)[np.argsort(-amp[is_peak], kind="stable")]:
        if all(abs(orders[i] - orders[j]) >= min_gap for j in chosen):
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return chosen


def featurize(signal: np.ndarray, rpm: float, sample_rate: int) -> dict[str, float]:
    """Time-domain statistics plus envelope-spectrum peaks (orders, dB over the spectrum floor)."""
    x = np.asarray(signal, dtype=np.float64)
    x = x - x.mean()
    rms = float(np.sqrt(np.mean(x**2))) + 1e-12
    z = x / rms
    z2 = z * z  # explicit products: float ** 4 is ~20x slower in numpy
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / sample_rate)
    features = {
        "rms": rms,
        "p2p": float(x.max() - x.min()),
        "kurt": float(np.mean(z2 * z2)),
        "crest": float(np.abs(x).max() / rms),
        "skew": float(np.mean(z2 * z)),
        "hf": float(power[freqs > 0.17 * sample_rate].sum() / (power.sum() + 1e-30)),
    }
    orders, amp = envelope_order_spectrum(x, rpm, sample_rate)
    floor = float(np.median(amp)) + 1e-30

    def over_floor_db(value: float) -> float:
        return float(20 * np.log10(value / floor + 1e-30))

    peaks = spectral_peaks(orders, amp, TOP_PEAKS)
    for rank in range(TOP_PEAKS):
        i = peaks[rank] if rank < len(peaks) else int(np.argmin(amp))
        features[f"env{rank + 1}_order"] = float(orders[i])
        features[f"env{rank + 1}_db"] = over_floor_db(amp[i])
    for name, order in KNOWN_ORDERS.items():
        near = np.abs(orders - order) <= 0.15
        features[f"{name}_db"] = over_floor_db(amp[near].max()) if near.any() else 0.0
    return features


# ----------------------------------------------------------------------------- text


def _magnitude(value: float) -> str:
    """Positive value on a 6 % log grid, 2 significant digits: bounded, readable tokens."""
    value = min(max(abs(value), 1e-3), 1e4)
    grid = 10 ** (round(np.log10(value) * LOG_STEPS_PER_DECADE) / LOG_STEPS_PER_DECADE)
    return np.format_float_positional(grid, precision=2, unique=True, fractional=False, trim="-")


def _decibels(value: float) -> str:
    return f"{int(round(min(max(value, 0.0), 40.0)))}db"


def _order(value: float) -> str:
    return f"{round(value, 1):.1f}x"


def _signed_tenth(value: float) -> str:
    return f"{round(min(max(value, -2.0), 2.0), 1) + 0.0:.1f}"


_TEXT_FIELDS = (  # (word in the text, feature key, formatter); order is the text order
    *((name, name, _magnitude) for name in ("rms", "p2p", "kurt", "crest")),
    ("skew", "skew", _signed_tenth),
    ("hf", "hf", _magnitude),
    *(
        (word, f"env{rank}_{part}", fmt)
        for rank in range(1, TOP_PEAKS + 1)
        for word, part, fmt in (("env", "order", _order), ("peak", "db", _decibels))
    ),
    *((name, f"{name}_db", _decibels) for name in KNOWN_ORDERS),
)


def serialize(features: dict[str, float]) -> str:
    """Short text, e.g. "rms 0.41 ... env 5.4x peak 18db ... bpfi 18db bpfo 2db bsf 3db"."""
    missing = [key for _, key, _ in _TEXT_FIELDS if key not in features]
    if missing:
        raise DataError(f"serialize: features lack {missing}")
    return " ".join(f"{word} {fmt(features[key])}" for word, key, fmt in _TEXT_FIELDS)


_OPENINGS = (
    "Drive-end accelerometer at {rpm} rpm under {load} hp load",
    "Vibration survey of the motor drive-end bearing, {load} hp load, shaft at {rpm} rpm",
    "Route reading on the drive-end housing ({rpm} rpm, load {load} hp)",
)


def describe(features: dict[str, float], load: int, rng: random.Random) -> str:
    """The same measurements as `serialize`, written as an English inspection note."""
    f = {key: fmt(features[key]) for _, key, fmt in _TEXT_FIELDS}
    peaks = [(f[f"env{r}_order"], f[f"env{r}_db"]) for r in range(1, TOP_PEAKS + 1)]
    opening = rng.choice(_OPENINGS).format(rpm=int(round(LOAD_RPM[load])), load=load)
    return (
        f"{opening}: {f['rms']} g rms, {f['p2p']} g peak to peak, kurtosis {f['kurt']}, "
        f"crest factor {f['crest']}, skewness {f['skew']}, high-frequency energy share {f['hf']}. "
        "The envelope spectrum peaks at "
        + ", ".join(
            f"{order.removesuffix('x')} times shaft speed ({db[:-2]} dB)" for order, db in peaks
        )
        + f". Inner-race band {f['bpfi_db'][:-2]} dB, outer-race band {f['bpfo_db'][:-2]} dB, "
        f"ball-spin band {f['bsf_db'][:-2]} dB."
    )


def mix_text(text: str, kind: str, rng: random.Random) -> str:
    """Another serialisation "domain" of the same features (see DataConfig.calibration_mix)."""
    tokens = text.split()
    pairs = [tokens[i : i + 2] for i in range(0, len(tokens), 2)]
    if kind == "shuffled_fields":
        rng.shuffle(pairs)
        return " ".join(" ".join(pair) for pair in pairs)
    if kind == "raw_numbers":
        return " ".join(pair[1] for pair in pairs)
    raise DataError(f"mix_text: unknown calibration_mix kind {kind!r}")


# ----------------------------------------------------------------------------- CWRU files

_CWRU_NAME = re.compile(r"^(normal|ir|b|or)(007|014|021)?(?:@\d+)?_([0-3])$", re.IGNORECASE)


def _cwru_label(stem: str) -> tuple[str, int]:
    match = _CWRU_NAME.match(stem)
    if not match or (match[1].lower() == "normal") != (match[2] is None):
        raise DataError(
            f"CWRU file {stem!r}: name not recognised; expected e.g. Normal_0, IR007_1, B014_2, OR021@6_3"
        )
    kind = match[1].upper()
    return ("normal" if kind == "NORMAL" else f"{kind}_{match[2]}"), int(match[3])


def load_cwru_folder(path: str | Path, cfg: DataConfig) -> list[tuple[np.ndarray, str, int]]:
    """Cut non-overlapping cfg.window windows from real CWRU drive-end records.

    Filename convention: `<Class>_<load>.mat`, Class in Normal, IR007/IR014/IR021, B007/..., OR007/...
    (case-insensitive, an optional position suffix like "OR007@6_1.mat"), load in 0-3 hp. The signal
    is the first variable whose name ends in "_DE_time" (e.g. "X097_DE_time"). Returns
    (window, class name, load) tuples, file by file in name order.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"CWRU folder {folder} does not exist")
    files = sorted(folder.glob("*.mat"))
    if not files:
        raise DataError(f"CWRU folder {folder} holds no .mat files")
    windows: list[tuple[np.ndarray, str, int]] = []
    for file in files:
        label, load = _cwru_label(file.stem)
        try:
            record = scipy.io.loadmat(file)
        except Exception as error:  # scipy raises several types for corrupt / v7.3 files
            raise DataError(f"CWRU file {file}: cannot be read ({error})") from error
        keys = sorted(key for key in record if key.endswith("_DE_time"))
        if not keys:
            raise DataError(f"CWRU file {file}: no variable named like 'X097_DE_time'")
        signal = np.asarray(record[keys[0]], dtype=np.float64).ravel()
        for start in range(0, signal.size - cfg.window + 1, cfg.window):
            windows.append((signal[start : start + cfg.window], label, load))
    return windows


# ----------------------------------------------------------------------------- dataset

_COLUMNS = {"text": "string", "label": "int64", "load": "int64"}


def _signals(cfg: DataConfig) -> dict[tuple[int, int], list[np.ndarray]]:
    """(label index, load) -> signal windows, at most samples_per_class_per_load each."""
    loads = [*cfg.train_loads, *cfg.heldout_loads]
    strata: dict[tuple[int, int], list[np.ndarray]] = {}
    if cfg.source == "cwru":
        for signal, label, load in load_cwru_folder(cfg.cwru_dir or "", cfg):
            if load in loads:
                strata.setdefault((CLASS_NAMES.index(label), load), []).append(signal)
        if not strata:
            raise DataError(f"CWRU folder {cfg.cwru_dir}: no records for loads {sorted(loads)}")
        keep = min(cfg.samples_per_class_per_load, *(len(v) for v in strata.values()))
        return {key: value[:keep] for key, value in strata.items()}  # class-balanced
    for label_index, label in enumerate(CLASS_NAMES):
        for load in loads:
            rng = np.random.default_rng([cfg.seed, label_index, load])  # stable per stratum
            strata[(label_index, load)] = [
                synthesize_signal(label, load, rng, cfg)
                for _ in range(cfg.samples_per_class_per_load)
            ]
    return strata


def _split_sizes(n: int, cfg: DataConfig) -> tuple[int, int]:
    """(test, validation) rows of one stratum: at least one each while train keeps one."""
    n_test = max(0, min(max(1, round(cfg.test_fraction * n)), n - 1))
    n_val = max(0, min(max(1, round(cfg.validation_fraction * n)), n - n_test - 1))
    return n_test, n_val


def build_dataset(cfg: DataConfig) -> datasets.DatasetDict:
    """Synthetic datasets are pure functions of the config: build each once per process.

    `cfg` may be a richer data section (a job's, with text sources): only the bearing fields count.
    """
    if cfg.source == "synthetic":
        return _build_synthetic_cached(cfg.model_dump_json(include=set(DataConfig.model_fields)))
    return _build_dataset(cfg)


@functools.lru_cache(maxsize=8)
def _build_synthetic_cached(cfg_json: str) -> datasets.DatasetDict:
    return _build_dataset(DataConfig.model_validate_json(cfg_json))


def _build_dataset(cfg: DataConfig) -> datasets.DatasetDict:
    """Splits train/validation/test (train loads, disjoint signals), heldout, calibration.

    Class-balanced per (class, load) stratum and deterministic under cfg.seed. calibration holds
    calibration_size train rows (fewer if train is smaller) followed by the same rows rewritten by
    each calibration_mix kind.
    """
    splits = ("train", "validation", "test", "heldout")
    rows: dict[str, list[tuple[str, int, int]]] = {name: [] for name in splits}
    shuffler = np.random.default_rng([cfg.seed, 7919])
    phrasing = random.Random(cfg.seed + 1)
    for (label, load), signals in sorted(_signals(cfg).items()):
        features = [featurize(s, LOAD_RPM[load], cfg.sample_rate) for s in signals]
        if cfg.text_style == "sentences":
            texts = [describe(f, load, phrasing) for f in features]
        else:
            texts = [serialize(f) for f in features]
        stratum = [(text, label, load) for text in texts]
        if load in cfg.heldout_loads:
            rows["heldout"] += stratum
            continue
        order = shuffler.permutation(len(stratum))
        n_test, n_val = _split_sizes(len(stratum), cfg)
        rows["test"] += [stratum[i] for i in order[:n_test]]
        rows["validation"] += [stratum[i] for i in order[n_test : n_test + n_val]]
        rows["train"] += [stratum[i] for i in order[n_test + n_val :]]
    picker = random.Random(cfg.seed)
    for split_rows in rows.values():  # mix classes so that a prefix of a split is representative
        picker.shuffle(split_rows)
    base = picker.sample(rows["train"], min(cfg.calibration_size, len(rows["train"])))
    mixed = [
        (mix_text(t, kind, picker), lab, ld) for kind in cfg.calibration_mix for t, lab, ld in base
    ]
    rows["calibration"] = base + mixed

    import datasets  # lazy: the GPU check machine has no `datasets`; validate imports this module

    features = datasets.Features({name: datasets.Value(dtype) for name, dtype in _COLUMNS.items()})
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {column: [row[i] for row in split_rows] for i, column in enumerate(_COLUMNS)},
                features=features,
            )
            for name, split_rows in rows.items()
        }
    )
