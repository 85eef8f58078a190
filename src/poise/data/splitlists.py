"""The official split lists that the published numbers use, shipped with poise where their source is
public (``poise/data/assets/splits/<dataset>/``, with their source's licence notice in ``NOTICE``), so
that a dataset's raw distribution alone is enough. A list in the dataset's own folder always wins."""

from __future__ import annotations

from pathlib import Path

from poise.errors import DataError

SHIPPED_DIR = Path(__file__).parent / "assets" / "splits"

#: dataset -> the list files it reads (names as in the dataset folder), and where the shipped copy comes from
SHIPPED_LISTS: dict[str, tuple[str, ...]] = {
    "cremad": ("train.csv", "test.csv"),
    "kinetics_sounds": ("my_train.txt", "my_test.txt", "class.txt"),
    "ave": ("Annotations.txt", "trainSet.txt", "valSet.txt", "testSet.txt"),
    "vggsound": ("vggsound.csv",),
    "mvsa": ("train.jsonl", "dev.jsonl", "test.jsonl"),
}


#: shipped files that describe other shipped lists (a class list naming their label indices): read only
#: where the dataset's folder has none of those lists, never beside a user's own lists
DESCRIBES: dict[tuple[str, str], tuple[str, ...]] = {
    ("kinetics_sounds", "class.txt"): ("my_train.txt", "my_test.txt"),
}


def shipped_list(dataset: str, name: str, root: Path | None = None,
                 described: tuple[str, ...] | None = None) -> Path | None:
    """poise's copy of ``name`` for ``dataset``; None where it ships none, or where the file describes lists
    (``described``, by default from ``DESCRIBES``) of which ``root`` holds its own."""
    if described is None:
        described = DESCRIBES.get((dataset, name), ())
    if root is not None and any((root / listed).exists() for listed in described):
        return None
    path = SHIPPED_DIR / dataset / name
    return path if path.is_file() else None


def list_path(root: Path, dataset: str, name: str, what: str | None = None,
              described: tuple[str, ...] | None = None) -> Path:
    """``root/name`` when it exists, else poise's shipped copy (see :func:`shipped_list`), else ``root/name``
    (an optional file stays absent); with ``what``, a missing list is one sentence naming both places."""
    own = root / name
    if own.exists():
        return own
    shipped = shipped_list(dataset, name, root, described)
    if shipped is not None:
        return shipped
    if what is not None:
        raise DataError(f"{what} '{own}' does not exist, and poise ships no '{name}' for {dataset} "
                        f"(see {SHIPPED_DIR / 'NOTICE'} for the lists it ships)")
    return own
