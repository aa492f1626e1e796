"""lora-mux: one resident base model serving many LoRA adapters in mixed batches."""

__version__ = "0.1.0"  # as pyproject.toml's
