"""What a run leaves behind: results.jsonl (one writer, one reader) and the statistics over it."""
