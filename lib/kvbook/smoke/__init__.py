"""Checks against a running route: the smoke suite, recorded sessions and load generation."""
