"""Training defaults by model size, invalid-answer reporting, and answering by scoring."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import OPPU
import task_LoRA
from oppu import cli
from oppu.answers import (
    answer,
    answer_log_likelihoods,
    answer_rows,
    candidates,
    constrained_answers,
    decision_points,
    greedy_choice,
    invalid_fraction,
    invalid_warning,
    score_answers,
)
from oppu.defaults import (
    EMBEDDED_PARAMS,
    PAPER,
    SMALL,
    defaults_for,
    epochs_for_min_steps,
    estimate_parameters,
    resolve_training_defaults,
)
from oppu.generation import DecodeConfig, generate
from oppu.tasks import get_task
from oppu.training import TrainConfig, encode_prompt, tokenize_and_mask, train
from prompts import format_target, is_valid_prediction
from utils import UserError

NEWS = get_task("news_categorize")
RATING = get_task("product_rating")


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    )


def smollm2_135m_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )


# --- defaults ----------------------------------------------------------------------------------


def test_parameter_estimates_match_the_published_sizes():
    assert estimate_parameters(llama2_7b_config()) == pytest.approx(6.74e9, rel=0.01)
    # the embedded model's real count (134,515,008) adds only the norms' 35,136 weights
    assert EMBEDDED_PARAMS - estimate_parameters(smollm2_135m_config()) == 35_136


@pytest.mark.parametrize("stage, epochs, min_steps", [("task_LoRA", 3, 0), ("OPPU", 2, 24)])
def test_embedded_model_gets_small_model_defaults(stage, epochs, min_steps):
    module = task_LoRA if stage == "task_LoRA" else OPPU
    args = module.parse_args(["--task_name", "news_categorize"] + (["--task_lora", "x"] if stage == "OPPU" else []))
    chosen = resolve_training_defaults(args, args.stage, EMBEDDED_PARAMS)
    assert chosen["defaults"] == "small-model"
    assert (args.learning_rate, args.batch_size, args.max_epoch, args.min_steps) == (1e-3, 8, epochs, min_steps)
    assert args.micro_batch_size == 8  # the whole batch in one pass: its shared prefix runs once


@pytest.mark.parametrize("task, stage, min_steps", [("LaMP_7", "OPPU", 48), ("tweet_paraphrase", "task_LoRA", 0)])
def test_tweets_get_a_higher_step_floor_with_small_models_only(task, stage, min_steps):
    module = task_LoRA if stage == "task_LoRA" else OPPU
    extra = ["--task_lora", "x"] if stage == "OPPU" else []
    args = module.parse_args(["--task_name", task] + extra)
    resolve_training_defaults(args, args.stage, EMBEDDED_PARAMS)
    assert args.min_steps == min_steps
    args = module.parse_args(["--task_name", task] + extra)
    resolve_training_defaults(args, args.stage, estimate_parameters(llama2_7b_config()))
    assert args.min_steps == 0  # the paper's values for 7B models: no floor
    args = module.parse_args(["--task_name", task, "--min_steps", "24"] + extra)
    resolve_training_defaults(args, args.stage, EMBEDDED_PARAMS)
    assert args.min_steps == 24  # a flag given wins


@pytest.mark.parametrize("stage, epochs", [("task_LoRA", 3), ("OPPU", 2)])
def test_llama2_7b_keeps_the_papers_values(stage, epochs):
    module = task_LoRA if stage == "task_LoRA" else OPPU
    args = module.parse_args(["--task_name", "LaMP_2N"] + (["--task_lora", "x"] if stage == "OPPU" else []))
    chosen = resolve_training_defaults(args, args.stage, estimate_parameters(llama2_7b_config()))
    assert chosen["defaults"] == "paper"
    assert (args.learning_rate, args.batch_size, args.max_epoch, args.min_steps) == (1e-4, 16, epochs, 0)
    assert args.micro_batch_size == 4


def test_paper_defaults_flag_and_explicit_flags_win():
    args = OPPU.parse_args(["--task_name", "LaMP_2N", "--task_lora", "x", "--paper_defaults", "--max_epoch", "5"])
    resolve_training_defaults(args, "OPPU", EMBEDDED_PARAMS)
    assert (args.learning_rate, args.batch_size, args.max_epoch, args.min_steps) == (1e-4, 16, 5, 0)
    args = OPPU.parse_args(["--task_name", "LaMP_2N", "--task_lora", "x", "--micro_batch_size", "2"])
    resolve_training_defaults(args, "OPPU", EMBEDDED_PARAMS)
    assert (args.batch_size, args.micro_batch_size) == (8, 2)
    assert defaults_for(None) is PAPER and defaults_for(10**8) is SMALL and defaults_for(10**8, paper=True) is PAPER


def test_validate_prints_and_the_config_records_the_resolved_values(capsys):
    args = OPPU.parse_args(["--task_name", "news_categorize", "--task_lora", "x"])
    cli.validate(args)
    line = capsys.readouterr().out
    assert line.startswith("OPPU: learning_rate 0.001, batch_size 8, max_epoch 2, min_steps 24")
    assert "small-model defaults for 135M parameters; --paper_defaults for the paper's" in line
    assert {"learning_rate": 1e-3, "batch_size": 8, "max_epoch": 2, "min_steps": 24}.items() <= vars(args).items()
    assert vars(args)["defaults"] == "small-model"


@pytest.mark.parametrize(
    "n, batch, epochs, min_steps, want",
    [(12, 16, 2, 0, 2), (12, 8, 2, 24, 12), (12, 8, 2, 4, 2), (400, 8, 2, 24, 2), (7, 8, 2, 5, 5), (0, 8, 2, 24, 24)],
)
def test_epochs_are_raised_until_a_user_gets_min_steps(n, batch, epochs, min_steps, want):
    assert epochs_for_min_steps(n, batch, epochs, min_steps) == want


# --- invalid answers ---------------------------------------------------------------------------


def test_invalid_fraction_and_warning_on_a_hand_made_predictions_file(tmp_path):
    path = tmp_path / "preds.json"
    outputs = {"a": "5", "b": "4.0", "c": "five stars", "d": "", "e": "3"}
    path.write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": k, "output": v} for k, v in outputs.items()]}))
    preds = {g["id"]: g["output"] for g in json.loads(path.read_text())["golds"]}
    assert invalid_fraction(RATING, preds) == pytest.approx(2 / 5)
    warning = invalid_warning(RATING, 0.4, "OPPU")
    assert warning.startswith("warning: OPPU: 40% of the answers are not a rating")
    assert "--learning_rate" in warning and "--min_steps" in warning and "--answer_mode score" in warning
    assert invalid_warning(RATING, 0.10, "OPPU") is None  # at the threshold: no warning
    base = invalid_warning(RATING, 1.0, "base model", trained=False)
    assert "without an adapter" in base and "--learning_rate" not in base
    assert invalid_fraction(NEWS, ["sports", "Sports", "sports.", "travel"]) == pytest.approx(0.5)
    assert invalid_fraction(NEWS, {}) == 0.0


def test_valid_predictions_follow_the_metrics():
    assert is_valid_prediction(get_task("citation"), "[2]") and not is_valid_prediction(get_task("citation"), "2")
    assert is_valid_prediction(RATING, " 3 ") and not is_valid_prediction(RATING, "nan")
    assert is_valid_prediction(get_task("news_headline"), "A headline")
    assert not is_valid_prediction(get_task("news_headline"), "  ")


# --- answering by scoring ----------------------------------------------------------------------


class BigramLM(torch.nn.Module):
    """A model whose next-token logits are a fixed table row of the current token: known logits."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, cache=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = self.table[input_ids]
        if isinstance(logits_to_keep, torch.Tensor):
            return SimpleNamespace(logits=logits[:, logits_to_keep], cache=[])
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits, cache=[])


