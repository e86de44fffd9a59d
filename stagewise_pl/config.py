"""Structured configuration: YAML files in conf/ merged onto typed dataclasses, grouped by concern.

``load_config("default", ["optim.lr=1e-3"])`` reads conf/default.yaml, merges it onto :class:`Config`,
applies the dotted overrides and checks every value. An unknown key, a wrong type, a missing file or
a bad value raises :class:`ConfigError` naming the key and where it came from (the YAML file or the
command line) before any work starts.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


def doc(default: Any = MISSING, help: str = "", factory: Any = None) -> Any:
    """A dataclass field with a help text that ``--help`` prints."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Where a run writes, how it is seeded and logged, and whether it resumes."""

    dir: str = doc("", "run directory; empty = runs/<conf>-<timestamp>")
    seed: int = doc(0, "seeds python, numpy and torch (Lightning's seed_everything)")
    resume: str = doc("", "'' = fresh run; 'last' = continue run.dir from its last checkpoint (an error when it has "
                          "none); 'restart' = start run.dir over (a run stopped before its first checkpoint); or a "
                          ".ckpt path")
    logger: str = doc("csv", "csv | tensorboard | wandb (wandb runs offline unless WANDB_MODE says otherwise)")
    threads: int = doc(0, "torch intra-op threads; 0 = torch's default")
    deterministic: bool = doc(False, "torch deterministic algorithms (Trainer(deterministic=True))")
    progress_bar: bool = doc(True, "show progress bars for training, generation and evaluation")
    force: bool = doc(False, "resume even though the plan, the configuration or the training data changed "
                             "since the run started (the difference is printed)")
    checkpoint_fallback: bool = doc(False, "resume=last with a corrupt last.ckpt resumes from previous.ckpt with a "
                                           "warning (default: stop with an error naming the file)")
    requeue: bool = doc(True, "under Slurm (SLURM_JOB_ID set), a run stopped by SIGUSR1 or SIGTERM checkpoints and "
                              "asks scontrol to requeue its job; elsewhere it checkpoints and exits")


