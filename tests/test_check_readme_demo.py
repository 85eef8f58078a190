"""scripts/check_readme_demo.py: the README's demo table against a fresh demo's results."""

import importlib.util
import json
from pathlib import Path

from poise.eval.report import summary_table

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_readme_demo", ROOT / "scripts" / "check_readme_demo.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def _results():
    def run(method, seed, acc, seconds):
        return {"method": method, "seed": seed, "train_seconds": seconds,
                "test": {"accuracy": acc, "macro_f1": acc, "unimodal_accuracy": {"a": acc / 2},
                         "probe_accuracy": {"a": acc / 3}}}
    return {"dataset": "d", "runs": [run("joint", 0, 0.9, 1.0), run("joint", 1, 0.8, 2.0), run("ogm", 0, 0.7, 3.0)]}


def _readme(tmp_path, table):
    path = tmp_path / "README.md"
    path.write_text(f"# x\n\ntext\n\n{check.START}\n{table}\n{check.END}\n\nmore text\n")
    return path


def test_equal_tables_pass_and_wall_clock_seconds_are_ignored(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results()))
    table = summary_table(_results()).replace("| 1.5 |", "| 9.9 |").replace("| 2.00× |", "| 3.00× |")
    assert "| 9.9 |" in table and "| 3.00× |" in table
    assert check.main([str(results), "--readme", str(_readme(tmp_path, table))]) == 0


def test_a_changed_cell_is_named_and_write_repairs_it(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results()))
    fresh = summary_table(_results())
    stale = fresh.replace("| 70.00 |", "| 71.00 |", 1)
    assert stale != fresh
    readme = _readme(tmp_path, stale)
    assert check.main([str(results), "--readme", str(readme)]) == 1
    assert "ogm / accuracy: README 71.00, fresh 70.00" in capsys.readouterr().out
    assert check.main([str(results), "--readme", str(readme), "--write"]) == 0
    text = readme.read_text()
    assert fresh in text and text.startswith("# x\n\ntext\n") and text.endswith("more text\n")
    assert check.main([str(results), "--readme", str(readme)]) == 0


def test_a_missing_row_or_missing_markers_fail(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results()))
    fresh = summary_table(_results())
    readme = _readme(tmp_path, "\n".join(fresh.splitlines()[:-1]))
    assert check.main([str(results), "--readme", str(readme)]) == 1
    assert "rows differ" in capsys.readouterr().out
    readme.write_text(fresh)
    assert check.main([str(results), "--readme", str(readme)]) == 2


def test_the_readme_has_the_markers_and_the_make_target_runs_the_demo_command():
    text = (ROOT / "README.md").read_text()
    start, end = check.readme_table(text)
    assert check.cells(text[start:end])[0][0] == "method"
    makefile = (ROOT / "Makefile").read_text()
    assert "check-demo:" in makefile and "scripts/check_readme_demo.py" in makefile


def test_rows_are_grouped_by_family_under_a_row_naming_it_with_their_time_against_joint():
    def run(method, seconds):
        return {"method": method, "seed": 0, "train_seconds": seconds,
                "test": {"accuracy": 0.5, "macro_f1": 0.5, "unimodal_accuracy": {}, "probe_accuracy": {}}}
    results = {"dataset": "d", "runs": [run("pmr", 3.0), run("ogm", 2.0), run("joint", 4.0), run("mmpareto", 6.0),
                                        run("ogm_ge+modality_dropout", 5.0), run("joint[model.fusion=mfb]", 1.0)]}
    rows = check.cells(summary_table(results))
    header = rows[0]
    assert header[-2:] == ["train s", "time vs joint"]
    assert [r[0] for r in rows[1:]] == ["**baseline**", "joint", "joint[model.fusion=mfb]", "**gradients**", "ogm",
                                        "mmpareto", "**losses**", "pmr", "**gradients + features**",
                                        "ogm_ge+modality_dropout"]
    ratio = {r[0]: r[-1] for r in rows[1:]}
    assert ratio == {"**baseline**": "", "joint": "1.00×", "joint[model.fusion=mfb]": "0.25×", "**gradients**": "",
                     "ogm": "0.50×", "mmpareto": "1.50×", "**losses**": "", "pmr": "0.75×",
                     "**gradients + features**": "", "ogm_ge+modality_dropout": "1.25×"}
    assert all(len(r) == len(header) for r in rows)
    without_joint = {"dataset": "d", "runs": [run("pmr", 3.0), run("pmr", 2.0)]}
    rows = check.cells(summary_table(without_joint))
    assert [r[0] for r in rows[1:]] == ["pmr"] and rows[1][-1] == "-"  # one family: no row naming it


def test_modulate_rows_sit_in_the_family_of_their_actuator():
    from poise.eval.report import family_of
    from poise.methods import make_method

    def run(actuator):
        options = {} if actuator is None else {"modulate": {"actuator": actuator}}
        return {"method": "modulate", "config": {"method": options}}

    assert family_of("modulate", [run(None)]) == "gradients"  # the default actuator, grad
    assert family_of("modulate[method.modulate.actuator=loss_weight]", [run("loss_weight")]) == "losses"
    assert family_of("modulate[method.modulate.actuator=feature_drop]", [run("feature_drop")]) == "features"
    assert family_of("ogm_ge", [run("loss_weight")]) == "gradients"  # ogm_ge's actuator is fixed
    assert family_of("modulate+modality_dropout[method.modulate.actuator=lr]",
                     [run("lr")]) == "gradients + features"
    assert make_method("modulate", {"actuator": "loss_weight"}).family == "losses"
    assert make_method("modulate", {"actuator": "feature_drop"}).family == "features"
    assert make_method("ogm").family == "gradients"
