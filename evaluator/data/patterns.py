"""Shard-pattern expansion: bash-style braces as XARES-LLM's YAML uses them (``train_0000{00..19}.tar.gz``).

Supports ``{a,b,c}`` alternatives and ``{N..M}`` integer ranges (zero-padded when either end has a
leading zero, as in ``{000..371}``), several groups per pattern and nesting. A brace with neither a
comma nor a range is kept literally. Globs are not expanded here (see `evaluator.data.cache`).
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_EXPANSION = 1_000_000  # a pattern that would name more shard files than this is surely a typo


def expand_braces(pattern: str) -> list[str]:
    """Expand brace groups in a shard pattern, in order.

    Args:
        pattern: e.g. ``"NSynth/train/train_000{000..371}.tar.gz"``.

    Returns:
        The expanded strings (the pattern itself when it has no brace group).

    Raises:
        ValueError: the expansion would exceed `MAX_EXPANSION` names.
    """
    out = _expand(pattern)
    if len(out) > MAX_EXPANSION:
        raise ValueError(f"pattern {pattern!r} expands to {len(out)} names (more than {MAX_EXPANSION})")
    return out


def _expand(pattern: str) -> list[str]:
    start = 0
    while True:
        open_at = pattern.find("{", start)
        if open_at < 0:
            return [pattern]
        close_at = _matching_close(pattern, open_at)
        if close_at < 0:
            return [pattern]  # unbalanced: literal
        body = pattern[open_at + 1 : close_at]
        alternatives = _alternatives(body)
        if alternatives is None:  # "{}" or "{x}": literal, look further right
            start = open_at + 1
            continue
        prefix, suffix = pattern[:open_at], pattern[close_at + 1 :]
        results: list[str] = []
        for alt in alternatives:
            # prefix has no expandable group left; alt and suffix may (nesting, further groups)
            for tail in _expand(alt + suffix):
                results.append(prefix + tail)
                if len(results) > MAX_EXPANSION:
                    return results
        return results


def _matching_close(s: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _alternatives(body: str) -> list[str] | None:
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        if abs(hi - lo) + 1 > MAX_EXPANSION:
            raise ValueError(f"range {{{body}}} names more than {MAX_EXPANSION} values")
        step = 1 if hi >= lo else -1
        return [str(i).zfill(width) if width else str(i) for i in range(lo, hi + step, step)]
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        cur.append(ch)
    parts.append("".join(cur))
    return parts if len(parts) > 1 else None


def has_glob(pattern: str) -> bool:
    """Whether the pattern has glob characters (``*?[``) left after brace expansion."""
    return any(c in pattern for c in "*?[")
