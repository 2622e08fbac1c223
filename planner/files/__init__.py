"""Readers of model files (safetensors headers, model folders), shared by inventory and executor."""
