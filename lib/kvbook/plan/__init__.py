"""From a command line to a verdict: the flag parser, device budgets, the planner and its one summary."""
