"""The memory rules of the pinned llama-server: caches, compute, the vectorised sweep, the decode roofline."""
