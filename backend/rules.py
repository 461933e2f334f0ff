"""Grouping rules as text (``COSOD_GROUP_BY``, extra params' ``group_by``): their forms and their check.

What each rule means is :mod:`backend.grouping`'s; this module only validates and normalises the text, so
that :mod:`backend.settings` can check the setting without importing the grouping code.
"""

from __future__ import annotations

import regex

__all__ = ["GROUP_BY_FORMS", "MAX_GROUP_REGEX_CHARS", "parse_group_by"]

GROUP_BY_FORMS = (
    "must be 'auto', 'project', 'field:<name>', 'filename:<regex with a capture group>' or "
    "'similar[:<threshold in (0, 1)>]'"
)
MAX_GROUP_REGEX_CHARS = 200


def parse_group_by(value: str) -> str:
    """Validate a grouping rule: ``auto``, ``project`` or ``field:<name>``; returns it normalised."""
    v = (value or "").strip()
    if v.lower() in ("", "auto"):
        return "auto"
    if v.lower() == "project":
        return "project"
    if v.lower().startswith("field:") and v[6:].strip():
        return "field:" + v[6:].strip()
    if v.lower().startswith("filename:"):
        return "filename:" + _group_regex(v[len("filename:") :], value)
    if v.lower() == "similar":
        return "similar"
    if v.lower().startswith("similar:"):
        try:
            t = float(v[len("similar:") :])
        except ValueError:
            t = float("nan")
        if not 0.0 < t < 1.0:
            raise ValueError(
                f"group_by 'similar:<threshold>' needs a cosine threshold in (0, 1), got {value!r}"
            )
        return f"similar:{t!r}"  # repr: parsed again, it gives the same float
    raise ValueError(f"group_by {GROUP_BY_FORMS}, got {value!r}")


def _group_regex(pattern: str, value: str) -> str:
    """A ``filename:`` rule's regex, checked: it compiles, has a capture group and is at most
    ``MAX_GROUP_REGEX_CHARS`` long (the file names it runs on are cut at 1024 characters)."""
    if not pattern:
        raise ValueError(f"group_by filename:<regex> needs a regex, got {value!r}")
    if len(pattern) > MAX_GROUP_REGEX_CHARS:
        raise ValueError(
            f"group_by filename:<regex> needs at most {MAX_GROUP_REGEX_CHARS} characters, got {value!r}"
        )
    try:
        compiled = regex.compile(pattern)
    except (regex.error, ValueError) as exc:
        raise ValueError(
            f"group_by filename:<regex> needs a regex that compiles ({exc}), got {value!r}"
        ) from None
    if compiled.groups < 1:
        raise ValueError(
            "group_by filename:<regex> needs a capture group, the group's name (e.g. 'filename:^(.+)_\\d+'), "
            f"got {value!r}"
        )
    return pattern
