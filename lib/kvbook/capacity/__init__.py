"""How fast and how many: the prefill/decode speed model fitted from llama-bench, and what it predicts for a turn."""
