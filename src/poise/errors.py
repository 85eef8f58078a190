"""User-facing errors: each carries one sentence that says what was wrong and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PoiseError(Exception):
    """A problem with the user's input (dataset, method, option, file). The CLI prints it and exits 2."""


class ConfigError(PoiseError):
    """An unknown or invalid configuration key or value."""


class DataError(PoiseError):
    """A dataset file or array that is missing, malformed or inconsistent."""


class IncompatibleError(PoiseError):
    """A combination (method, fusion, modality count) that cannot work, detected at start-up."""


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix naming the closest valid choice, or the list of choices."""
    choices = sorted(set(choices))
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.4)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid: {', '.join(choices)})" if choices else ""


def json_problem(err: Exception) -> str:
    """What is wrong with a JSON file that poise failed to read, in words: not JSON (where), a missing
    field (which), or a field of the wrong kind."""
    import json

    if isinstance(err, json.JSONDecodeError):
        return f"it is not JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    if isinstance(err, KeyError):
        return f"it has no '{err.args[0]}' field"
    return f"its content is not laid out as poise writes it ({err})"
