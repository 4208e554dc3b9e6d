"""kvbook: plan, launch and check llama-server behind LiteLLM."""

__version__ = "0.1.0"
