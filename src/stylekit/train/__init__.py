"""Few-step LoRA training (`stylekit distill`): STD and ADD on one accelerate loop (docs/distillation.md)."""
