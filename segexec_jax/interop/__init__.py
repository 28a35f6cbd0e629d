"""Other formats: Hugging Face Llama-family checkpoints (import and export), safetensors
and GGUF, read and written one tensor at a time."""
