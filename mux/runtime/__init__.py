"""Process-wide CPU runtime helpers (OpenMP threads, the allocator, measured kernel picks) that the engine, the LoRA
layers and the model code may all use; nothing here imports from them."""
