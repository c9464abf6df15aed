"""KV-cache generation."""

from jaxtrain.inference.generate import Generation, Sampling, generate, pad_prompts, sample_logits, warp_logits

__all__ = ["Generation", "Sampling", "generate", "pad_prompts", "sample_logits", "warp_logits"]
