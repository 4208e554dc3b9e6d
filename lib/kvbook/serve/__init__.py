"""`kvbook serve`: the planned stack run in the foreground for daily use, wired for Claude Code (above ops and claude)."""
