"""Building blocks: attention (ALiBi, masks), LayerNorm, feed-forward, Linear, embeddings, dropout."""
