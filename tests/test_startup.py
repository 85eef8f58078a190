"""Start-up: the CLI imports its heavy dependencies where they are used, and `poise list` shows every option."""

import json
import subprocess
import sys

from poise.cli import main

HEAVY = ("torchmetrics", "sklearn", "matplotlib", "tensorboard", "torch.utils.tensorboard", "transformers", "scipy")


def test_list_and_a_typo_import_nothing_heavy(tmp_path):
    code = (
        "import sys, json\n"
        "from poise.cli import main\n"
        "main(['list'])\n"
        f"main(['train', '--dataset', 'avdigits', '--method', 'ogmge', '--out', {str(tmp_path / 'x')!r}])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "unknown method 'ogmge' (did you mean 'ogm_ge'?)" in out.stderr


def test_list_shows_every_dataset_and_method_option_with_its_default(capsys):
    from poise.config import option_rows
    from poise.data.registry import DATASETS
    from poise.methods.registry import METHODS

    assert main(["list"]) == 0
    text = capsys.readouterr().out
    sections, current = {}, None
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            current = sections.setdefault(line.split()[0], [])
        elif line.startswith("    ") and current is not None:
            current.append(line)
    for name, kind in DATASETS.items():
        lines = sections[f"{name}{':PATH' if kind.needs_arg else ''}"]
        for key, default, _ in option_rows(kind.Options):
            assert any(line.startswith(f"    {key} = {default!r}") for line in lines), (name, key)
    for name, cls in METHODS.items():
        if name != "unimodal":
            for key, default, _ in option_rows(cls.Params):
                assert any(line.startswith(f"    {key} = {default!r}") for line in sections[name]), (name, key)
    assert "    lambda = 1.0" in text  # an option written through its alias
    assert "trainer.threads = 1" in text