def test_scoring_picks_the_label_the_known_logits_favour(tokenizer):
    prompt = "Which category? article: a quiet day.\nAnswer:"
    prompt_len = tokenize_and_mask(tokenizer, prompt, " x", 4096).labels.count(-100)
    last = tokenize_and_mask(tokenizer, prompt, " x", 4096).input_ids[prompt_len - 1]
    table = torch.zeros(len(tokenizer), len(tokenizer))
    for label, boost in (("travel", 4.0), ("crime", 6.0)):
        ids = tokenize_and_mask(tokenizer, prompt, format_target(label), 4096).input_ids[prompt_len:]
        assert len(ids) == 2  # one label token, then EOS: the boost decides
        table[last, ids[0]] = boost
    model = BigramLM(table)
    scores = answer_log_likelihoods(model, tokenizer, prompt, ["travel", "crime", "sports"])
    assert scores[1] > scores[0] > scores[2]
    assert score_answers(model, tokenizer, [prompt], NEWS.labels, show=False) == ["crime"]


def test_cached_scores_equal_full_forward_likelihoods(tiny_model, tokenizer):
    model = tiny_model(3)
    prompt = "Which category does this article relate to? article: The match ended in a draw.\nAnswer:"
    answers = list(NEWS.labels)
    got = answer_log_likelihoods(model, tokenizer, prompt, answers)
    for answer_text, score in zip(answers, got):
        enc = tokenize_and_mask(tokenizer, prompt, format_target(answer_text), 4096)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want = sum(float(logp[j - 1, enc.input_ids[j]]) for j, y in enumerate(enc.labels) if y != -100)
        assert score == pytest.approx(want, abs=1e-4)
    assert score_answers(model, tokenizer, [prompt], answers, show=False) == [
        answers[max(range(15), key=got.__getitem__)]
    ]


