"""For tests, benchmarks and tools only: synthetic GGUFs, fuzzing generators, predicted-vs-measured runs."""
