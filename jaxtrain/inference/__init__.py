"""KV-cache generation."""

from jaxtrain.inference.generate import (
    Generation, Sampling, generate, pad_prompts, penalize_repeats, sample_logits, warp_logits,
)

__all__ = ["Generation", "Sampling", "generate", "pad_prompts", "penalize_repeats", "sample_logits", "warp_logits"]
