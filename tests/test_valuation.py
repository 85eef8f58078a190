"""Sample- and modality-level valuation: Shapley values against a brute-force permutation loop and the
two-modality formula, copy counts by hand, and the resampled training inside a run."""

import itertools
import math

import pytest
import torch

from conftest import fast_config, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.functional.valuation import modality_copies, sample_copies, sample_shapley_values
from poise.methods import make_method
from poise.train import Trainer


def permutation_shapley(correct_of, modalities, present=None):
    """Average marginal contribution over every ordering of the players, one sample at a time."""
    players = [m for m in modalities if present is None or present[m]]

    def v(s):
        s = frozenset(m for m in s if m in players)
        if not s:
            return 0.0
        return len(s) * float(correct_of(frozenset(s)))

    out = {m: 0.0 for m in modalities}
    orders = list(itertools.permutations(players))
    for order in orders:
        seen = []
        for m in order:
            out[m] += (v(seen + [m]) - v(seen)) / len(orders)
            seen.append(m)
    return out


def all_subsets(modalities):
    return [frozenset(s) for k in range(1, len(modalities) + 1) for s in itertools.combinations(modalities, k)]


def test_two_modalities_formula_and_its_five_values():
    a, v, av = frozenset({"audio"}), frozenset({"visual"}), frozenset({"audio", "visual"})
    # samples: (a correct, v correct, fused correct)
    cases = [(1, 1, 1), (1, 0, 1), (0, 1, 1), (0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 0), (1, 1, 0)]
    correct = {a: torch.tensor([c[0] for c in cases], dtype=torch.bool),
               v: torch.tensor([c[1] for c in cases], dtype=torch.bool),
               av: torch.tensor([c[2] for c in cases], dtype=torch.bool)}
    phi = sample_shapley_values(correct)
    expected_a = [(ca + 2 * cf - cv) / 2 for ca, cv, cf in cases]
    expected_v = [(cv + 2 * cf - ca) / 2 for ca, cv, cf in cases]
    assert phi["audio"].tolist() == expected_a and phi["visual"].tolist() == expected_v
    assert expected_a == [1.0, 1.5, 0.5, 1.0, 0.5, -0.5, 0.0, 0.0]


def test_three_modalities_against_permutations_with_missing():
    modalities = ("audio", "text", "visual")
    torch.manual_seed(0)
    subsets = all_subsets(modalities)
    correct = {s: torch.rand(40) < 0.5 for s in subsets}
    present = {m: torch.rand(40) < 0.8 for m in modalities}
    for use_present in (False, True):
        phi = sample_shapley_values(correct, present if use_present else None)
        for i in range(40):
            ref = permutation_shapley(lambda s: correct[s][i] if s in correct else False, modalities,
                                      {m: bool(present[m][i]) for m in modalities} if use_present else None)
            for m in modalities:
                assert float(phi[m][i]) == pytest.approx(ref[m], abs=1e-6), (i, m)


def test_incomplete_subsets_are_refused():
    with pytest.raises(ValueError, match="every non-empty subset"):
        sample_shapley_values({frozenset({"audio"}): torch.ones(2, dtype=torch.bool),
                               frozenset({"audio", "visual"}): torch.ones(2, dtype=torch.bool)})


def test_copy_counts_by_hand():
    assert sample_copies(torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5])).tolist() == [3, 2, 1, 0, 0]
    assert sample_copies(torch.tensor([-1.5]), max_copies=3).tolist() == [3]
    # |0.9 - 0.3| * 2/3 * 0.5 * 100 = 20
    assert modality_copies({"audio": 0.9, "visual": 0.3}, 0.5, 100) == ("audio", 20)
    assert modality_copies({"audio": 0.2, "visual": 0.35, "text": 0.5}, 1.0, 99) == ("text", math.floor(0.3 * 2 / 3 * 99))


@pytest.mark.parametrize("level", ["sample", "modality"])
def test_trains_on_split_plus_copies(level):
    splits, _ = synthetic(2, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3})
    method = make_method("valuation", {"level": level, "warmup_epochs": 1})
    sizes = []
    original = method.on_epoch_start

    def on_epoch_start(epoch, loader):
        out = original(epoch, loader)
        sizes.append(len((out or loader).dataset))
        return out

    method.on_epoch_start = on_epoch_start
    result = Trainer(splits, method, cfg, seed=0, method_name="valuation").fit()
    n = len(splits.train)
    assert sizes[0] == n and result.test["accuracy"] > 0.5
    records = result.history[1]["method"]
    if level == "sample":
        assert sizes[1] == n + records["copies/audio"] + records["copies/visual"]
        # the copies of audio keep only audio
        assert method.copy_drop[: int(records["copies/audio"])].tolist() == [[False, True]] * int(records["copies/audio"])
    else:
        assert sizes[1] == n + records["copies"]
        expected = math.floor(abs(records["phi/audio"] - records["phi/visual"]) * 2 / 3 * n)
        assert records["copies"] == expected
        strong = 0 if records["phi/audio"] >= records["phi/visual"] else 1
        assert bool(method.copy_drop[:, strong].all()) and not bool(method.copy_drop[:, 1 - strong].any())


def test_copies_are_marked_absent_in_the_batches():
    splits, _ = synthetic(2, num_samples=120)
    cfg = fast_config(trainer={"epochs": 2})
    method = make_method("valuation", {"warmup_epochs": 1})
    seen = []
    original = method.loss

    def loss(output, batch):
        seen.append(batch.present.clone())
        return original(output, batch)

    method.loss = loss
    Trainer(splits, method, cfg, seed=0, method_name="valuation").fit()
    # every original sample has both; the copies have exactly one
    one = (torch.cat(seen).sum(1) == 1).sum()
    assert int(one) == len(method.copy_rows)


def test_three_modalities_missing_resume_fp16_and_accumulation(tmp_path):
    splits, _ = synthetic(3, missing_rate=0.3, num_samples=200)
    cfg = fast_config(trainer={"epochs": 2}, data={"missing_rate": 0.3})
    result = Trainer(splits, make_method("valuation", {"warmup_epochs": 1}), cfg, seed=0, method_name="valuation").fit()
    assert {"copies/audio", "copies/visual", "copies/text"} <= set(result.history[1]["method"])
    check_resume("valuation", {"warmup_epochs": 1}, tmp_path)
    check_resume("valuation", {"warmup_epochs": 1, "level": "modality"}, tmp_path / "m")
    check_fp16("valuation", {"warmup_epochs": 0})
    check_accumulation("valuation", {"warmup_epochs": 1}, epochs=2, weights=False)
