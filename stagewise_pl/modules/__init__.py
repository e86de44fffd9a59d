"""LightningModules of the stages, sharing one policy."""
from stagewise_pl.modules.sft import SFTModule, cosine_with_warmup

__all__ = ["SFTModule", "cosine_with_warmup"]
