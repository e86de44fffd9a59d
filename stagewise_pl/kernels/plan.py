"""The chunk plan of the fused log-prob kernels (:mod:`stagewise_pl.kernels.linear_logprob`): how many tokens a
chunk holds, how many vocabulary rows a block, and in which dtype the matrix products run -- the CPU plan the CPU
benchmarks chose, and the device-aware one (:func:`device_plan`, a pure function: unit-tested without a GPU)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_BUDGET_BYTES = 128 * 2**20  # one chunk's logits block, in float32
MIN_CHUNK_TOKENS = 16
TILE_VOCAB, TILE_ELEMENTS = 4096, 4 * 2**20


@dataclass(frozen=True)
class Plan:
    chunk_tokens: int
    vocab_block: int
    # None: products in the accumulation dtype (inputs upcast); bfloat16/float16: products in that dtype with
    # float32 accumulation and results (tensor cores on CUDA)
    matmul_dtype: Optional[torch.dtype] = None
    # None: the fused losses' weight gradient is accumulated over chunks in float32 (and copied to the weight's
    # dtype at the end); bfloat16 (with bfloat16 products only): accumulated in bfloat16, each chunk's product
    # (float32 inside the matrix product) rounded once as it is added -- half the memory and no copy
    grad_w_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.grad_w_dtype is not None and not self.grad_w_dtype == self.matmul_dtype == torch.bfloat16:
            raise ValueError(f"grad_w_dtype={self.grad_w_dtype} needs bfloat16 products (matmul_dtype=torch.bfloat16; "
                             f"got {self.matmul_dtype}): float16 sums would lose small gradients")


def plan(n_tokens: int, vocab: int, hidden: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_BUDGET_BYTES,
         chunk_tokens: Optional[int] = None, vocab_block: Optional[int] = None, single_pass: bool = False) -> Plan:
    """Chunk and block sizes.

    ``single_pass`` (the fused losses): the whole vocabulary in one block, so the gradient comes
    from the logits block of the forward pass (3 matrix products); chunks sized so that the float32
    block stays within ``budget_bytes``. Otherwise (log-probs, recompute in backward): tiles of
    about 1 024 tokens x 4 096 vocabulary rows, which measured ~25% faster than whole-vocabulary
    chunks on a 2-core CPU (the 16 MB tile stays in cache between the product and the statistics).
    """
    if vocab_block is None:
        if single_pass:
            fits = MIN_CHUNK_TOKENS * vocab * 4 <= budget_bytes
            vocab_block = vocab if fits else budget_bytes // (4 * MIN_CHUNK_TOKENS)
        else:
            vocab_block = min(vocab, TILE_VOCAB)
        if dtype in (torch.bfloat16, torch.float16):  # the float32 copy of a weight block counts too
            vocab_block = min(vocab_block, max(256, budget_bytes // (4 * hidden)))
    vocab_block = max(1, min(vocab_block, vocab))
    if chunk_tokens is None:
        chunk_tokens = max(MIN_CHUNK_TOKENS,
                           budget_bytes // (4 * vocab_block) if single_pass else TILE_ELEMENTS // vocab_block)
    return Plan(max(1, min(chunk_tokens, n_tokens)), vocab_block)


# The CUDA plan. Measured on one H200 (docs/PERFORMANCE.md, N=16384, V=151936, bf16): the naive path (logits
# in the input dtype, their float32 copy, log_softmax, backward) held 27.82 GiB beyond its inputs, 12 bytes per
# logit; the goal is at most one eighth of that.
NAIVE_BYTES_PER_LOGIT_EXTRA = 10  # beyond the logit itself in the input dtype: 2 + 10 = the measured 12
MEMORY_GOAL_FRACTION = 1 / 8
CUDA_CHUNK_ALIGN = 256  # tokens: whole tensor-core tiles
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _size(dtype: Optional[torch.dtype]) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype is not None else 0


def naive_extra_bytes(n_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Peak memory of the naive path beyond its inputs, modelled on the H200 measurement."""
    return n_tokens * vocab * (_size(dtype) + NAIVE_BYTES_PER_LOGIT_EXTRA)


def plan_extra_bytes(chunk_plan: Plan, n_tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    """Peak memory of the fused loss beyond its inputs under ``chunk_plan`` (a model, not a measurement): the
    float32 gradient of hidden, the weight gradient (float32, or bfloat16 with ``grad_w_dtype``) and its copy in
    the input dtype when that differs, and per chunk the float32 logits block, one float32 temporary of its size
    and its copy in the matrix products' dtype."""
    grad_w = _size(chunk_plan.grad_w_dtype) or 4
    fixed = n_tokens * hidden * 4 + vocab * hidden * (grad_w + (_size(dtype) if _size(dtype) != grad_w else 0))
    return fixed + chunk_plan.chunk_tokens * chunk_plan.vocab_block * (8 + _size(chunk_plan.matmul_dtype))


def device_plan(device_type: str, dtype: torch.dtype, n_tokens: int, hidden: int, vocab: int,
                free_bytes: Optional[int] = None, single_pass: bool = True) -> Plan:
    """The chunk plan for a device: a pure function of (device kind, dtype, N, H, V, free memory).

    CPU (and anything but CUDA): :func:`plan`, what the CPU benchmarks chose. CUDA: the whole vocabulary per
    chunk (one block: no online merge, and the fused losses take their gradient from the forward's block),
    matrix products in the input dtype when it is bfloat16/float16 (float32 accumulation), and chunks as
    large as the memory goal allows -- one eighth of the naive path's extra memory, at most half the free device
    memory -- so that the fewest products are launched; chunks are multiples of 256 tokens, at least 256 (or
    N). With bfloat16 inputs, when the float32 weight gradient (and its bfloat16 copy) would leave no room for one
    aligned chunk within the goal (small N with a large vocabulary), the weight gradient is accumulated in
    bfloat16 instead (``Plan.grad_w_dtype``, as Liger's fused linear cross-entropy does). Where even that leaves
    no room, chunks stay at the minimum.
    """
    if device_type != "cuda":
        return plan(n_tokens, vocab, hidden, dtype, single_pass=single_pass)
    matmul_dtype = dtype if dtype in LOW_PRECISION else None
    room = int(naive_extra_bytes(n_tokens, vocab, dtype) * MEMORY_GOAL_FRACTION)
    if free_bytes is not None:
        room = min(room, free_bytes // 2)
    grad_w_dtype = None
    smallest = Plan(min(CUDA_CHUNK_ALIGN, n_tokens), vocab, matmul_dtype)
    if dtype == torch.bfloat16 and plan_extra_bytes(smallest, n_tokens, hidden, vocab, dtype) > room:
        grad_w_dtype = torch.bfloat16
    fixed = plan_extra_bytes(Plan(0, vocab, matmul_dtype, grad_w_dtype), n_tokens, hidden, vocab, dtype)
    per_token = plan_extra_bytes(Plan(1, vocab, matmul_dtype, grad_w_dtype), n_tokens, hidden, vocab, dtype) - fixed
    chunk = max(CUDA_CHUNK_ALIGN, (room - fixed) // per_token // CUDA_CHUNK_ALIGN * CUDA_CHUNK_ALIGN)
    return Plan(min(chunk, n_tokens), vocab, matmul_dtype, grad_w_dtype)
