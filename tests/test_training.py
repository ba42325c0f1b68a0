"""The training loop (stages.training), split encoding, exact metrics and classification KD."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

from stages.metrics import confusion_matrix, macro_f1
from stages.objectives import get_objective
from stages.objectives.classification import kd_loss
from stages.split import EncodedSplit, SplitError, encode_split
from stages.training import TrainingError, TrainSettings, lr_multiplier, train_steps, training_loss

CLASSIFY = get_objective("classification")
evaluate = CLASSIFY.evaluate


def _train(model, split, settings, teacher=None, **kwargs) -> list[float]:
    return train_steps(model, split, settings, training_loss(CLASSIFY, settings, teacher), **kwargs)


class LookupModel(nn.Module):
    """Logits are a fixed table row chosen by the first token id: outputs are known exactly."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)
        self.config = SimpleNamespace(num_labels=table.shape[1])
        self.modes_seen: list[bool] = []

    def forward(self, input_ids, attention_mask=None):
        self.modes_seen.append(self.training)
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _lookup_split(labels: list[int]) -> EncodedSplit:
    n = len(labels)
    ids = torch.arange(n).unsqueeze(1).repeat(1, 3)
    return EncodedSplit(ids, torch.ones_like(ids), torch.tensor(labels))


def test_evaluate_exact_metrics_on_known_logits() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    table = 2.0 * torch.nn.functional.one_hot(torch.tensor(preds), 3).float()
    model = LookupModel(table)
    model.train()
    result = evaluate(model, _lookup_split(labels))

    assert result.n == 6
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # per-class F1 = 2tp / (support + predicted): 2/4, 4/5, 2/3
    assert result.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    p_hit = math.exp(2) / (math.exp(2) + 2)
    p_miss = 1 / (math.exp(2) + 2)
    expected_loss = -(4 * math.log(p_hit) + 2 * math.log(p_miss)) / 6
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert model.modes_seen and not any(model.modes_seen)  # every batch in eval mode
    assert model.training  # mode restored


def test_macro_f1_ignores_absent_classes_and_confusion_counts() -> None:
    conf = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 4)
    assert conf.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert macro_f1(conf) == pytest.approx((2 / 3 + 2 / 3) / 2)  # classes 2, 3 absent
    assert macro_f1(torch.eye(3, dtype=torch.long) * 5) == pytest.approx(1.0)


