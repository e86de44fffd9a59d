"""HFEngine: log-probs that match the model, finish reasons, top-p, and the generate fallback."""
import importlib.util

import pytest
import torch

from stagewise_pl.models.load import render_prompts
from stagewise_pl.rollout import SamplingParams
from stagewise_pl.rollout.hf import HFEngine, sample_next


def test_logprobs_match_the_model_recomputed(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=3)
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7", "12+9-3"])
    batch = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3, logprobs=True))
    for i, (ids, logps) in enumerate(zip(batch.completion_ids, batch.logprobs)):
        prompt = batch.prompt_ids[i // 2]
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            logsm = torch.log_softmax(model(full).logits[0, len(prompt) - 1:-1].float(), -1)
        expected = logsm.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert len(logps) == len(ids)
        assert torch.allclose(torch.tensor(logps), expected, atol=1e-4)


def test_finish_reasons_and_eos(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    batch = engine.generate(render_prompts(tokenizer, ["1+2"] * 3),
                            SamplingParams(n=4, temperature=1.0, max_new_tokens=5, seed=0))
    for ids, reason in zip(batch.completion_ids, batch.finish_reasons):
        if reason == "stop":
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        else:
            assert len(ids) == 5 and tokenizer.eos_token_id not in ids


@pytest.mark.parametrize("path", ["fast", "generate"])
def test_every_end_token_of_the_generation_config_stops_a_completion(tiny, monkeypatch, path):
    """A chat model may end a turn with any of its generation config's end tokens (Llama 3.2 Instruct: three),
    not only the tokenizer's eos: each stops a completion, with finish reason "stop", as in vLLM."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5"])
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    plain = HFEngine(model, tokenizer).generate(prompts, greedy)
    assert len(plain.completion_ids[0]) >= 2
    other = plain.completion_ids[0][1]  # a token the model emits greedily, second after the prompt "1+2"
    assert other != tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, other]
    engine = HFEngine(model, tokenizer)
    if path == "generate":
        from transformers.cache_utils import Cache

        monkeypatch.delattr(Cache, "batch_select_indices")  # the model.generate fallback
    batch = engine.generate(prompts, greedy)
    for before, ids, reason in zip(plain.completion_ids, batch.completion_ids, batch.finish_reasons):
        if other in before:
            assert ids == before[:before.index(other) + 1] and reason == "stop"
        else:
            assert ids == before


def ending_midway(model, tokenizer, prompts, sampling):
    """A copy of ``model`` whose rows end at different steps: the random tiny model never emits its eos and, greedy,
    repeats one token, so a test of rows leaving the batch would have none. The copy's matrices are drawn again
    with a larger spread (its outputs then depend on the context) and one more end token is chosen that some rows
    emit midway and others never."""
    import collections
    import copy

    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    completions = HFEngine(model, tokenizer).generate(prompts, sampling).completion_ids
    rows_with = collections.Counter(t for ids in completions for t in set(ids[1:-1]))
    midway = [t for t in rows_with if all(t not in ids[:1] + ids[-1:] for ids in completions)]  # never first/last
    assert midway, "no token that could end some rows midway"
    token = min(midway, key=lambda t: (abs(rows_with[t] - len(completions) / 2), t))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, token]
    return model


def assert_some_rows_stopped_midway(batch, budget):
    stopped = [len(ids) for ids, reason in zip(batch.completion_ids, batch.finish_reasons) if reason == "stop"]
    assert stopped and min(stopped) < budget and "length" in batch.finish_reasons


def test_rows_that_finish_leave_the_batch_without_changing_the_others(tiny):
    """Greedy completions are the same whatever finishes around them (compaction keeps rows aligned)."""
    model, tokenizer = tiny
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7", "12+9-3", "5", "44-40"])
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    model = ending_midway(model, tokenizer, prompts, greedy)
    for fast in (True, False):
        engine = HFEngine(model, tokenizer, batch_size=8, fast_decode=fast)
        together = engine.generate(prompts, greedy)
        assert_some_rows_stopped_midway(together, 12)
        assert together.completion_ids == [engine.generate([p], greedy).completion_ids[0] for p in prompts]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), gen)[0]) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never sampled
    tokens, logp = sample_next(logits, SamplingParams(temperature=0.0), gen)
    assert int(tokens) == 0 and abs(float(logp) - float(torch.log(torch.tensor(0.5)))) < 1e-6
    # the log-prob returned is the drawn token's under the distribution sampled: temperature, then the nucleus
    nucleus = torch.tensor([0.5 ** 2, 0.3 ** 2]) / (0.5 ** 2 + 0.3 ** 2)  # temperature 0.5 squares; 0.685 < 0.7
    for _ in range(50):
        tokens, logp = sample_next(logits, SamplingParams(temperature=0.5, top_p=0.7), gen)
        assert abs(float(logp) - float(nucleus[int(tokens)].log())) < 1e-5


@pytest.mark.parametrize("lean", [False, True])
def test_generate_fallback_for_other_caches(tiny, monkeypatch, lean):
    """A cache that cannot drop rows sends the transformers path to model.generate. With the lean step on, a float16
    model takes the transformers prefill (float32 and bfloat16 have a cache of their own), and no lean decoder is
    built for nothing."""
    import copy

    from stagewise_pl.rollout import fast_decode

    model, tokenizer = tiny
    if lean:
        model = copy.deepcopy(model).to(torch.float16)
    built = []
    monkeypatch.setattr(fast_decode, "FastDecoder", lambda *a, **k: built.append(1))
    engine = HFEngine(model, tokenizer, fast_decode=lean)
    calls = []
    original = engine._decode_with_generate

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(engine, "_decode_with_generate", spy)
    from transformers.cache_utils import Cache

    monkeypatch.delattr(Cache, "batch_select_indices")  # a cache that cannot drop finished rows
    batch = engine.generate(render_prompts(tokenizer, ["1+2"]), SamplingParams(n=2, max_new_tokens=4))
    assert calls and len(batch.texts) == 2 and not built


def test_engine_from_config(tiny):
    from stagewise_pl.config import load_config
    from stagewise_pl.rollout import make_engine
    from stagewise_pl.rollout.hf import HFEngine

    model, tokenizer = tiny
    engine = make_engine(load_config("default").rollout, model, tokenizer, "unused", batch_size=7)
    assert isinstance(engine, HFEngine) and engine.batch_size == 7


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_engine_without_vllm_names_the_extra():
    from stagewise_pl.rollout.vllm_engine import VLLMEngine

    with pytest.raises(ImportError, match=r"stagewise_pl\[gpu\]"):
        VLLMEngine("unused")


# ------------------------------------------------------------------ the lean decode step
def _compare_paths(model, tokenizer, prompts, sampling):
    """The two paths give the same tokens, finish reasons and (close) log-probs, with rows leaving the batch."""
    model = ending_midway(model, tokenizer, prompts, sampling)
    fast = HFEngine(model, tokenizer, fast_decode=True).generate(prompts, sampling)
    slow = HFEngine(model, tokenizer, fast_decode=False).generate(prompts, sampling)
    assert fast.completion_ids == slow.completion_ids and fast.finish_reasons == slow.finish_reasons
    assert_some_rows_stopped_midway(fast, sampling.max_new_tokens)
    for a, b in zip(fast.logprobs, slow.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    return fast


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_decode_matches_the_transformers_path(tiny, temperature):
    from stagewise_pl.rollout import fast_decode

    model, tokenizer = tiny
    assert fast_decode.supports(model)
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7", "12+9-3", "5", "44-40"])
    _compare_paths(model, tokenizer, prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=10,
                                                             seed=1, logprobs=True))


def test_fast_decode_with_the_modelling_files_own_rotate_half(tiny, monkeypatch):
    """Where rotate_half is not the usual half rotation the step calls the modelling file's function with the
    unsigned sin: forced here on the tiny model, still the transformers path's tokens and log-probs."""
    from stagewise_pl.rollout import fast_decode

    init = fast_decode.FastDecoder.__init__

    def no_roll(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.half_roll:  # undo the sign moved onto sin
            self.half_roll, self.sin = False, self.sin * self.rotate_half(torch.eye(self.head_dim)).sum(0)
        calls.append(self.half_roll)

    calls = []
    monkeypatch.setattr(fast_decode.FastDecoder, "__init__", no_roll)
    model, tokenizer = tiny
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7"])
    _compare_paths(model, tokenizer, prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=2,
                                                             logprobs=True))
    assert calls and not any(calls)


def test_folded_rms_norm_equals_the_norm_with_its_weight():
    """The lean step's norm leaves the weight and sqrt(width) to the next product and scales eps by the width: the
    same function, checked with an eps large enough to matter."""
    from stagewise_pl.rollout.fast_decode import _scaled

    torch.manual_seed(0)
    x, weight, eps = torch.randn(5, 16, dtype=torch.float64), torch.rand(16, dtype=torch.float64) + 0.5, 0.3
    reference = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    assert torch.allclose(_scaled(x, eps * 16) * (weight * 16 ** 0.5), reference, atol=1e-12)


def test_fast_prefill_keeps_padding_finite_where_attention_gives_nan_to_a_query_that_sees_no_key(tiny, monkeypatch):
    """torch < 2.5 returns NaN for a query whose keys are all masked (a left-padding position in the prefill); its
    keys/values are cached, and a NaN there would survive the mask (0 * NaN) in every later step. Such an attention
    (a plain softmax) is swapped into the lean step here: still the transformers path's tokens and log-probs."""
    import types

    from stagewise_pl.rollout import fast_decode

    def softmax_attention(q, k, v, attn_mask=None, scale=None, enable_gqa=False):
        if enable_gqa:
            k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return torch.softmax(q @ k.transpose(-1, -2) * scale + attn_mask, -1) @ v

    patched = types.SimpleNamespace(**{name: getattr(torch.nn.functional, name)
                                       for name in dir(torch.nn.functional) if not name.startswith("__")})
    patched.scaled_dot_product_attention = softmax_attention
    monkeypatch.setattr(fast_decode, "F", patched)
    assert torch.softmax(torch.full((2,), float("-inf")), -1).isnan().all()  # what the plain softmax does
    model, tokenizer = tiny
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5+6-7", "7"])  # of different lengths: left padding
    _compare_paths(model, tokenizer, prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5,
                                                             logprobs=True))


def _record_draws(monkeypatch, engine, prompt, sampling):
    """(float32 logits, generator state before the draw, token) of every decoding step of one completion."""
    from stagewise_pl.rollout import hf

    steps, draw = [], hf.sample_next

    def spy(logits, params, generator, with_logprobs=True):
        state = generator.get_state()
        tokens, logp = draw(logits, params, generator, with_logprobs)
        steps.append((logits.float()[0].clone(), state, int(tokens[0])))
        return tokens, logp

    monkeypatch.setattr(hf, "sample_next", spy)
    batch = engine.generate([prompt], sampling)
    monkeypatch.setattr(hf, "sample_next", draw)
    return steps, batch


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_decode_in_half_precision_agrees_with_the_transformers_path_within_rounding(tiny, monkeypatch, dtype,
                                                                                         temperature):
    """In bf16/fp16 the lean step and the transformers path are two computations: their next-token distributions
    agree within the dtype's rounding at every step, and their tokens are equal until a step where the draw is a
    near-tie (greedy: the two best logits within rounding of each other; sampled: the uniform draw within the two
    paths' CDF disagreement of a boundary). Bit for bit only where one path runs twice. (Which kernels a CPU runs
    decides the last bits: equal log-probs held on one machine's CPU and not on another's.)"""
    import copy

    model, tokenizer = tiny
    half = copy.deepcopy(model).to(dtype)
    tol = 2 * torch.finfo(dtype).eps  # relative: four roundings of the dtype (eps is two)
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7", "12+9-3"])
    compared = 0
    for i, prompt in enumerate(prompts):
        sampling = SamplingParams(n=1, temperature=temperature, max_new_tokens=16, seed=3 + i, logprobs=True)
        fast, batch = _record_draws(monkeypatch, HFEngine(half, tokenizer, fast_decode=True), prompt, sampling)
        again = HFEngine(half, tokenizer, fast_decode=True).generate([prompt], sampling)
        assert again.completion_ids == batch.completion_ids and again.logprobs == batch.logprobs  # one path twice
        slow, _ = _record_draws(monkeypatch, HFEngine(half, tokenizer, fast_decode=False), prompt, sampling)
        for (lf, state, tf), (ls, _, ts) in zip(fast, slow):
            scale = max(1.0, float(lf.abs().max()))
            a, b = torch.log_softmax(lf, -1), torch.log_softmax(ls, -1)
            likely = (a.exp() > 1e-3) | (b.exp() > 1e-3)
            assert (a - b)[likely].abs().max() <= tol * scale, (i, float((a - b)[likely].abs().max()))
            compared += 1
            if tf == ts:
                continue
            if temperature <= 0:  # greedy: the two best logits are within rounding of each other
                assert abs(float(lf[tf] - lf[ts])) <= 2 * tol * scale and abs(float(ls[tf] - ls[ts])) <= 2 * tol * scale
            else:  # the same uniform drew both: it lies within the CDFs' disagreement of a boundary
                u = float(torch.rand(1, generator=torch.Generator().set_state(state)))
                cf, cs = torch.softmax(lf, -1).cumsum(-1), torch.softmax(ls, -1).cumsum(-1)
                band = float((cf - cs).abs().max()) + 1e-6
                assert float((cf - u * cf[-1]).abs().min()) <= band
            break  # after a near-tie the completions are different texts
    assert compared >= len(prompts) * 4


def test_fast_decode_on_a_llama_with_grouped_heads_and_biases(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagewise_pl.rollout import fast_decode

    _, tokenizer = tiny
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the init's zero biases would hide a bias the step dropped
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    assert fast_decode.supports(model)
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7"])
    _compare_paths(model, tokenizer, prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=4,
                                                             logprobs=True))


def test_unsupported_models_keep_the_transformers_path(tiny, monkeypatch):
    from stagewise_pl.rollout import fast_decode

    model, tokenizer = tiny
    monkeypatch.setattr(model.config, "use_sliding_window", True, raising=False)
    assert not fast_decode.supports(model)

    def refuse(*args, **kwargs):
        raise AssertionError("the lean step must not be used for this model")

    monkeypatch.setattr(fast_decode, "FastDecoder", refuse)
    batch = HFEngine(model, tokenizer).generate(render_prompts(tokenizer, ["1+2"]),
                                                SamplingParams(n=2, temperature=1.0, max_new_tokens=4))
    assert len(batch.completion_ids) == 2
