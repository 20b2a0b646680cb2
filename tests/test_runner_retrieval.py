"""task=retrieval: the RULER-style prompt generators keep their documented formats and lengths,
the Wilson interval, the teacher-forced scorer agrees with greedy generation, the task end to
end on a tiny random model, and bad values fail with their key."""

import json
import math
import random
import re

import pytest
import torch
from test_runner import PNG_MAGIC, SPARSE, composed, rows_by_method, run

import flex_pbs.runner.models
from flex_pbs.runner import session
from flex_pbs.runner.checks import ConfigError
from flex_pbs.runner.retrieval_data import (
    HAYSTACKS,
    SUBTASKS,
    PromptStyle,
    count_tokens,
    multikey,
    multivalue,
    retrieval_prompt,
    variable_tracking,
)
from flex_pbs.runner.schema import validate
from flex_pbs.runner.session import byte_tokenizer, load_session
from flex_pbs.runner.tasks.common import Method
from flex_pbs.runner.tasks.retrieval import (
    Case,
    score,
    teacher_forced_argmax,
    wilson_interval,
)

NUMBER_NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")
ASSIGNMENT = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")
# The haystack is cut at a word: a prompt falls short of its length by at most one word and its
# space, a few bytes (at most ~20 in these texts) with the byte tokenizer.
WORD_TOKENS = 24
SEEDS = range(4)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("seed", SEEDS)
def test_multikey_answer_is_the_number_of_the_asked_key(tokenizer, seed):
    prompt, answer = multikey(tokenizer, 1500, random.Random(seed), needles=5, digits=6)
    (asked,) = re.findall(r"What is the special magic number for (\S+) mentioned in the provided text\?", prompt)
    needles = NUMBER_NEEDLE.findall(prompt)
    keys = [key for key, _ in needles]
    assert len(needles) == 5 and len(set(keys)) == 5  # the distractors' keys differ from the asked one
    assert [key for key in keys if key == asked] == [asked]
    assert answer == " " + dict(needles)[asked] and len(answer) == 7
    assert prompt.endswith(f" The special magic number for {asked} is:")


@pytest.mark.parametrize("seed", SEEDS)
def test_multivalue_answer_lists_every_number_in_order_of_appearance(tokenizer, seed):
    prompt, answer = multivalue(tokenizer, 1500, random.Random(seed), needles=3, digits=5)
    needles = NUMBER_NEEDLE.findall(prompt)
    assert len(needles) == 3 and len({key for key, _ in needles}) == 1
    assert len({number for _, number in needles}) == 3
    assert answer == " " + ", ".join(number for _, number in needles)
    assert prompt.endswith(f" The special magic numbers for {needles[0][0]} mentioned in the provided text are:")


def chains_of(prompt):
    """The variables holding each value, in order of assignment, from the prompt's statements."""
    holders, chains = {}, {}
    for name, source, value in ASSIGNMENT.findall(prompt):
        value = value or holders[source]  # a copy must come after its source's assignment
        holders[name] = value
        chains.setdefault(value, []).append(name)
    return chains


@pytest.mark.parametrize("seed", SEEDS)
def test_variable_tracking_answer_is_the_asked_chain_in_assignment_order(tokenizer, seed):
    prompt, answer = variable_tracking(tokenizer, 1500, random.Random(seed), chains=2, hops=3, digits=5)
    (asked,) = re.findall(r"Find all variables that are assigned the value (\d+) in the text above", prompt)
    chains = chains_of(prompt)
    names = [name for chain in chains.values() for name in chain]
    assert len(chains) == 2 and len(names) == len(set(names)) == 8
    assert answer == " " + ", ".join(chains[asked])
    assert prompt.endswith(f"4 variables are assigned the value {asked}, they are:")


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("subtask", SUBTASKS)
def test_prompt_and_answer_meet_the_requested_length(tokenizer, subtask, haystack):
    for length in (700, 1200, 2500):
        prompt, answer = retrieval_prompt(subtask, tokenizer, length, random.Random(length), style=PromptStyle(haystack))
        tokens = count_tokens(tokenizer, prompt) + count_tokens(tokenizer, answer)
        assert length - WORD_TOKENS <= tokens <= length


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_generators_are_pure_functions_of_their_seed(tokenizer, subtask):
    first, again, other = (retrieval_prompt(subtask, tokenizer, 900, random.Random(seed)) for seed in (3, 3, 4))
    assert first == again and first != other


