"""Checkpoint formats at the edges: streaming safetensors I/O and Hugging Face checkpoint folders."""
