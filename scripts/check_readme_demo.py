"""Check that the README's demo table is what a fresh ``make demo`` gives, or rewrite it from one.

    make check-demo                                                  # a fresh demo, then this check
    .venv/bin/python scripts/check_readme_demo.py runs/demo/results.json           # check
    .venv/bin/python scripts/check_readme_demo.py runs/demo/results.json --print   # the table in README form
    .venv/bin/python scripts/check_readme_demo.py runs/demo/results.json --write   # rewrite the README's table

The table lies between the ``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->`` lines of the
README. Every cell is compared exactly as the report formats it (the rows of each family under the row
naming it), except the wall-clock ``train s`` and ``time vs joint`` columns (they depend on the machine
and on what else runs beside the demo). Exit status: 0 when the tables agree,
1 when they differ (each difference is printed), 2 when a file or the markers are missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
#: columns that measure the machine, not the code
IGNORED_COLUMNS = ("train s", "time vs joint")
README = Path(__file__).resolve().parents[1] / "README.md"


def fresh_table(results_path: Path) -> str:
    from poise.eval.report import summary_table

    return summary_table(json.loads(results_path.read_text()))


def readme_table(text: str) -> tuple[int, int]:
    """The character span of the table between the markers."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the README must hold one '{START}' line and one '{END}' line after it")
    return text.index(START) + len(START), text.index(END)


def cells(table: str) -> list[list[str]]:
    rows = [line.strip() for line in table.strip().splitlines() if line.strip().startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows if not set(row) <= set("|-: ")]


def differences(readme: str, fresh: str) -> list[str]:
    """One line per difference between the two tables, ignoring the columns in ``IGNORED_COLUMNS``."""
    old, new = cells(readme), cells(fresh)
    if not old or not new:
        return ["the README's demo table is empty" if not old else "the fresh results hold no runs"]
    if old[0] != new[0]:
        return [f"columns differ: README {old[0]}, fresh {new[0]}"]
    header, out = new[0], []
    old_rows, new_rows = {r[0]: r for r in old[1:]}, {r[0]: r for r in new[1:]}
    if list(old_rows) != list(new_rows):
        out.append(f"rows differ: README {list(old_rows)}, fresh {list(new_rows)}")
    for name in (n for n in new_rows if n in old_rows):
        for column, a, b in zip(header, old_rows[name], new_rows[name]):
            if column not in IGNORED_COLUMNS and a != b:
                out.append(f"{name} / {column}: README {a}, fresh {b}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json of a fresh make demo (runs/demo/results.json)")
    parser.add_argument("--readme", default=str(README))
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print", action="store_true", help="print the fresh table in README form")
    action.add_argument("--write", action="store_true", help="replace the README's table with the fresh one")
    args = parser.parse_args(argv)
    results, readme = Path(args.results), Path(args.readme)
    for path in (results, readme):
        if not path.is_file():
            print(f"check_readme_demo: '{path}' does not exist", file=sys.stderr)
            return 2
    table = fresh_table(results)
    if args.print:
        print(table)
        return 0
    text = readme.read_text()
    try:
        start, end = readme_table(text)
    except ValueError as err:
        print(f"check_readme_demo: {readme}: {err}", file=sys.stderr)
        return 2
    if args.write:
        readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        print(f"rewrote the demo table of {readme} from {results}")
        return 0
    found = differences(text[start:end], table)
    if found:
        print(f"the demo table of {readme} is not what {results} gives ({len(found)} differences; "
              f"'{Path(sys.argv[0]).name} {results} --write' rewrites it):")
        print("\n".join(f"  {line}" for line in found))
        return 1
    print(f"the demo table of {readme} is what {results} gives (every cell but {', '.join(IGNORED_COLUMNS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
