"""Frugal: pretraining of efficient LLM architectures on megatron-core + DeepSpeed."""
