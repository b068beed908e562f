"""What every benchmark shares: peak memory, the machine's name, the table, RESULTS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

# Trial runs can write elsewhere: BENCHMARK_RESULTS=/tmp/trial.md python -m benchmarks.extract
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS", Path(__file__).with_name("RESULTS.md")))
REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM).

    Not `ru_maxrss`: Linux carries that over from the process that forked this one, so every
    variant would read at least the benchmark driver's own size. Forked DataLoader workers
    share most of their pages with this process and are not added.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def machine() -> str:
    """A plain description: the GPU if one is used, else the CPU and its core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()}-core {cpu} CPU"
    if torch.cuda.is_available():
        text = f"one {torch.cuda.get_device_name(0)} GPU, {text}"
    return f"{text}, torch {torch.__version__}"


def run_variant(module: str, args: list[str]) -> dict:
    """Run one side of a comparison in a fresh process (clean memory peaks); return its JSON."""
    process = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True
    )
    if process.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]
    ]
    return "\n".join(lines)


def fmt(value) -> str:
    if isinstance(value, float):
        return (
            f"{value:,.3g}"
            if abs(value) < 10
            else f"{value:,.0f}"
            if abs(value) >= 1000
            else f"{value:.1f}"
        )
    return str(value)


def publish(title: str, header: list[str], rows: list[list], notes: str = "") -> None:
    """Print the table and append it, with the machine and the date, to RESULTS.md."""
    text = table(title, header, rows)
    stamp = f"{datetime.date.today().isoformat()}, {machine()}"
    block = f"{text}\n\n{stamp}." + (f" {notes}" if notes else "") + "\n"
    print(block)
    with RESULTS.open("a") as stream:
        stream.write("\n" + block)