def test_needles_spread_over_the_haystack(tokenizer):
    """Needles at random depths: over a few prompts they land in each third of the context."""
    thirds = set()
    for seed in range(6):
        prompt, _ = multikey(tokenizer, 3000, random.Random(seed), needles=4)
        thirds |= {3 * m.start() // len(prompt) for m in NUMBER_NEEDLE.finditer(prompt)}
    assert thirds == {0, 1, 2}


def test_chat_style_puts_the_question_in_the_chat_template(tokenizer):
    chat = byte_tokenizer()
    chat.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    prompt, answer = multikey(chat, 1200, random.Random(0), needles=2, style=PromptStyle(chat=True))
    assert prompt.startswith("<user>Some special magic numbers are hidden")
    assert re.search(r"mentioned in the provided text\?</user><assistant>The special magic number for \S+ is:$", prompt)
    assert count_tokens(chat, prompt + answer) <= 1200
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        multikey(tokenizer, 1200, random.Random(0), style=PromptStyle(chat=True))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: multikey(t, 200, random.Random(0), needles=4), r"length 200 cannot hold the question, needles and answer"),
        (lambda t: multikey(t, 0, random.Random(0)), r"length must be a positive int, got 0"),
        (lambda t: multikey(t, 900, random.Random(0), needles=11, digits=1), r"cannot draw 11 distinct 1-digit numbers"),
        (lambda t: multivalue(t, 900, random.Random(0), needles=0), r"needles must be a positive int, got 0"),
        (lambda t: variable_tracking(t, 900, random.Random(0), hops=0), r"hops must be a positive int, got 0"),
        (lambda t: PromptStyle(haystack="poetry"), r"haystack must be one of \('repeat', 'prose'\)"),
        (lambda t: retrieval_prompt("qa", t, 900, random.Random(0)), r"subtask must be one of"),
    ],
)
def test_generators_refuse_impossible_requests(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(tokenizer)


# ------------------------------------------------------------------------------------ scoring


def test_wilson_interval_known_values():
    # Wilson (1927) score interval, z = 1.96: e.g. Newcombe (1998), Brown, Cai & DasGupta (2001).
    assert wilson_interval(40, 50) == pytest.approx((0.6696, 0.8876), abs=1e-4)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


@pytest.mark.parametrize("correct, trials", [(1, 7), (13, 50), (33, 40)])
def test_wilson_bounds_are_where_the_score_test_is_borderline(correct, trials):
    """Each bound p solves |p_hat - p| = z * sqrt(p (1 - p) / n), the interval's definition."""
    rate = correct / trials
    for bound in wilson_interval(correct, trials):
        assert abs(rate - bound) == pytest.approx(1.959964 * math.sqrt(bound * (1 - bound) / trials), rel=1e-6)


@pytest.mark.parametrize("correct, trials", [(3, 2), (-1, 5), (0, 0)])
def test_wilson_interval_refuses_impossible_counts(correct, trials):
    with pytest.raises(ValueError, match="need 0 <= correct <= trials and trials > 0"):
        wilson_interval(correct, trials)


TINY_RETRIEVAL = ["model=tiny_llama", "seq_len=700", "task=retrieval", f"task.subtasks=[{','.join(SUBTASKS)}]",
                  "task.trials=2", "task.multikey_needles=2", "task.multivalue_needles=2", "task.digits=5"]


def test_teacher_forced_scoring_agrees_with_greedy_generation():
    from transformers import GenerationConfig

    spec = validate(composed(TINY_RETRIEVAL))
    loaded = load_session(spec)
    prompt = torch.randint(0, 259, (1, 300), generator=torch.Generator().manual_seed(0))
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        generated = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)
    answer = generated[:, 300:]
    dense = Method("dense", None)
    predicted, stats = teacher_forced_argmax(loaded, dense, spec, prompt, answer)
    assert torch.equal(predicted, answer[0]) and stats is None
    wrong = answer.clone()
    wrong[0, 3] = (wrong[0, 3] + 1) % loaded.model.config.vocab_size
    assert score(loaded, dense, spec, Case("multikey", 306, 0, prompt, answer, "greedy"))["correct"]
    assert not score(loaded, dense, spec, Case("multikey", 306, 0, prompt, wrong, "wrong"))["correct"]


# ------------------------------------------------------------------------------------ the task