def test_decision_points_are_where_the_answers_branch():
    # two answers share their first token and part at the second; a third differs at once
    assert decision_points([[1, 2, 9], [1, 3, 9], [4, 9]]) == [(), (1,)]
    # a forced first token, then an answer that ends (EOS 9) where another goes on
    assert decision_points([[5, 9], [5, 6, 9]]) == [(5,)]
    assert decision_points([[7, 9]]) == []  # one answer: nothing to decide
    logp = {(): torch.tensor([0.0, -1.0, -5.0, -5.0, -0.5]), (1,): torch.tensor([0.0, 0.0, -3.0, -1.0, 0.0])}
    # token 4 (-0.5) is likelier than token 1 (-1.0): the third answer, without looking behind [1]
    assert greedy_choice([[1, 2, 9], [1, 3, 9], [4, 9]], logp) == 2
    logp[()][1] = 0.0  # now [1] leads, and behind it token 3 (-1.0) beats token 2 (-3.0)
    assert greedy_choice([[1, 2, 9], [1, 3, 9], [4, 9]], logp) == 1
    assert greedy_choice([[1, 9], [4, 9]], {(): torch.tensor([0.0, -2.0, 0.0, 0.0, -2.0])}) == 0  # tie: the earlier


def stepwise_constrained(model, tokenizer, prompt: str, answers, prompt_ids: list[int] | None = None) -> str:
    """The reference: greedy decoding one token at a time, every step through the whole sequence,
    its logits masked to the tokens that continue an answer still possible (``prompt_ids``: the
    prompt's tokens, if not all of them)."""
    full, tails = answer_rows(tokenizer, prompt, answers)
    prompt_ids = full if prompt_ids is None else prompt_ids
    alive, written = list(range(len(answers))), []
    while len(alive) > 1:
        n = len(written)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + written])).logits[0, -1]
        allowed = list(dict.fromkeys(tails[i][n] for i in alive))  # in the answers' order: ties go to the earlier
        token = max(allowed, key=lambda t: (float(logits[t]), -allowed.index(t)))
        written.append(token)
        alive = [i for i in alive if tails[i][n] == token]
    return answers[alive[0]]


# decision points at three depths: (), ("dark",), ("dark", " comedy") with the embedded tokenizer
NESTED = ("dark comedy", "dark comedy drama", "dark fantasy", "drama", "dystopia")


@pytest.mark.parametrize("task_name", ["news_categorize", "citation", "movie_tagging", "product_rating", "nested"])
def test_constrained_answers_equal_stepwise_masked_greedy(tiny_model, tokenizer, task_name):
    """Packed, behind the prompts' shared prefix (or not), in one pass or several: the answers of
    greedy decoding restricted to the task's answers, computed one step at a time. The task's
    labels branch at their first token (citation's behind "["); "nested" branches deeper."""
    answers = NESTED if task_name == "nested" else candidates(get_task(task_name))
    if task_name == "nested":
        assert len(decision_points(answer_rows(tokenizer, "x", answers)[1])) == 3
    prompts = [
        f"Which label fits? item: {text}\nAnswer:"
        for text in ("a bank robbery", "the cup final", "a week in Lisbon", "taxes rise", "new phone", "x")
    ]
    picked = set()
    for seed in (1, 2, 3):
        model = tiny_model(seed)
        want = [stepwise_constrained(model, tokenizer, p, answers) for p in prompts]
        picked.update(want)
        for shared_prefix, max_tokens in ((True, 512), (False, 512), (True, 20)):
            got = constrained_answers(
                model, tokenizer, prompts, answers, show=False, shared_prefix=shared_prefix, max_tokens=max_tokens
            )
            assert got == want, (seed, shared_prefix, max_tokens)
    assert len(picked) > 1  # the random models do not all answer the same: the comparison means something


