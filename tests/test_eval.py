import pytest

from stagewise_pl.data.problems import Problem
from stagewise_pl.eval.evaluate import evaluate_problems, format_table
from stagewise_pl.models.load import PromptRenderer
from stagewise_pl.rollout.base import RolloutBatch
from stagewise_pl.verify import get_verifier


class ScriptedEngine:
    """Returns fixed completions: greedy answers, then k sampled answers per prompt."""

    def __init__(self, greedy, sampled):
        self.greedy, self.sampled = greedy, sampled

    def generate(self, prompts, sampling, desc=""):
        texts = self.greedy if sampling.temperature == 0 else [t for row in self.sampled for t in row]
        assert len(texts) == len(prompts) * sampling.n
        return RolloutBatch(n=sampling.n, prompt_ids=[[]] * len(prompts), completion_ids=[[]] * len(texts),
                            texts=texts, finish_reasons=["stop"] * len(texts))


class PlainTokenizer:
    chat_template = None


def test_pass_at_1_mean_p_and_pass_at_k_by_level():
    problems = [Problem(f"p{i}", f"q{i}", str(i), "t", level=str(1 + i // 2)) for i in range(4)]
    greedy = ["#### 0", "#### 9", "#### 2", "#### 3"]          # level 1: 1/2, level 2: 2/2
    sampled = [["#### 0", "#### 0", "#### 5", "#### 5"],       # p = 0.5
               ["#### 5", "#### 5", "#### 5", "#### 5"],       # p = 0
               ["#### 2", "#### 2", "#### 2", "#### 2"],       # p = 1
               ["#### 3", "nothing", "#### 7", "#### 7"]]      # p = 0.25
    result = evaluate_problems(ScriptedEngine(greedy, sampled), PromptRenderer(PlainTokenizer()),
                               get_verifier("exact"), problems, "toy", k=4)
    lv1, lv2, overall = result.by_level["1"], result.by_level["2"], result.by_level["all"]
    assert (lv1["pass@1"], lv1["mean_p"], lv1["pass@4"]) == (0.5, 0.25, 0.5)
    assert (lv2["pass@1"], lv2["mean_p"], lv2["pass@4"]) == (1.0, 0.625, 1.0)
    assert overall["n"] == 4 and overall["pass@1"] == 0.75 and overall["mean_p"] == pytest.approx(0.4375)
    assert (lv1["easy"], lv1["medium"], lv1["hard"]) == (0.0, 0.5, 0.5)
    assert (lv2["easy"], lv2["medium"], lv2["hard"]) == (0.5, 0.5, 0.0)
    table = format_table({"before": result})
    assert "| 1 | 2 | 0.50 | 0.250 | 0.00/0.50/0.50 |" in table and "| all | 4 |" in table


def test_problems_without_level_go_to_all():
    problems = [Problem("a", "q", "1", "bench"), Problem("b", "q", "2", "bench")]
    result = evaluate_problems(ScriptedEngine(["\\boxed{1}", "The answer is 3"], []), PromptRenderer(PlainTokenizer()),
                               get_verifier("exact"), problems, "bench", k=0)
    assert list(result.by_level) == ["all"] and result.by_level["all"]["pass@1"] == 0.5
    assert "| all | 2 | 0.50 | - | - |" in format_table({"x": result})


def test_hf_engine_generates_n_per_prompt_and_is_seeded(tiny):
    from stagewise_pl.models.load import render_prompts
    from stagewise_pl.rollout import SamplingParams
    from stagewise_pl.rollout.hf import HFEngine

    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=2)
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7"])
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=11)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert len(a.texts) == 9 and len(a.prompt_ids) == 3 and a.texts == b.texts
    assert all(len(ids) <= 6 for ids in a.completion_ids)
    assert set(a.finish_reasons) <= {"stop", "length"}
    assert all(r == "length" for ids, r in zip(a.completion_ids, a.finish_reasons)
               if tokenizer.eos_token_id not in ids)
    greedy = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=6))
    one_by_one = [engine.generate([p], SamplingParams(n=1, temperature=0, max_new_tokens=6)).texts[0] for p in prompts]
    assert greedy.texts == one_by_one  # left padding does not change greedy output


def test_hf_engine_cuts_at_stop_strings(tiny):
    from stagewise_pl.models.load import render_prompts
    from stagewise_pl.rollout import SamplingParams
    from stagewise_pl.rollout.hf import HFEngine

    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    prompts = render_prompts(tokenizer, ["1+2"])
    free = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=1))
    stop = next(t[2:4] for t in free.texts if len(t) >= 4)  # a string that occurs in a completion
    cut = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=1, stop=(stop,)))
    for full, full_ids, text, ids, reason in zip(free.texts, free.completion_ids, cut.texts, cut.completion_ids,
                                                 cut.finish_reasons):
        if stop in full:
            assert text == full[:full.index(stop)] and reason == "stop"
            assert ids == full_ids[:len(ids)] and stop in tokenizer.decode(ids, skip_special_tokens=True)
            assert stop not in tokenizer.decode(ids[:-1], skip_special_tokens=True)  # cut right after it
        else:
            assert text == full and ids == full_ids