def test_retrieval_task(tmp_path):
    payload = run([*TINY_RETRIEVAL, *SPARSE], tmp_path)
    assert [(r["method"], r["subtask"], r["length"]) for r in payload["rows"]] == [
        (method, subtask, 700) for method in ("dense", "pbs") for subtask in SUBTASKS
    ]
    for row in payload["rows"]:
        trials = [t for t in payload["details"][row["method"]] if t["subtask"] == row["subtask"]]
        assert row["trials"] == len(trials) == 2 and row["correct"] == sum(t["correct"] for t in trials)
        assert row["accuracy"] == row["correct"] / 2
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(row["correct"], 2))
        # The byte tokenizer has a token per character of the (ASCII) answer.
        assert all(700 - WORD_TOKENS <= t["prompt_tokens"] + len(t["answer"]) <= 700 for t in trials)
    rows = {(r["method"], r["subtask"]): r for r in payload["rows"]}
    for subtask in SUBTASKS:
        dense, pbs = rows["dense", subtask], rows["pbs", subtask]
        assert dense["delta_points"] == 0 and pbs["delta_points"] == 100 * (pbs["accuracy"] - dense["accuracy"])
        assert dense["density"] == 1.0 and 0 < pbs["density"] < 1
    # The same prompts for every method.
    answers = {m: [(t["subtask"], t["answer"], t["prompt_tokens"]) for t in payload["details"][m]] for m in ("dense", "pbs")}
    assert answers["dense"] == answers["pbs"]
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_threshold_one_retrieval_predicts_as_dense(tmp_path):
    payload = run([*TINY_RETRIEVAL, "task.subtasks=[multikey]", "method.threshold=1.0"], tmp_path)
    dense, pbs = (payload["details"][m] for m in ("dense", "pbs"))
    assert [t["predicted"] for t in pbs] == [t["predicted"] for t in dense]
    assert rows_by_method(payload)["pbs"]["density"] == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.subtasks=[qa]"], r"task.subtasks\[\]: unknown subtask 'qa'; choose from \['multikey'"),
        (["task.subtasks=[]"], r"task.subtasks must list at least one of"),
        (["task.subtasks=[multikey,multikey]"], r"task.subtasks lists a subtask twice"),
        (["task.lengths=[0]"], r"task.lengths\[\] must be > 0, got 0"),
        (["task.trials=0"], r"task.trials must be > 0, got 0"),
        (["task.haystack=poetry"], r"task.haystack must be one of \['repeat', 'prose'\], got 'poetry'"),
        (["task.variable_hops=0"], r"task.variable_hops must be > 0, got 0"),
        (["task.digits=19"], r"task.digits must be <= 18, got 19"),
        (["task.digits=1", "task.multikey_needles=10"], r"task.digits=1 has too few distinct numbers for 10 needles"),
    ],
)
def test_bad_retrieval_config_fails_before_any_model_loads(monkeypatch, tmp_path, overrides, message):
    loads = []
    monkeypatch.setattr(flex_pbs.runner.models, "random_model", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(session, "_LOADED", {})
    with pytest.raises(ConfigError, match=message):
        run([*TINY_RETRIEVAL, *overrides], tmp_path)
    assert loads == [] and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.chat_template=true"], r"task.chat_template=true but model tiny_llama's tokenizer has no chat template"),
        (["task.lengths=[200]"], r"task.lengths\[\]=200, task.subtasks\[\]=multikey: length 200 cannot hold"),
    ],
)
def test_prompts_the_model_cannot_take_fail_with_their_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run([*TINY_RETRIEVAL, *overrides], tmp_path)


@pytest.mark.slow
def test_retrieval_under_torchrun_equals_one_process(tmp_path):
    from test_tensor_parallel import distributed

    args = [*TINY_RETRIEVAL, *SPARSE]
    done = distributed(2, "-m", "flex_pbs.runner.cli", "tp=2", *args, f"hydra.run.dir={tmp_path / 'tp'}",
                       timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = json.loads((tmp_path / "tp" / "results.json").read_text())["details"]
    one = run(args, tmp_path / "one")["details"]
    for method in ("dense", "pbs"):
        assert [(t["predicted"], t["correct"]) for t in sharded[method]] == [(t["predicted"], t["correct"]) for t in one[method]]
        assert [t["density"] for t in sharded[method]] == pytest.approx([t["density"] for t in one[method]], rel=1e-6)
    assert max(t["density"] for t in one["pbs"]) < 1
