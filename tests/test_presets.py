"""The field methods' shipped presets: the Kinetics-Sounds ones carry the released scripts' settings (the
same as their CREMA-D twins where the released defaults do not depend on the dataset), and every one
quotes its published numbers with the paper's and BalanceBenchmark's kept apart."""

import pytest

from poise.config import PRESET_DIR, load_config_file

#: Kinetics-Sounds preset -> its CREMA-D twin with the same released training setting and options
TWINS = {"ks_pmr": "cremad_pmr", "ks_inforeg": "cremad_inforeg", "ks_valuation": "cremad_valuation",
         "ks_mmpareto": "cremad_mmpareto", "ks_relearning": "cremad_relearning"}
FIELD_PRESETS = ["cremad_mmpareto", "cremad_agm", "cremad_pmr", "cremad_reconboost", "cremad_relearning",
                 "cremad_inforeg", "cremad_valuation", "cremad_mmcosine", *TWINS]


@pytest.mark.parametrize("ks,cremad", TWINS.items())
def test_a_kinetics_sounds_preset_trains_as_its_released_script(ks, cremad):
    mine, twin = load_config_file(ks), load_config_file(cremad)
    assert mine["trainer"] == twin["trainer"] and mine["method"] == twin["method"]
    assert mine["model"]["encoders"] == {"audio": "resnet18", "visual": "resnet18"}


def test_the_released_schedules_and_frames():
    pmr = load_config_file("ks_pmr")
    assert (pmr["trainer"]["lr"], pmr["trainer"]["scheduler"], pmr["trainer"]["step_size"], pmr["trainer"]["epochs"]) \
        == (0.0001, "step", 70, 150)
    assert pmr["dataset"] == {"frames": 1} and load_config_file("ks_inforeg")["dataset"] == {"frames": 3}
    assert load_config_file("ks_mmpareto")["trainer"].get("scheduler", "none") == "none"  # never stepped


@pytest.mark.parametrize("name", FIELD_PRESETS)
def test_a_field_preset_quotes_the_paper_and_balancebenchmark_apart(name):
    header = [line for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    text = " ".join(header)
    assert "paper" in text.lower() and "BalanceBenchmark" in text
