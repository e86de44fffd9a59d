"""stagewise_pl: difficulty-aware SFT-then-RL post-training of small language models on Lightning."""

__version__ = "0.1.0"
