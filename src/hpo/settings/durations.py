"""Durations as people type them ("10m", "1h30m", "90s") and as hpo prints them ("1h05m", "42s")."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*(h|m|s)")


DURATION_HELP = "a duration such as 90s, 10m, 1h or 1h30m"


def format_duration(seconds: float | None) -> str:
    """ "1h05m", "4m00s", "42s": how a duration is printed everywhere (the inverse of parse_duration)."""
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def parse_duration(text: str) -> float:
    """Seconds in "10m", "1h30m", "90s" or "45" (seconds); raises ValueError naming the problem."""
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d*)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = _DURATION.findall(cleaned)
        if not parts or _DURATION.sub("", cleaned).strip():
            raise ValueError(f"{text!r} is not {DURATION_HELP}")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)
    if not seconds > 0:
        raise ValueError(f"{text!r} is not a positive duration; give {DURATION_HELP}")
    return seconds
