"""Regenerate lib/kvbook/data/llama_server_flags.json from `llama-server --help`.

Run when the pinned llama.cpp build changes:
    .venv/bin/python tools/gen_server_flags.py "$(.venv/bin/kvbook doctor --path llama-server)"
The table lists every flag spelling and whether it takes a value; kvbook.plan.flags uses it to
accept flags that do not change memory and to reject spellings llama-server does not know.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

FLAG_COLUMN = 40


ENV = re.compile(r"\(env: (LLAMA_ARG_\w+|\w+)\)")


def parse_help(text: str) -> list[dict]:
    """Return one entry per option line: its spellings, whether it takes a value, and the environment
    variable that sets it (llama-server reads LLAMA_ARG_* before the command line, which wins)."""
    entries = []
    for line in text.splitlines():
        env = ENV.search(line)
        if env and entries and not line.startswith("-"):
            entries[-1]["env"] = env.group(1)
        if not line.startswith("-") or line.startswith("-----"):
            continue
        head = line[:FLAG_COLUMN].rstrip()
        if len(line) > FLAG_COLUMN and line[FLAG_COLUMN - 1] != " ":
            # the spellings overflow the column: they end at the next run of two spaces
            gap = re.search(r"\s{2,}", line[FLAG_COLUMN:])
            head = line[: FLAG_COLUMN + gap.start()] if gap else line
        names: list[str] = []
        takes_value = False
        for part in [p.strip() for p in head.split(",")]:
            if not part:
                continue
            tokens = part.split()
            if tokens and tokens[0].startswith("-"):
                names.append(tokens[0])
                if len(tokens) > 1:
                    takes_value = True
            else:
                takes_value = True
        if names:
            entries.append({"names": names, "takes_value": takes_value})
            if env:
                entries[-1]["env"] = env.group(1)
    return entries


def main() -> int:
    binary = sys.argv[1] if len(sys.argv) > 1 else "llama-server"
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout
    entries = parse_help(text)
    if len(entries) < 100:
        print(f"gen_server_flags: only {len(entries)} options parsed from {binary} --help", file=sys.stderr)
        return 1
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    out = Path(__file__).resolve().parents[1] / "lib" / "kvbook" / "data" / "llama_server_flags.json"
    payload = {"generated_from": (version.stdout + version.stderr).strip().splitlines()[0:1], "options": entries}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {len(entries)} options to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
