"""Generation engines (transformers in-process, a vLLM server, a remote OpenAI-compatible API)
behind one interface (`base`); `factory.open_engine` picks one."""
