"""Load against a running server: Claude-Code-shaped sessions, concurrency sweeps, cache accounting."""
