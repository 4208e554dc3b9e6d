"""Processes at the edge: llama-server, LiteLLM, llama-fit-params, the build, components and log parsing."""