@dataclass
class TinyModelConfig:
    """The built-in tiny Qwen2 model (random init, local tokenizer)."""

    hidden_size: int = doc(128, "width")
    num_layers: int = doc(4, "transformer blocks")
    num_heads: int = doc(4, "attention heads")
    num_kv_heads: int = doc(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = doc(384, "MLP width")
    vocab_size: int = doc(384, "BPE vocabulary the local tokenizer is trained to (special tokens included)")
    max_position_embeddings: int = doc(512, "longest sequence")
    initializer_range: float = doc(0.02, "std of the random init")


@dataclass
class WarmupConfig:
    """The warm-up SFT that turns the random tiny model into the base model (cached on disk)."""

    steps: int = doc(700, "optimizer steps; 0 = use the random model as base")
    batch_size: int = doc(64, "problems per step")
    lr: float = doc(2e-3, "peak learning rate (cosine, 50 warm-up steps)")
    level_weights: list[float] = doc(help="sampling weight of each task level during warm-up",
                                     factory=lambda: [3.0, 3.0, 3.0, 1.0, 1.0, 0.0])
    rewrite_share: float = doc(0.25, "share of warm-up examples that show a coarser reference trace in the "
                                     "prompt (prompts' bridge_rewrite template) and teach the one-step-per-line "
                                     "solution: the tiny student learns to read a reference, as an instruction-"
                                     "tuned model can (needed by bridge.strategy=student_rewrite); 0 = none")


@dataclass
class ModelConfig:
    """The policy: a hub name, a local path, or 'tiny' for the built-in tiny model."""

    name_or_path: str = doc("tiny", "'tiny', a Hugging Face hub name or a local directory")
    dtype: str = doc("float32", "float32 | bfloat16 | float16")
    attn_implementation: str = doc("sdpa", "sdpa | eager | flash_attention_2")
    cache_dir: str = doc("~/.cache/stagewise_pl", "where the tiny base model is cached (keyed by its config)")
    gradient_checkpointing: bool = doc(False, "recompute each layer's activations in the backward pass (less "
                                              "memory, ~30% more compute); for the GPU recipes")
    lora_rank: int = doc(0, "LoRA adapters of this rank in every training phase (peft, injected in place; "
                            "exports and vLLM pushes carry merged weights); 0 = full fine-tuning")
    lora_alpha: float = doc(16.0, "LoRA scale numerator (scale = alpha / rank)")
    lora_dropout: float = doc(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = doc(help="module names (suffixes) that get adapters",
                                  factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    tiny: TinyModelConfig = doc(help="tiny model shape", factory=TinyModelConfig)
    warmup: WarmupConfig = doc(help="tiny model warm-up", factory=WarmupConfig)


@dataclass
class LevelConfig:
    """One difficulty level of the synthetic arithmetic task."""

    steps: int = doc(1, "number of operations (one line of the trace each)")
    max_operand: int = doc(9, "operands are drawn from 1..max_operand")


@dataclass
class TaskConfig:
    """The built-in synthetic task: left-to-right integer arithmetic with + and -."""

    seed: int = doc(1234, "fixes the problems of every split (independent of run.seed)")
    levels: list[LevelConfig] = doc(help="difficulty levels, easiest first", factory=lambda: [
        LevelConfig(1, 9), LevelConfig(2, 9), LevelConfig(3, 9),
        LevelConfig(2, 40), LevelConfig(3, 40), LevelConfig(6, 60)])
    train_per_level: int = doc(2000, "training problems per level")
    test_per_level: int = doc(50, "held-out problems per level (never in train)")


@dataclass
class DataConfig:
    """The training pool and how it becomes SFT examples."""

    source: str = doc("synthetic", "synthetic | jsonl | hf | benchmark")
    path: str = doc("", "file or directory for jsonl / hf / benchmark sources")
    format: str = doc("", "benchmark format (math500, gsm8k, aime24, amc23, minerva_math, olympiadbench); "
                          "empty = from the file name")
    fields: dict[str, str] = doc(help="field map for jsonl/hf rows: id, prompt, answer, solution, level",
                                 factory=lambda: {"prompt": "prompt", "answer": "answer"})
    split: str = doc("train", "split of an hf dataset or of the synthetic task")
    limit: int = doc(0, "keep only the first N problems; 0 = all")
    target: str = doc("teacher_trace", "SFT target: teacher_trace | reference (the short solution)")
    replay_target: str = doc("target", "what a phase's replayed problems train on: target = data.target; own = one "
                                       "of the student's own correct completions in the latest profile (replay "
                                       "then draws from the problems that profile saw solved)")
    on_bad_row: str = doc("error", "error = stop at the first bad row with file:line; skip = count and skip")
    max_bad_fraction: float = doc(0.05, "with on_bad_row=skip, abort if more rows than this are bad")
    max_row_bytes: int = doc(1_000_000, "a JSONL line longer than this is a bad row (row_too_large)")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = doc(1e-3, "peak learning rate")
    weight_decay: float = doc(0.01, "AdamW weight decay")
    betas: list[float] = doc(help="AdamW betas", factory=lambda: [0.9, 0.98])
    warmup_steps: int = doc(20, "linear warm-up steps (at most a fifth of a phase's steps)")
    min_lr_ratio: float = doc(0.1, "cosine floor as a fraction of lr")
    grad_clip: float = doc(1.0, "gradient norm clip; 0 = off")
    max_nonfinite_steps: int = doc(3, "a step with a NaN/inf loss or gradient is skipped and counted; this many in a "
                                      "row stop the run (non-zero exit, no checkpoint of them)")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings and batch shape."""

    accelerator: str = doc("auto", "cpu | gpu | auto")
    devices: Any = doc(1, "devices per node (int, list or 'auto')")
    num_nodes: int = doc(1, "nodes")
    strategy: str = doc("auto", "auto | ddp | ddp_spawn | ... (a Lightning DDP strategy; FSDP and DeepSpeed are not "
                                "supported: rollouts and exports need the whole weights on each rank)")
    precision: str = doc("32-true", "Lightning precision, e.g. 32-true, bf16-mixed")
    batch_size: int = doc(64, "sequences per micro-batch")
    accumulate_grad_batches: int = doc(1, "micro-batches per optimizer step")
    max_length: int = doc(128, "longest training sequence in tokens; longer examples are truncated")
    packing: bool = doc(False, "pack examples into rows of max_length (attention never crosses examples)")
    kernel: str = doc("auto", "fused log-prob kernel backend: auto (triton on CUDA when installed) | torch | triton")
    log_every_n_steps: int = doc(10, "logging interval")
    checkpoint_every_n_steps: int = doc(100, "Lightning checkpoint interval (and at the end of each phase)")


@dataclass
class RolloutConfig:
    """The rollout engine used for sampling (evaluation now; profiling and RL later)."""

    engine: str = doc("hf", "hf (transformers, CPU and GPU) | vllm (needs vllm; weights pushed in memory)")
    gpu_memory_utilization: float = doc(0.3, "vllm: share of GPU memory for weights and KV cache")
    tensor_parallel_size: int = doc(1, "vllm: GPUs per engine")
    max_model_len: int = doc(1024, "vllm: longest prompt + completion")
    kv_cache_mb: int = doc(128, "vllm on CPU: KV cache size (uncapped it takes ~90% of RAM)")
    canary_tolerance: float = doc(1e-3, "vllm: largest log-prob gap to the training model after a weight push")


@dataclass
class VerifierConfig:
    """How completions are graded: which verifier, and the grading pool that bounds every call."""

    name: str = doc("exact", "registered verifier (exact | math) or a dotted path package.module:Class")
    after_think: bool = doc(False, "grade only the text after the last </think>")
    options: dict[str, Any] = doc(help="extra keyword arguments for a third-party verifier", factory=dict)
    workers: int = doc(1, "grading processes")
    timeout_s: float = doc(5.0, "hard wall-clock bound per completion; over it the verdict is 'timeout'")
    memory_mb: int = doc(2048, "address-space limit of each grading process; 0 = none")


@dataclass
class ProfileConfig:
    """Profile phases (kind profile): each problem's pass rate under the current policy, into the ledger."""

    k: int = doc(8, "samples per problem")
    temperature: float = doc(1.0, "sampling temperature")
    max_new_tokens: int = doc(0, "generation budget; 0 = derived from the task")
    levels: list[str] = doc(help="profile pool problems of these levels; [] = the whole pool", factory=list)
    limit: int = doc(0, "profile at most N problems (a seeded draw); 0 = all")
    chunk: int = doc(256, "problems per generation call (each call's records are one ledger part)")


@dataclass
class GRPOConfig:
    """The RL phase (kind grpo): sampling, advantages, the clipped surrogate and its updates."""

    levels: list[str] = doc(help="standalone: train on pool problems of these levels; [] = the whole pool",
                            factory=list)
    prompts_per_step: int = doc(16, "prompts per rollout step")
    num_generations: int = doc(8, "completions per prompt (the group)")
    max_new_tokens: int = doc(0, "generation budget; 0 = derived from the task")
    temperature: float = doc(1.0, "sampling temperature (log-probs are taken at the same temperature)")
    top_p: float = doc(1.0, "nucleus sampling")
    advantage: str = doc("grpo", "advantage estimator: grpo | dr_grpo | rloo (or a registered name)")
    std_scale: str = doc("default", "divide advantages by the reward std: group | batch | none | default "
                                    "(grpo: group, dr_grpo and rloo: none)")
    loss_aggregation: str = doc("token_mean", "token_mean (DAPO) | seq_mean_token_mean (GRPO) | "
                                              "constant (Dr. GRPO: batch x max_new_tokens)")
    epsilon_low: float = doc(0.2, "clip ratio below 1 - epsilon_low")
    epsilon_high: float = doc(0.2, "clip ratio above 1 + epsilon_high (> epsilon_low: DAPO clip-higher)")
    beta: float = doc(0.0, "weight of the k3 KL to a frozen copy of the phase's starting policy; "
                           "0 = no reference model is kept")
    entropy_coef: float = doc(0.0, "entropy bonus weight")
    mask_truncated: bool = doc(False, "completions cut by the budget get no loss (DAPO overlong filtering)")
    num_iterations: int = doc(1, "passes over each rollout batch (>1: old log-probs are stored and ratios clip)")
    minibatches: int = doc(1, "optimizer steps per pass: the rollout batch is split into this many mini-batches")
    micro_batch_size: int = doc(0, "sequences per forward/backward (gradient accumulation); 0 = a whole mini-batch")
    drop_flat_groups: bool = doc(True, "groups whose rewards are all equal (no signal) are left out of the update; "
                                       "a step with none left makes no update")
    dynamic_sampling: bool = doc(False, "refill the batch with fresh prompts until it has prompts_per_step "
                                        "informative groups (DAPO), at most max_extra_rounds more rounds")
    max_extra_rounds: int = doc(2, "dynamic sampling: extra generation rounds per step")
    max_rollout_factor: int = doc(4, "a phase stops after steps x this many rollout steps even if too few made "
                                     "an update (a pool that is all solved or all failed)")
    token_budget: int = doc(0, "the run's budget of generated tokens (profiles, GRPO rollouts, Bridge rewrites, CFT "
                               "repairs; evaluation not counted): each GRPO rollout step samples as many prompts as "
                               "keeps the run on it, given the tokens spent and the cost of the phases still to come; "
                               "0 = prompts_per_step every step")
    max_prompts_per_step: int = doc(256, "token_budget: the most prompts one rollout step draws")


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy pass@1 and sampled pass@k."""

    split: str = doc("test", "synthetic split to evaluate on; '' = none")
    benchmarks: list[str] = doc(help="benchmark JSONL files to evaluate on as well", factory=list)
    limit: int = doc(0, "at most N problems per benchmark file; 0 = all")
    per_level: int = doc(0, "synthetic split: the first N problems of each level; 0 = all")
    k: int = doc(8, "samples per problem for pass@k; 0 = greedy only")
    temperature: float = doc(1.0, "sampling temperature for pass@k")
    max_new_tokens: int = doc(0, "generation budget; 0 = derived from the task")
    batch_size: int = doc(64, "prompts per generation batch")
    before: bool = doc(True, "evaluate before the first phase")
    each_phase: bool = doc(True, "evaluate after every training phase (sft, grpo); eval phases always evaluate")


@dataclass
class TeacherConfig:
    """Where teacher traces and critiques come from (bridge_sft and cft phases)."""

    name: str = doc("programmatic", "programmatic (the synthetic task's) | trace_file | openai | vllm | "
                                    "a dotted path package.module:Class")
    args: dict[str, Any] = doc(help="keyword arguments of the teacher, e.g. trace_file: {path: traces.jsonl}; "
                                    "openai: {base_url, model, api_key_env, concurrency, cache_dir}", factory=dict)
    style: str = doc("steps", "programmatic teacher: steps (one operation per line, the student's granularity) | "
                              "chunked (ops_per_line per line: a stand-in for a large model's coarser traces)")
    ops_per_line: int = doc(2, "programmatic teacher, style chunked: operations per trace line")
    critic: str = doc("", "another teacher for critiques and repairs when the trace teacher cannot write them "
                          "(a trace file); '' = the same teacher")
    critic_args: dict[str, Any] = doc(help="keyword arguments of the critic", factory=dict)


@dataclass
class BridgeConfig:
    """Bridge SFT: teacher traces made learnable by the student (reconstruction; see stagewise_pl/bridge.py)."""

    strategy: str = doc("student_rewrite", "student_rewrite | teacher_simplify | prefix_hint | min_nll_select | "
                                           "raw (no bridge: the baseline) | a dotted path")
    samples: int = doc(4, "student_rewrite, prefix_hint: student samples per problem (the first kept one wins)")
    temperature: float = doc(0.7, "sampling temperature of the student's candidates")
    prefix_fraction: float = doc(0.5, "prefix_hint: share of the teacher trace's lines given as the prefix")
    candidates: int = doc(4, "min_nll_select: teacher traces per problem to choose among")
    reference_markers: list[str] = doc(help="student_rewrite: a candidate that contains one of these "
                                            "(case-insensitive) mentions the reference and is not kept",
                                       factory=lambda: ["reference", "given solution", "provided solution"])
    max_new_tokens: int = doc(0, "generation budget of the student's candidates; 0 = derived from the task")
    fallback: str = doc("raw", "a problem with no kept candidate: raw = train on the teacher trace (if it "
                               "verifies); drop = leave the problem out")


@dataclass
class CFTConfig:
    """Critique fine-tuning data from the ledger (reconstruction after CFT and Critique-GRPO)."""

    failures_per_problem: int = doc(2, "failed rollouts used per problem (the latest graded phase's)")
    weights: dict[str, float] = doc(help="loss weight of each kind: diagnosis (critique of a failure), repair "
                                         "(corrected solution, kept only if verified), trace (a new reasoning "
                                         "trace through Bridge); 0 leaves a kind out",
                                    factory=lambda: {"diagnosis": 1.0, "repair": 1.0, "trace": 1.0})
    repair_by: str = doc("student", "student: the student continues the failure from before its first wrong "
                                    "step (named in the diagnosis); teacher: the teacher's repair")
    repair_samples: int = doc(4, "repair_by=student: samples per failure (the first verified one is kept)")
    step_pattern: str = doc(r"[Ss]tep (\d+)", "regex whose first group is the first wrong step (1-based) in a "
                                               "diagnosis")
    max_length: int = doc(256, "longest CFT example in tokens (diagnosis inputs hold a whole failed solution)")


@dataclass
class PhaseConfig:
    """One phase of the plan: its kind, the data it works on, its budget and its overrides."""

    kind: str = doc("sft", "profile | sft | bridge_sft | cft | grpo | eval, or a kind registered in "
                           "stagewise_pl.runners.PHASES")
    name: str = doc("", "label in logs and directories; empty = <index>-<kind>")
    select: str = doc("all", "the problems it works on: 'all' (the training pool), a bucket that the stage "
                             "rules build at the phase's start (hard, medium, easy, unsolved_in_rl, ...), or a "
                             "rule by dotted path (package.module:Class): the buckets it builds")
    steps: int = doc(100, "budget. sft: optimizer steps; grpo: rollout steps that make an update (each makes "
                          "grpo.num_iterations x grpo.minibatches optimizer steps); profile, eval: unused")
    epochs: float = doc(0.0, "sft: budget in passes over the selected problems instead of steps (> 0 wins)")
    lr: Optional[float] = doc(None, "overrides optim.lr for this phase")
    batch_size: Optional[int] = doc(None, "overrides trainer.batch_size (sft) or grpo.prompts_per_step (grpo) "
                                          "for this phase")
    temperature: Optional[float] = doc(None, "overrides the sampling temperature (grpo.temperature or "
                                             "profile.temperature) for this phase")
    limit: int = doc(0, "work on at most N of the selected problems (a seeded draw); 0 = all")
    replay: float = doc(0.0, "sft: share of the phase's examples drawn from the rest of the pool (problems it "
                             "did not select), against forgetting what the bucket does not hold; 0 = none")
    fallback: str = doc("", "a bucket to work on when select's is empty (e.g. cft on unsolved_in_rl falls back to "
                            "hard), so the phase still spends its budget; '' = an empty bucket skips the phase")


@dataclass
class RuleConfig:
    """A stage rule: a Lightning Callback with a ``route`` method, named by dotted path."""

    target: str = doc("callbacks.rules:RouteByPassRate", "package.module:Class (or package.module.Class)")
    args: dict[str, Any] = doc(help="keyword arguments of the class", factory=dict)


@dataclass
class StagesConfig:
    """How problems are routed to phases: the stage rules, asked in order at every phase boundary."""

    rules: list[RuleConfig] = doc(help="stage rules, applied in order (each sees the buckets of the ones "
                                       "before it)", factory=lambda: [
        RuleConfig("callbacks.rules:RouteByPassRate", {}),
        RuleConfig("callbacks.rules:NeverSolvedInRL", {})])
    callbacks: list[str] = doc(help="further Lightning callbacks by dotted path (package.module:Class)",
                               factory=list)


@dataclass
class Config:
    run: RunConfig = doc(help="run directory, seed, logging, resume", factory=RunConfig)
    model: ModelConfig = doc(help="policy model", factory=ModelConfig)
    task: TaskConfig = doc(help="built-in synthetic task", factory=TaskConfig)
    data: DataConfig = doc(help="training pool", factory=DataConfig)
    optim: OptimConfig = doc(help="optimiser and schedule", factory=OptimConfig)
    trainer: TrainerConfig = doc(help="Lightning trainer", factory=TrainerConfig)
    rollout: RolloutConfig = doc(help="sampling engine", factory=RolloutConfig)
    verifier: VerifierConfig = doc(help="grading of completions", factory=VerifierConfig)
    eval: EvalConfig = doc(help="evaluation", factory=EvalConfig)
    profile: ProfileConfig = doc(help="profile phases (kind profile)", factory=ProfileConfig)
    grpo: GRPOConfig = doc(help="RL phases (kind grpo)", factory=GRPOConfig)
    stages: StagesConfig = doc(help="stage rules that route problems to phases", factory=StagesConfig)
    teacher: TeacherConfig = doc(help="teacher of bridge_sft and cft phases", factory=TeacherConfig)
    bridge: BridgeConfig = doc(help="Bridge SFT (bridge_sft phases, and cft's new traces)", factory=BridgeConfig)
    cft: CFTConfig = doc(help="critique fine-tuning (cft phases)", factory=CFTConfig)
    prompts: str = doc("default", "prompt templates: conf/prompts/NAME.yaml, or a path to a YAML file")
    phases: list[PhaseConfig] = doc(help="the plan: phases run in order", factory=lambda: [PhaseConfig()])
    conf_name: str = doc("default", "name of the conf file this config came from (set by the loader)")


GROUPS = ["run", "model", "task", "data", "optim", "trainer", "rollout", "verifier", "eval", "profile", "grpo",
          "stages", "teacher", "bridge", "cft", "prompts", "phases"]
_CHOICES = {
    "run.logger": {"csv", "tensorboard", "wandb"},
    "model.dtype": {"float32", "bfloat16", "float16"},
    "model.attn_implementation": {"sdpa", "eager", "flash_attention_2"},
    "data.source": {"synthetic", "jsonl", "hf", "benchmark"},
    "data.target": {"teacher_trace", "reference"},
    "data.replay_target": {"target", "own"},
    "data.on_bad_row": {"error", "skip"},
    "trainer.kernel": {"auto", "torch", "triton"},
    "rollout.engine": {"hf", "vllm"},
    "grpo.std_scale": {"default", "group", "batch", "none"},
    "grpo.loss_aggregation": {"token_mean", "seq_mean_token_mean", "constant"},
    "cft.repair_by": {"student", "teacher"},
    "bridge.fallback": {"raw", "drop"},
    "teacher.style": {"steps", "chunked"},
}
_POSITIVE = ["optim.max_nonfinite_steps", "data.max_row_bytes", "rollout.tensor_parallel_size", "rollout.max_model_len", "rollout.kv_cache_mb",
             "verifier.workers", "verifier.timeout_s", "trainer.batch_size", "trainer.accumulate_grad_batches", "trainer.max_length",
             "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "eval.batch_size",
             "task.train_per_level", "task.test_per_level", "model.warmup.batch_size",
             "model.tiny.hidden_size", "model.tiny.num_layers", "model.tiny.vocab_size",
             "grpo.prompts_per_step", "grpo.num_generations", "grpo.num_iterations", "grpo.minibatches",
             "grpo.max_rollout_factor", "grpo.max_prompts_per_step", "profile.k", "profile.chunk", "bridge.samples", "bridge.candidates",
             "bridge.temperature", "teacher.ops_per_line", "cft.failures_per_problem", "cft.repair_samples", "cft.max_length"]
_NON_NEGATIVE = ["eval.per_level", "model.lora_rank", "model.lora_dropout", "verifier.memory_mb", "optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip", "eval.k",
                 "eval.limit", "eval.max_new_tokens", "data.limit", "model.warmup.steps", "run.threads",
                 "grpo.max_new_tokens", "grpo.beta", "grpo.entropy_coef", "grpo.micro_batch_size",
                 "grpo.max_extra_rounds", "grpo.epsilon_low", "grpo.epsilon_high",
                 "profile.max_new_tokens", "profile.limit", "bridge.max_new_tokens", "grpo.token_budget"]


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _problems(cfg: Config) -> list[tuple[str, str]]:
    """Every bad value as (key, message): choices, ranges and cross-field rules."""
    bad: list[tuple[str, str]] = []
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            bad.append((key, f"{_get(cfg, key)!r} is not one of {sorted(choices)}"))
    bad += [(k, f"must be > 0, got {_get(cfg, k)}") for k in _POSITIVE if _get(cfg, k) <= 0]
    bad += [(k, f"must be >= 0, got {_get(cfg, k)}") for k in _NON_NEGATIVE if _get(cfg, k) < 0]
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        bad.append(("optim.min_lr_ratio", f"must be in [0, 1], got {cfg.optim.min_lr_ratio}"))
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        bad.append(("optim.betas", f"must be two numbers in [0, 1), got {cfg.optim.betas}"))
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        bad.append(("data.max_bad_fraction", f"must be in [0, 1], got {cfg.data.max_bad_fraction}"))
    if any(word in str(cfg.trainer.strategy).lower() for word in ("fsdp", "deepspeed")):
        bad.append(("trainer.strategy", f"{cfg.trainer.strategy!r}: sharded strategies are not supported (rollouts, "
                    f"the bridge and exports read the whole weights on each rank); use ddp, and model.lora_rank or "
                    f"model.gradient_checkpointing when memory is short"))
    if cfg.data.source != "synthetic" and not cfg.data.path:
        bad.append(("data.path", f"data.source={cfg.data.source} needs a path"))
    if not cfg.task.levels:
        bad.append(("task.levels", "needs at least one level"))
    for i, level in enumerate(cfg.task.levels):
        if level.steps < 1 or level.max_operand < 1:
            bad.append((f"task.levels.{i}", f"steps and max_operand must be >= 1, got {level}"))
    if len(cfg.model.warmup.level_weights) != len(cfg.task.levels):
        bad.append(("model.warmup.level_weights",
                    f"has {len(cfg.model.warmup.level_weights)} weights for {len(cfg.task.levels)} task levels"))
    elif cfg.model.warmup.steps and sum(cfg.model.warmup.level_weights) <= 0:
        bad.append(("model.warmup.level_weights", "needs a positive weight"))
    if cfg.eval.temperature <= 0 and cfg.eval.k > 0:
        bad.append(("eval.temperature", "must be > 0 when eval.k > 0"))
    if cfg.profile.temperature <= 0:
        bad.append(("profile.temperature", f"must be > 0 (a pass rate needs samples), got {cfg.profile.temperature}"))
    g = cfg.grpo
    if g.temperature <= 0:
        bad.append(("grpo.temperature", f"must be > 0 (GRPO samples), got {g.temperature}"))
    if not 0.0 < g.top_p <= 1.0:
        bad.append(("grpo.top_p", f"must be in (0, 1], got {g.top_p}"))
    if g.epsilon_low >= 1.0:
        bad.append(("grpo.epsilon_low", f"must be < 1, got {g.epsilon_low}"))
    if g.advantage == "rloo" and g.num_generations < 2:
        bad.append(("grpo.num_generations", "rloo needs at least 2 completions per prompt"))
    if g.minibatches > g.prompts_per_step * g.num_generations:
        bad.append(("grpo.minibatches", f"{g.minibatches} mini-batches for {g.prompts_per_step * g.num_generations} "
                                        f"completions per step"))
    if cfg.model.tiny.hidden_size % cfg.model.tiny.num_heads or cfg.model.tiny.num_heads % cfg.model.tiny.num_kv_heads:
        bad.append(("model.tiny.num_heads", "hidden_size must divide by num_heads, num_heads by num_kv_heads"))
    if not 0.0 <= cfg.model.warmup.rewrite_share < 1.0:
        bad.append(("model.warmup.rewrite_share", f"must be in [0, 1), got {cfg.model.warmup.rewrite_share}"))
    if not 0.0 <= cfg.bridge.prefix_fraction < 1.0:
        bad.append(("bridge.prefix_fraction", f"must be in [0, 1), got {cfg.bridge.prefix_fraction}"))
    unknown = set(cfg.cft.weights) - {"diagnosis", "repair", "trace"}
    if unknown or any(w < 0 for w in cfg.cft.weights.values()) or not any(w > 0 for w in cfg.cft.weights.values()):
        bad.append(("cft.weights", f"needs diagnosis, repair and trace weights >= 0, one > 0; got {dict(cfg.cft.weights)}"))
    try:
        if re.compile(cfg.cft.step_pattern).groups < 1:
            bad.append(("cft.step_pattern", "needs a group that captures the step number"))
    except re.error as exc:
        bad.append(("cft.step_pattern", f"not a regular expression ({exc})"))
    if not cfg.phases:
        bad.append(("phases", "the plan needs at least one phase"))
    for i, phase in enumerate(cfg.phases):
        if phase.steps <= 0:
            bad.append((f"phases.{i}.steps", f"must be > 0, got {phase.steps}"))
        if phase.lr is not None and phase.lr < 0:
            bad.append((f"phases.{i}.lr", f"must be >= 0, got {phase.lr}"))
        if not 0.0 <= phase.replay < 1.0:
            bad.append((f"phases.{i}.replay", f"must be in [0, 1), got {phase.replay}"))
        if phase.epochs < 0 or phase.limit < 0:
            bad.append((f"phases.{i}", f"epochs and limit must be >= 0, got {phase.epochs} and {phase.limit}"))
        if phase.batch_size is not None and phase.batch_size <= 0:
            bad.append((f"phases.{i}.batch_size", f"must be > 0, got {phase.batch_size}"))
        if phase.temperature is not None and phase.temperature <= 0:
            bad.append((f"phases.{i}.temperature", f"must be > 0, got {phase.temperature}"))
    return bad


def find_conf(name: str) -> Path:
    """conf=NAME: a path to a YAML file, ./conf/NAME.yaml, or the project's conf/NAME.yaml."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    candidates += [Path("conf") / f"{name}.yaml", CONF_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            if path.stem in EXPERIMENT_CONFS and path.parent.resolve() == CONF_DIR:
                raise ConfigError(f"conf={name}: {path} describes an experiment (arms x seeds), not a run: "
                                  f"python -m stagewise_pl.experiment runs it")
            return path
    raise ConfigError(f"conf={name}: no such file (looked at {', '.join(str(p) for p in candidates)}); "
                      f"available: {', '.join(available_confs())}")


def load_prompts(name: str) -> dict[str, str]:
    """prompts=NAME: conf/prompts/NAME.yaml (or a path to a YAML file) as a dict of templates."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    candidates += [Path("conf") / "prompts" / f"{name}.yaml", CONF_DIR / "prompts" / f"{name}.yaml"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ConfigError(f"prompts={name}: no such file (looked at {', '.join(str(c) for c in candidates)})")
    try:
        prompts = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:
        raise ConfigError(f"prompts={name}: {path} is not valid YAML ({exc})") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ConfigError(f"prompts={name}: {path} must map template names to strings")
    return prompts


EXPERIMENT_CONFS = {"experiment"}  # conf/ files python -m stagewise_pl.experiment reads, not the fit


def available_confs() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem not in EXPERIMENT_CONFS)


def _merge(base: Any, layer: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {msg}") from None


def _apply_override(merged: Any, item: str) -> Any:
    """``a.b=value`` (list items by index: ``phases.0.steps=5``), typed by YAML and checked by the schema."""
    source = f"command line ({item})"
    if "=" not in item:
        raise ConfigError(f"command line: {item!r} is not key=value")
    key, _, text = item.partition("=")
    try:
        value = OmegaConf.from_dotlist([f"value={text}"])["value"]
        if isinstance(value, (dict, list)) or OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        OmegaConf.update(merged, key, value, merge=True, force_add=False)
    except (OmegaConfBaseException, TypeError, ValueError, IndexError) as exc:
        full_key = getattr(exc, "full_key", None) or key
        raise ConfigError(f"{source}: key '{full_key}': {str(exc).splitlines()[0]}") from None
    return merged


def load_config(conf: str = "default", overrides: Optional[list[str]] = None) -> Config:
    """Merge conf/<conf>.yaml and ``key=value`` overrides onto :class:`Config`, then check values."""
    overrides = list(overrides or [])
    path = find_conf(conf)
    try:
        file_layer = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if file_layer is None or not isinstance(file_layer, type(OmegaConf.create({}))):
        raise ConfigError(f"{path}: must hold a mapping of config groups")
    merged = _merge(OmegaConf.structured(Config), file_layer, str(path))
    for item in overrides:
        merged = _apply_override(merged, item)
    merged.conf_name = path.stem
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: key '{getattr(exc, 'full_key', '?')}': {exc}") from None
    problems = _problems(cfg)
    if problems:
        given = {o.split("=", 1)[0] for o in overrides}
        lines = [f"{'command line' if _set_by(key, given) else path}: key '{key}': {msg}" for key, msg in problems]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return cfg


def _set_by(key: str, given: set[str]) -> bool:
    return any(key == g or key.startswith(g + ".") or g.startswith(key + ".") for g in given)


def resolve_run_dir(cfg: Config) -> Path:
    """run.dir, or runs/<conf>-<timestamp> for a fresh run."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser()
    return Path("runs") / f"{cfg.conf_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per config field, with its default and help, for ``--help``."""
    import typing

    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name == "conf_name":
            continue
        key, help_text, kind = f"{prefix}{f.name}", f.metadata.get("help", ""), hints[f.name]
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list and typing.get_args(kind) else None
        if dataclasses.is_dataclass(kind):
            lines.append(f"\n[{key}] {help_text}" if not prefix else f"  {key}.*  ({help_text})")
            lines += describe(kind, key + ".")
            continue
        if item is not None and dataclasses.is_dataclass(item):
            lines.append(f"\n[{key}] {help_text}; each item:" if not prefix else f"  {key}: list of ({help_text}):")
            lines += describe(item, f"{key}[i].")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {key} = {default!r}  # {help_text}")
    return lines
