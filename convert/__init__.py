"""Hugging Face MoE checkpoint -> MWQ nested-bit expert store."""
