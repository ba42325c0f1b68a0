"""Bearing-fault data: physics, splits, text bounds, config checks, CWRU loading, difficulty."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import scipy.io
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from runner.data.bearing import (  # noqa: E402
    CLASS_NAMES,
    FAULT_ORDERS,
    LOAD_RPM,
    DataConfig,
    DataError,
    build_dataset,
    featurize,
    load_cwru_folder,
    serialize,
    synthesize_signal,
)

SMALL = {"samples_per_class_per_load": 6, "window": 2048, "calibration_size": 16}


@pytest.fixture(scope="module")
def default_dataset():
    return build_dataset(DataConfig())


def test_constants_describe_ten_classes_and_four_loads():
    assert len(CLASS_NAMES) == 10 and len(set(CLASS_NAMES)) == 10
    assert CLASS_NAMES[0] == "normal" and {"IR_007", "B_014", "OR_021"} <= set(CLASS_NAMES)
    assert LOAD_RPM == {0: 1797, 1: 1772, 2: 1750, 3: 1730}


def test_same_config_builds_identical_dataset_and_seed_changes_it():
    cfg = DataConfig(**SMALL, calibration_mix=["shuffled_fields"])
    first, second = build_dataset(cfg), build_dataset(cfg)
    for split in first:
        assert first[split].to_dict() == second[split].to_dict()
    other = build_dataset(DataConfig(**SMALL, seed=1))
    assert other["train"]["text"] != first["train"]["text"]


def test_splits_are_class_balanced_and_disjoint():
    cfg = DataConfig(**SMALL)
    ds = build_dataset(cfg)
    assert set(ds) == {"train", "validation", "test", "heldout", "calibration"}
    for split, per_stratum in (("train", 4), ("validation", 1), ("test", 1), ("heldout", 6)):
        loads = cfg.heldout_loads if split == "heldout" else cfg.train_loads
        counts = Counter(zip(ds[split]["label"], ds[split]["load"]))
        assert counts == {(c, ld): per_stratum for c in range(10) for ld in loads}, split
    texts = {split: set(ds[split]["text"]) for split in ("train", "validation", "test")}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]


def test_heldout_split_holds_only_heldout_loads():
    ds = build_dataset(DataConfig(**SMALL, train_loads=[0, 2], heldout_loads=[1, 3]))
    assert set(ds["heldout"]["load"]) == {1, 3}
    for split in ("train", "validation", "test", "calibration"):
        assert set(ds[split]["load"]) <= {0, 2}, split


def test_calibration_is_drawn_from_train_and_mixes_add_domains():
    ds = build_dataset(DataConfig(**SMALL, calibration_mix=["shuffled_fields", "raw_numbers"]))
    calibration = ds["calibration"]["text"]
    assert len(calibration) == 3 * 16
    base, shuffled, raw = calibration[:16], calibration[16:32], calibration[32:]
    assert set(base) <= set(ds["train"]["text"])
    assert [sorted(t.split()) for t in shuffled] == [sorted(t.split()) for t in base]
    assert shuffled != base
    assert raw == [" ".join(t.split()[1::2]) for t in base]
    assert ds["calibration"]["label"][:16] == ds["calibration"]["label"][16:32]


def test_tiny_strata_keep_one_train_row():
    ds = build_dataset(DataConfig(**{**SMALL, "samples_per_class_per_load": 2}))
    assert len(ds["train"]) == len(ds["test"]) == 30 and len(ds["validation"]) == 0


@pytest.mark.parametrize("label", ["IR_007", "OR_007", "B_021"])
def test_envelope_spectrum_peaks_at_the_fault_order(label):
    cfg = DataConfig(snr_db=30)
    target = FAULT_ORDERS[label.split("_")[0]]
    rng = np.random.default_rng(123)
    for load in LOAD_RPM:
        for _ in range(3):
            signal = synthesize_signal(label, load, rng, cfg)
            features = featurize(signal, LOAD_RPM[load], cfg.sample_rate)
            assert abs(features["env1_order"] - target) < 0.1, (load, features["env1_order"])


def test_faults_are_impulsive_and_grow_with_size():
    cfg = DataConfig(snr_db=10)
    rng = np.random.default_rng(5)

    def mean_feature(label: str, key: str) -> float:
        feats = [featurize(synthesize_signal(label, 1, rng, cfg), 1772, 12000) for _ in range(8)]
        return float(np.mean([f[key] for f in feats]))

    assert mean_feature("normal", "kurt") < 3.5 < mean_feature("OR_007", "kurt")
    assert (
        mean_feature("IR_007", "rms")
        < mean_feature("IR_014", "rms")
        < mean_feature("IR_021", "rms")
    )


def test_texts_are_short_with_a_bounded_vocabulary(default_dataset):
    vocab: set[str] = set()
    for split in default_dataset.values():
        for text in split["text"]:
            tokens = text.split()
            assert 0 < len(tokens) <= 64
            vocab.update(tokens)
    assert len(vocab) < 400
    assert {"rms", "kurt", "env", "bpfi", "bpfo", "bsf"} <= vocab


def test_serialize_quantises_and_rejects_missing_fields():
    features = featurize(
        synthesize_signal("IR_014", 0, np.random.default_rng(0), DataConfig()), 1797, 12000
    )
    text = serialize(features)
    assert text.startswith("rms ") and " env " in text and text.endswith("db")
    assert all(len(token) <= 6 for token in text.split())
    assert serialize({**features, "rms": features["rms"] * 1.001}) == text  # coarse grid
    features.pop("kurt")
    with pytest.raises(DataError, match="kurt"):
        serialize(features)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_loads": [0, 1], "heldout_loads": [1]}, "share loads"),
        ({"train_loads": [0, 4]}, "train_loads"),
        ({"train_loads": []}, "at least one load"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"source": "cwru"}, "cwru_dir"),
        ({"cwru_dir": "/tmp/x"}, "cwru_dir"),
        ({"samples_per_class_per_load": 1}, "samples_per_class_per_load"),
        ({"window": 100}, "window"),
        ({"calibration_mix": ["emoji"]}, "calibration_mix"),
        ({"sampels_per_class": 3}, "sampels_per_class"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**overrides)


def _write_record(folder, stem: str, signal: np.ndarray, key: str = "X105_DE_time") -> None:
    scipy.io.savemat(folder / f"{stem}.mat", {key: signal[:, None], "X105RPM": 1772})


def test_cwru_loader_cuts_windows_and_reads_labels(tmp_path):
    cfg = DataConfig(source="cwru", cwru_dir=str(tmp_path), window=1024)
    _write_record(tmp_path, "IR007_1", np.arange(3 * 1024 + 10, dtype=float))
    _write_record(tmp_path, "normal_0", np.ones(1024))
    _write_record(tmp_path, "OR021@6_3", np.zeros(2048), key="X234_DE_time")
    windows = load_cwru_folder(tmp_path, cfg)
    assert [(label, load) for _, label, load in windows] == [
        ("IR_007", 1),
        ("IR_007", 1),
        ("IR_007", 1),
        ("OR_021", 3),
        ("OR_021", 3),
        ("normal", 0),
    ]
    assert all(w.shape == (1024,) for w, _, _ in windows)
    assert windows[1][0][0] == 1024.0  # non-overlapping, in order


def test_cwru_loader_errors_are_clear(tmp_path):
    cfg = DataConfig(source="cwru", cwru_dir=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_cwru_folder(tmp_path / "missing", cfg)
    with pytest.raises(DataError, match="no .mat files"):
        load_cwru_folder(tmp_path, cfg)
    _write_record(tmp_path, "IR099_1", np.zeros(8192))
    with pytest.raises(DataError, match="IR099_1.*not recognised"):
        load_cwru_folder(tmp_path, cfg)
    (tmp_path / "IR099_1.mat").unlink()
    _write_record(tmp_path, "B014_2", np.zeros(8192), key="X999_FE_time")
    with pytest.raises(DataError, match="_DE_time"):
        load_cwru_folder(tmp_path, cfg)


def test_build_dataset_from_cwru_folder(tmp_path):
    cfg = DataConfig(
        source="cwru", cwru_dir=str(tmp_path), window=1024, samples_per_class_per_load=3
    )
    rng = np.random.default_rng(0)
    for label in CLASS_NAMES:
        stem = "Normal" if label == "normal" else label.replace("_", "")
        for load in (0, 3):
            signal = np.concatenate([synthesize_signal(label, load, rng, cfg) for _ in range(4)])
            _write_record(tmp_path, f"{stem}_{load}", signal)
    ds = build_dataset(cfg.model_copy(update={"train_loads": [0], "heldout_loads": [3]}))
    assert Counter(ds["heldout"]["label"]) == dict.fromkeys(range(10), 3)
    assert len(ds["train"]) == len(ds["test"]) == len(ds["validation"]) == 10


def _numbers(text: str) -> list[float]:
    """Numeric tokens of a serialised text, in order (units "x" and "db" stripped)."""
    values = []
    for token in text.split():
        try:
            values.append(float(token.removesuffix("x").removesuffix("db")))
        except ValueError:
            continue
    return values


def test_task_is_learnable_but_not_trivial(default_dataset):
    """Nearest-centroid on the serialised numbers must beat chance clearly but not be perfect."""
    train_x = np.array([_numbers(t) for t in default_dataset["train"]["text"]])
    train_y = np.array(default_dataset["train"]["label"])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-9
    centroids = np.stack([((train_x - mean) / std)[train_y == c].mean(0) for c in range(10)])
    for split in ("test", "heldout"):
        x = (np.array([_numbers(t) for t in default_dataset[split]["text"]]) - mean) / std
        predicted = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        accuracy = float((predicted == np.array(default_dataset[split]["label"])).mean())
        assert 0.5 < accuracy < 0.995, (split, accuracy)
