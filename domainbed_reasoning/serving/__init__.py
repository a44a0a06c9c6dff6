"""vLLM's OpenAI-compatible server, started from its own environment (.venv-vllm)."""
