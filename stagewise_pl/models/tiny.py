"""The tiny model: Qwen2 architecture, random init, tokenizer trained locally. No download anywhere.

The tokenizer is a byte-level BPE trained with Qwen2's own pre-tokenizer pipeline (NFC, Qwen2's
split regex that isolates every digit, then ByteLevel without its own regex), so that
``AutoTokenizer`` -- which re-applies Qwen2's pipeline for ``model_type=qwen2``, and which vLLM
uses -- gives the same ids as the raw tokenizer. Prompts go through a ChatML template.
Both are written with ``save_pretrained`` and read back through the same ``from_pretrained`` path
a hub model takes.
"""
from __future__ import annotations

from pathlib import Path

import torch

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Text the BPE merges are learned from besides the task's own: the words of prompts and answers.
_GENERIC_TEXT = (
    "The answer is {n}. Let us compute step by step. First, then, so, therefore the result is {n}. "
    "Solve the problem. What is the value of x? Find the sum, the product and the difference. "
    "#### {n}\n\\boxed{{{n}}} \\frac{{1}}{{2}} user assistant system"
)


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A Qwen2-compatible byte-level BPE tokenizer (transformers object) trained on ``corpus``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf = Qwen2Tokenizer(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        unk_token=None)
    hf.chat_template = CHATML_TEMPLATE
    return hf


def tokenizer_corpus(task) -> list[str]:
    """Chat-formatted task text plus a little generic text, so merges cover what prompts contain."""
    corpus = []
    for p in task.split("train")[::7]:
        corpus.append(f"<|im_start|>user\n{p.prompt}<|im_end|>\n"
                      f"<|im_start|>assistant\n{p.teacher_traces[0]}<|im_end|>\n")
        corpus.append(p.solution or "")
    corpus += [_GENERIC_TEXT.format(n=n) for n in range(50)]
    return corpus


def build_tiny_model(tiny_cfg, vocab_size: int, eos_token_id: int, pad_token_id: int, seed: int = 0):
    """A random-init Qwen2ForCausalLM of the configured shape (tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=tiny_cfg.hidden_size, num_hidden_layers=tiny_cfg.num_layers,
        num_attention_heads=tiny_cfg.num_heads, num_key_value_heads=tiny_cfg.num_kv_heads,
        intermediate_size=tiny_cfg.intermediate_size, max_position_embeddings=tiny_cfg.max_position_embeddings,
        initializer_range=tiny_cfg.initializer_range, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.bos_token_id = None
    return model


def save_random_tiny(directory: Path, tiny_cfg, task, seed: int = 0) -> Path:
    """Train the tokenizer, build the random model, save both with save_pretrained."""
    tokenizer = train_tokenizer(tokenizer_corpus(task), tiny_cfg.vocab_size)
    model = build_tiny_model(tiny_cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