class TinyWordTokenizer:
    """Minimal HF-like tokenizer: ids are word positions in a fixed vocab, right padding."""

    pad_token_id = 0

    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i + 1 for i, w in enumerate(words)}

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[self.vocab[w] for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_encode_split_pads_to_longest_and_batches_trim_padding() -> None:
    from datasets import Dataset

    ds = Dataset.from_dict({"text": ["a b c d", "a", "b c", "d"], "label": [1, 0, 1, 0]})
    split = encode_split(ds, TinyWordTokenizer(["a", "b", "c", "d"]), max_length=3)
    assert split.input_ids.shape == (4, 3)  # truncated to max_length
    assert split.labels.tolist() == [1, 0, 1, 0]
    assert len(split) == 4

    batches = list(split.subset([1, 3, 2]).batches(2))
    assert [b["labels"].tolist() for b in batches] == [[0, 0], [1]]
    assert batches[0]["input_ids"].shape == (2, 1)  # all-padding columns trimmed
    assert batches[1]["input_ids"].tolist() == [[2, 3]]


def test_encode_split_rejects_missing_column() -> None:
    from datasets import Dataset

    with pytest.raises(SplitError, match="'label'"):
        encode_split(Dataset.from_dict({"text": ["a"]}), TinyWordTokenizer(["a"]))


def test_shuffled_batches_are_seeded_permutations() -> None:
    split = _lookup_split(list(range(10)))
    order = lambda seed: [  # noqa: E731
        x for b in split.batches(3, shuffle=True, seed=seed) for x in b["labels"].tolist()
    ]
    assert sorted(order(1)) == list(range(10))
    assert order(1) == order(1)
    assert order(1) != order(2)


# ----------------------------------------------------------------------------- training


def _tiny_classifier(seed: int = 0) -> GPT2ForSequenceClassification:
    cfg = GPT2Config(
        vocab_size=12, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=32,
        num_labels=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(cfg)


def _toy_split(n: int = 48) -> EncodedSplit:
    """Label = which of tokens 3/4/5 appears in the sequence; random filler tokens 6..11."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    ids = torch.randint(6, 12, (n, 6), generator=g)
    ids[torch.arange(n), torch.randint(0, 5, (n,), generator=g)] = labels + 3
    mask = torch.ones_like(ids)
    ids[::4, 5], mask[::4, 5] = 0, 0  # some right padding
    return EncodedSplit(ids, mask, labels)


def test_train_steps_lowers_loss_and_reaches_high_accuracy() -> None:
    model, split = _tiny_classifier(), _toy_split()
    before = evaluate(model, split)
    seen: list[int] = []
    losses = _train(
        model, split, TrainSettings(steps=80, lr=1e-2, batch_size=16),
        on_step=lambda step, loss: seen.append(step),
    )  # fmt: skip
    after = evaluate(model, split)
    assert len(losses) == 80 and seen == list(range(80))
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
    assert after.loss < 0.5 * before.loss
    assert after.accuracy >= 0.9


def test_train_steps_is_deterministic_and_leaves_global_rng_alone() -> None:
    settings = TrainSettings(steps=15, lr=5e-3, batch_size=8, seed=3)
    state = torch.get_rng_state()
    a = _train(_tiny_classifier(), _toy_split(), settings)
    torch.set_rng_state(state)
    b = _train(_tiny_classifier(), _toy_split(), settings)
    assert a == b
    state = torch.get_rng_state()
    _train(_tiny_classifier(), _toy_split(), settings)
    assert torch.equal(torch.get_rng_state(), state)
    c = _train(_tiny_classifier(), _toy_split(), TrainSettings(steps=15, lr=5e-3, seed=4))
    assert c != a


def test_kd_with_student_as_teacher_has_zero_loss() -> None:
    model, split = _tiny_classifier(), _toy_split()

    def teacher(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    settings = TrainSettings(steps=5, loss="kd", kd_alpha=1.0, kd_temperature=3.0)
    losses = _train(model, split, settings, teacher)
    assert max(abs(x) for x in losses) < 1e-6


def test_kd_uses_teacher_logits() -> None:
    model, split = _tiny_classifier(), _toy_split()
    calls: list[int] = []

    def confident_teacher(batch):
        calls.append(1)
        return 10.0 * torch.nn.functional.one_hot(batch["labels"], 3).float()

    settings = TrainSettings(steps=40, lr=1e-2, loss="kd", kd_alpha=1.0)
    losses = _train(model, split, settings, confident_teacher)
    assert len(calls) == 40
    assert losses[0] > 0.1 and losses[-1] < 0.5 * losses[0]


def test_kd_loss_formula() -> None:
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    ce = float(torch.nn.functional.cross_entropy(s, y))
    assert float(kd_loss(s, t, y, temperature=1.0, alpha=0.0)) == pytest.approx(ce)
    p = torch.softmax(t, -1)
    q = torch.softmax(s, -1)
    kl = float((p * (p.log() - q.log())).sum())
    got = float(kd_loss(s, t, y, temperature=1.0, alpha=0.5))
    assert got == pytest.approx(0.5 * kl + 0.5 * ce)


def test_kd_without_teacher_and_bad_settings_raise() -> None:
    with pytest.raises(TrainingError, match="needs a teacher"):
        _train(_tiny_classifier(), _toy_split(), TrainSettings(steps=1, loss="kd"))
    with pytest.raises(TrainingError, match="kd_alpha"):
        _train(_tiny_classifier(), _toy_split(), TrainSettings(steps=1, kd_alpha=2.0))


def test_only_given_params_change() -> None:
    model = _tiny_classifier()
    head = list(model.score.parameters())
    frozen = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    old_head = [p.detach().clone() for p in head]
    _train(model, _toy_split(), TrainSettings(steps=3, lr=1e-2), params=head)
    assert all(torch.equal(v, model.transformer.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(a, b) for a, b in zip(old_head, head))


def test_non_finite_loss_raises() -> None:
    model = _tiny_classifier()
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="step 0"):
        _train(model, _toy_split(), TrainSettings(steps=2))


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    values = [lr_multiplier(s, 10, 0.2) for s in range(11)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
    assert values[10] == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(6, 10, 0.2, "linear") == pytest.approx(0.5)
