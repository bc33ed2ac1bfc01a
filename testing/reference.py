"""The references the light code on the per-connection path is held to: what it
did with the standard library (regular expressions) before it did without."""

from __future__ import annotations

import re


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The reference the globs are held to: what the rules matched with regular
    expressions before `glob_match`. `*` stays within one path component; `**` (a whole
    component) crosses '/', and between slashes it also matches no component at all
    (`a/**/b` matches `a/b`)."""
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        out.append("[^/]*".join(re.escape(p) for p in part.split("*")))
        if not last:
            out.append("/")
    return re.compile("".join(out) + r"\Z")
