"""lora-mux: one resident base model serving many LoRA adapters in mixed batches."""
