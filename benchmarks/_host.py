"""The machine a benchmark ran on, for its results file (timings differ between host types)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name(fields: dict[str, str] | None = None) -> str:
    """The CPU model with its family and model numbers (a virtual machine may name only the
    vendor, e.g. "AMD EPYC"), or ``platform.processor()`` where /proc/cpuinfo is unavailable;
    ``fields``: :func:`cpuinfo`'s, when the caller has read them already."""
    fields = cpuinfo() if fields is None else fields
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
