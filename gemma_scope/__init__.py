"""gemma_scope: JumpReLU sparse autoencoders on Gemma activations, as in Gemma Scope (arXiv 2408.05147)."""

__version__ = "0.1.0"
