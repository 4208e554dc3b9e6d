"""Write docs/flags.md from the flag table in kvbook.plan.flags (tests/test_flag_table.py checks it is current)."""

from __future__ import annotations

from pathlib import Path

from kvbook.plan.flags import flags_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "flags.md"
    out.write_text(flags_markdown())
    print(f"wrote {out}")