def test_constrained_answers_cut_a_long_prompt_as_scoring_does(tiny_model, tokenizer):
    """Under a cut_off a prompt keeps what fits beside the longest answer, oldest text lost first
    (encode_prompts), and the answer is the step-by-step one behind the prompt so cut."""
    from oppu.training import encode_prompts

    model = tiny_model(2)
    prompts = [f"Which label fits? item: {'a long story ' * 40}{end}\nAnswer:" for end in ("crime", "a match")]
    longest = max(len(t) for t in answer_rows(tokenizer, prompts[0], NESTED)[1])
    cut = encode_prompts(tokenizer, prompts, 64 - longest, report=False)
    assert all(len(ids) == 64 - longest < len(encode_prompt(tokenizer, p)) for ids, p in zip(cut, prompts))
    want = [stepwise_constrained(model, tokenizer, p, NESTED, ids) for p, ids in zip(prompts, cut)]
    assert constrained_answers(model, tokenizer, prompts, NESTED, show=False, cut_off=64) == want


def test_scoring_equals_generation_where_the_model_is_confident(tiny_model, tokenizer):
    model = tiny_model()  # every weight trains: the tiny model memorises three answers quickly
    topics = [("a bank robbery", "crime"), ("the final match", "sports"), ("a cheap flight", "travel")]
    prompts = [f"What is this article about? article: {t}\nAnswer:" for t, _ in topics]
    examples = [tokenize_and_mask(tokenizer, p, format_target(y), 256) for p, (_, y) in zip(prompts, topics)]
    cfg = TrainConfig(learning_rate=1e-2, batch_size=3, micro_batch_size=3, max_epoch=30, warmup_ratio=0.0)
    train(model, tokenizer, examples, cfg)
    generated = generate(model, tokenizer, prompts, DecodeConfig(max_new_tokens=8), show=False)
    assert [g.strip() for g in generated] == [y for _, y in topics]  # confident: it learnt the answers
    scored = answer(model, tokenizer, NEWS, prompts, DecodeConfig(), mode="score", show=False)
    assert scored == [y for _, y in topics]
    constrained = answer(model, tokenizer, NEWS, prompts, DecodeConfig(), mode="constrained", show=False)
    assert constrained == [y for _, y in topics]


def test_rating_candidates_and_score_mode_refused_for_generation_tasks():
    from utils import UserError

    assert candidates(RATING) == ("1", "2", "3", "4", "5") and candidates(NEWS) == NEWS.labels
    for mode in ("score", "constrained"):
        args = OPPU.parse_args(["--task_name", "news_headline", "--task_lora", "x", "--answer_mode", mode])
        with pytest.raises(UserError, match=f"answer_mode {mode} needs a task with fixed answers"):
            cli.validate(args)
        with pytest.raises(UserError, match=f"answer_mode {mode} needs a task with fixed answers"):
            cli.check_answer_mode(mode, get_task("news_headline"))  # generate.py's check, the same function
        cli.check_answer_mode(mode, NEWS)
    cli.check_answer_mode("generate", get_task("news_headline"))
    cli.check_answer_mode(None, get_task("news_headline"))  # generate.py: the PEFT's own run's mode


def test_task_adapter_is_reused_across_ways_of_answering(tmp_path):
    from oppu.adapters import ADAPTER_WEIGHTS
    from oppu.runs import CONFIG_FILE, public_config, training_config
    from utils import write_json

    config = {"task_name": "product_rating", "learning_rate": 1e-3, "answer_mode": "generate", "retrieval": "most"}
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"")
    write_json(tmp_path / CONFIG_FILE, public_config(config) | {"final_loss": 0.5})  # as older runs saved it
    for answering in ({"answer_mode": "score"}, {"retrieval": "least"}, {"max_new_tokens": 3, "do_sample": True}):
        assert task_LoRA.reusable_adapter(tmp_path, training_config(config | answering))
    assert not task_LoRA.reusable_adapter(tmp_path, training_config(config | {"learning_rate": 1e-4}))


