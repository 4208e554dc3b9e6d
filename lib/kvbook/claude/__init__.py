"""Claude Code on the route: which model IDs it sends, and real turns end to end."""
