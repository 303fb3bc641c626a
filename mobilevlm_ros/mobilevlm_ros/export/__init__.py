"""Built artifacts: GGUF conversion and quantization of the LLM, engines, and the cache that keys them to their inputs."""
