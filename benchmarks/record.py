"""Run a benchmark and record what it printed in benchmarks/RESULTS.md, so the file is only
ever written by the scripts: one section per benchmark script, replaced on each run, with
the machine, the date and the exact command.

    python benchmarks/record.py benchmarks/generation.py --n 4
    python benchmarks/record.py benchmarks/quality.py --data ../shared/data/fpb --labeled 64
    python benchmarks/record.py --section "quality.py, ablations" benchmarks/quality.py ...

The section is named after the script, or --section NAME when one script has several.
Lines of the output that are Markdown images (``![...](...)``) go under the code block.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("# Benchmark results\n\nWritten by `benchmarks/record.py` from what each script "
          "printed; never edited by hand. Each section says where and how it was measured.\n")


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_version = torch.__version__
    except ImportError:
        gpu, torch_version = "no GPU", "not installed"
    memory = ""
    if Path("/proc/meminfo").exists():
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {kb / 2**20:.0f} GiB"
    return (f"{platform.machine()}, {cores} cores{memory}, {gpu}; Python "
            f"{platform.python_version()}, torch {torch_version}")


def main(argv: list[str]) -> int:
    section_name = None
    if argv[:1] == ["--section"]:
        section_name, argv = argv[1], argv[2:]
    if not argv:
        print(__doc__)
        return 2
    script = Path(argv[0]).name
    section_name = section_name or script
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = []
    with subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:  # pass it on as it comes: a killed run still showed its rows
            print(line, end="", flush=True)
            lines.append(line)
    output = "".join(lines).rstrip()
    if child.returncode != 0:
        print(f"record: {script} failed ({child.returncode}); RESULTS.md left as it was",
              file=sys.stderr)
        return child.returncode
    command = " ".join(["python", *argv])
    images = [line for line in output.splitlines() if line.startswith("![")]
    output = "\n".join(line for line in output.splitlines() if not line.startswith("!["))
    section = (f"## {section_name}\n\n- command: `{command}`\n- machine: {machine()}\n"
               f"- date: {started}\n\n```\n{output}\n```\n"
               + "".join(f"\n{image}\n" for image in images))
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(section_name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