def test_a_task_adapter_trained_otherwise_is_not_replaced_without_overwrite(tmp_path):
    from oppu.adapters import ADAPTER_WEIGHTS
    from oppu.runs import CONFIG_FILE, public_config
    from utils import UserError, write_json

    config = {"task_name": "product_rating", "learning_rate": 1e-3, "seed": 0, "answer_mode": "generate"}
    task_LoRA.check_adapter_folder(tmp_path, config | {"seed": 42}, overwrite=False)  # nothing finished there
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"weights")
    write_json(tmp_path / CONFIG_FILE, public_config(config) | {"final_loss": 0.5})
    task_LoRA.check_adapter_folder(tmp_path, config | {"answer_mode": "score"}, overwrite=False)  # reused
    with pytest.raises(UserError, match=r"other settings \(seed: 0 -> 42\); use --overwrite"):
        task_LoRA.check_adapter_folder(tmp_path, config | {"seed": 42}, overwrite=False)
    task_LoRA.check_adapter_folder(tmp_path, config | {"seed": 42}, overwrite=True)
    assert (tmp_path / ADAPTER_WEIGHTS).read_bytes() == b"weights"


def test_personal_only_flags_leave_the_task_adapter_as_it_is(tmp_path):
    from oppu import grid
    from oppu.runs import training_config

    data = tmp_path / "others.json"
    data.write_text("[]")
    argv = ["--task_name", "product_rating"]
    plain = task_LoRA.stage_config(task_LoRA.parse_args(argv), RATING, [data])
    steps = task_LoRA.stage_config(task_LoRA.parse_args(argv + ["--min_steps", "72"]), RATING, [data])
    assert "min_steps" not in steps and training_config(plain) == training_config(steps)
    assert grid.answer_only(("--min_steps", "72"))


def test_oppu_and_serving_refuse_a_4bit_base(monkeypatch):
    """Merging the task adapter into 4-bit weights rounds it away: OPPU.py and generate.py stop
    before loading anything; task_LoRA.py (QLoRA) passes the check."""
    import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the check for a GPU
    with pytest.raises(UserError, match="a 4-bit base rounds most of a LoRA's change away"):
        cli.validate(OPPU.parse_args(["--task_name", "LaMP_2N", "--task_lora", "x", "--load_in_4bit"]))
    cli.validate(task_LoRA.parse_args(["--task_name", "LaMP_2N", "--load_in_4bit"]))
    with pytest.raises(UserError, match="OPPU merges the task adapter into the base"):
        generate.main(["--peft", "nowhere", "--input", "hello", "--load_in_4bit"])


def test_scoring_cuts_a_long_prompt_so_that_the_longest_answer_fits_cut_off(tiny_model, tokenizer, capsys):
    """Each answer is scored behind the prompt a training example would keep at --cut_off less the
    longest answer's tokens."""
    model = tiny_model(3)
    prompt = "Which category does this article relate to? article: " + "The match ended in a draw. " * 12 + "\nAnswer:"
    answers = ["crime", "sports", "world news"]
    tails = answer_rows(tokenizer, prompt, answers)[1]
    budget = len(encode_prompt(tokenizer, prompt)) // 2
    cut_off = budget + max(len(t) for t in tails)
    chosen = score_answers(model, tokenizer, [prompt], answers, show=False, cut_off=cut_off)
    assert f"1 of 1 prompts were cut to {budget} tokens" in capsys.readouterr().err
    want = []
    for answer_text, tail in zip(answers, tails):
        enc = tokenize_and_mask(tokenizer, prompt, format_target(answer_text), budget + len(tail))
        assert enc.labels.count(-100) == budget
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([enc.input_ids])).logits[0].float(), -1)
        want.append(sum(float(logp[j - 1, enc.input_ids[j]]) for j, y in enumerate(enc.labels) if y != -100))
    assert chosen == [answers[max(range(3), key=want.__getitem__)]]
