"""Where a model's architecture comes from: GGUF headers, llama.cpp's loader rules, model sources."""
