"""Profiles for PAG: seeded history samples, aligned and resumable files, retries of empty ones."""

from __future__ import annotations

import json

import pytest

import gen_profile
from oppu import profiles
from oppu.data import PROFILE_CONFIG_FILE, PROFILE_USERS_KEY, load_profiles
from oppu.generation import DecodeConfig
from oppu.tasks import get_task
from prompts import profile_prompt
from utils import UserError, read_json

TASK = get_task("news_categorize")


def user(uid: str, n_history: int) -> dict:
    items = [
        {"id": f"{uid}h{i}", "text": f"text {i}", "title": f"title {i}", "category": "sports"} for i in range(n_history)
    ]
    return {"user_id": uid, "profile": items, "query": [{"id": f"{uid}q", "input": "x", "gold": "sports"}]}


USERS = [user("a", 5), user("b", 3), user("c", 0), user("d", 2)]


def fake_make(calls: list):
    """A profile maker that needs no model: 'profile of <id>' (empty for users without history)."""

    def make(batch):
        calls.append([u["user_id"] for u in batch])
        return [f"profile of {u['user_id']}" if u["profile"] else "" for u in batch], 0

    return make


def test_sample_is_seeded_most_recent_first_and_capped():
    sample = profiles.sample_history(USERS[0], 3, seed=1)
    ids = [int(it["id"].split("h")[1]) for it in sample]
    assert len(ids) == 3 and ids == sorted(ids, reverse=True)
    assert profiles.sample_history(USERS[0], 3, seed=1) == sample
    assert len(profiles.sample_history(USERS[1], 10, seed=1)) == 3  # fewer items than asked: all of them
    assert profiles.sample_history(USERS[2], 10, seed=1) == []


def test_profile_prompt_lists_items_then_asks():
    prompt = profile_prompt(TASK, profiles.sample_history(USERS[1], 2, seed=0))
    assert prompt.startswith("Past items of one user, most recent first:\n1. the category for the article:")
    assert "\n2. " in prompt and "\n3. " not in prompt
    assert prompt.endswith("writes about most. Answer with the description only.")


def test_file_is_aligned_and_loads_for_the_stages(tmp_path):
    path = tmp_path / "profile_user_100.json"
    counts = profiles.profile_file(path, USERS, fake_make([]), batch_size=3)
    entries = json.loads(path.read_text())
    assert [e["user_id"] for e in entries] == ["a", "b", "c", "d"]
    assert load_profiles(path, USERS) == ["profile of a", "profile of b", "", "profile of d"]
    assert (counts.written, counts.kept, counts.empty) == (4, 0, 1)


def test_resume_keeps_finished_users_and_max_users_stops_early(tmp_path):
    path = tmp_path / "p.json"
    calls: list = []
    first = profiles.profile_file(path, USERS, fake_make(calls), batch_size=1, max_users=2)
    assert calls == [["a"], ["b"]] and first.written == 2
    assert [e["user_id"] for e in json.loads(path.read_text())] == ["a", "b"]
    calls.clear()
    second = profiles.profile_file(path, USERS, fake_make(calls), batch_size=2)
    assert calls == [["c", "d"]] and (second.kept, second.written, second.empty) == (2, 2, 1)
    calls.clear()
    profiles.profile_file(path, USERS, fake_make(calls), batch_size=2)
    assert calls == []


def test_paper_format_without_user_ids_is_accepted_by_position(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"output": "old a"}]))
    calls: list = []
    profiles.profile_file(path, USERS, fake_make(calls), batch_size=4)
    assert calls == [["b", "c", "d"]]
    assert json.loads(path.read_text())[0] == {"user_id": "a", "output": "old a"}


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"user_id": "b", "output": "x"}], "profile 0 is for user 'b' but user 0 is 'a'"),
        ([{"output": "x"}] * 5, "5 profiles for 4 users"),
        ([{"user_id": "a"}], "profile 0: expected an object with a string 'output'"),
    ],
)
def test_misaligned_file_is_rejected(tmp_path, entries, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(UserError, match=message):
        profiles.profile_file(path, USERS, fake_make([]), batch_size=2)
    assert json.loads(path.read_text()) == entries  # left untouched
    profiles.profile_file(path, USERS, fake_make([]), batch_size=2, overwrite=True)
    assert len(json.loads(path.read_text())) == 4


def test_empty_profile_is_retried_once_with_sampling(monkeypatch):
    """Greedy gives '' for a, 'ok' for b; the retry (sampling) gives a its profile. A user
    without history gets '' without a prompt."""
    calls = []

    def fake_generate(model, tokenizer, prompts, cfg, **kwargs):
        calls.append((len(prompts), cfg.do_sample))
        return ["  ", "ok\nsecond line"] if not cfg.do_sample else ["sampled  profile"]

    monkeypatch.setattr(profiles, "generate", fake_generate)
    texts, retried = profiles.generate_profiles(None, None, TASK, [USERS[0], USERS[2], USERS[1]], 3, 0, DecodeConfig())
    assert texts == ["sampled profile", "", "ok second line"] and retried == 1
    assert calls == [(2, False), (1, True)]


def test_a_prompt_over_the_context_leaves_out_the_oldest_sampled_items(tokenizer, monkeypatch):
    """A model whose context holds the 3 most recent of 5 sampled items and a profile of
    max_new_tokens: the oldest go until the prompt and its answer fit, and the profile is decoded
    under that context (generate() cuts a single item that overflows; a larger cut_off asked for
    is held to the context)."""
    from types import SimpleNamespace

    from oppu.training import encode_prompt

    items = profiles.sample_history(USERS[0], 5, 0)  # most recent first
    assert profiles.fitting_profile_prompt(TASK, items) == profile_prompt(TASK, items)  # no budget: all
    sizes = [len(encode_prompt(tokenizer, profile_prompt(TASK, items[:n]))) for n in range(1, 6)]
    budget = sizes[2]  # room for the 3 most recent items
    assert profiles.fitting_profile_prompt(TASK, items, tokenizer, budget) == profile_prompt(TASK, items[:3])
    assert profiles.fitting_profile_prompt(TASK, items, tokenizer, 1) == profile_prompt(TASK, items[:1])
    seen = []
    monkeypatch.setattr(profiles, "generate", lambda m, t, prompts, cfg, **kw: seen.append((prompts, cfg)) or ["p"])
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=sizes[2] + 16))
    texts, _ = profiles.generate_profiles(model, tokenizer, TASK, [USERS[0]], 5, 0, DecodeConfig(max_new_tokens=16))
    assert texts == ["p"] and seen[0][0] == [profile_prompt(TASK, items[:3])] and seen[0][1].cut_off == sizes[2] + 16
    seen.clear()
    profiles.generate_profiles(model, tokenizer, TASK, [USERS[0]], 5, 0, DecodeConfig(max_new_tokens=16, cut_off=10**6))
    assert seen[0][1].cut_off == sizes[2] + 16
    seen.clear()
    profiles.generate_profiles(None, tokenizer, TASK, [USERS[0]], 5, 0, DecodeConfig(max_new_tokens=16))
    assert seen[0][0] == [profile_prompt(TASK, items)] and seen[0][1].cut_off is None  # no context known: all


def test_script_rejects_a_misaligned_file_before_loading_a_model(tmp_path):
    folder = tmp_path / TASK.name
    folder.mkdir()
    (folder / "user_top_100_history.json").write_text(json.dumps(USERS[:2]))
    (folder / "user_others.json").write_text(json.dumps([user("o", 1)]))
    (folder / "profile_user_100.json").write_text(json.dumps([{"user_id": "zz", "output": "x"}]))
    with pytest.raises(UserError, match="does not line up with the users"):
        gen_profile.main(["--task_name", TASK.name, "--data_dir", str(tmp_path)])


def test_label_mentions_counts_any_label_and_the_users_usual_one():
    def with_labels(uid: str, labels: list[str]) -> dict:
        items = [{"id": f"{uid}{i}", "text": "t", "title": "t", "category": c} for i, c in enumerate(labels)]
        return {"user_id": uid, "profile": items, "query": []}

    users = [
        with_labels("a", ["sports", "sports", "politics"]),  # usual: sports
        with_labels("b", ["food & drink", "travel"]),  # tie: the first seen, food & drink
        with_labels("c", ["crime"]),
        with_labels("d", ["women"]),
        with_labels("e", []),  # no history: not checked
    ]
    texts = [
        "Writes about Sports and some politics.",  # usual label, any case
        "Mostly travel pieces; also Food & Drink.",  # usual label with its '&'
        "Covers crimes and courts.",  # 'crimes' is not the label 'crime'
        "",  # empty profile: not checked
        "Writes about sports.",
    ]
    m = profiles.label_mentions(TASK, users, texts)
    assert (m.profiles, m.any_label, m.usual_label) == (3, 2, 2)
    assert profiles.label_mentions(get_task("news_headline"), users, texts) is None
    assert profiles.label_mentions(get_task("citation"), users, texts) is None


def test_gen_profile_reports_label_mentions_of_finished_files(tmp_path, capsys):
    folder = tmp_path / TASK.name
    folder.mkdir()
    test_users = [user("a", 2), user("b", 1)]
    (folder / "user_top_100_history.json").write_text(json.dumps(test_users))
    (folder / "user_others.json").write_text(json.dumps([user("o", 1)]))
    (folder / "profile_user_100.json").write_text(
        json.dumps([{"user_id": "a", "output": "a sports writer"}, {"user_id": "b", "output": "writes"}])
    )
    (folder / "profile_user_others.json").write_text(json.dumps([{"user_id": "o", "output": "politics"}]))
    gen_profile.main(["--task_name", TASK.name, "--data_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "profile_user_100.json: of 2 profiles, 1 name a label of the task and 1 the user's most frequent" in out
    assert "profile_user_others.json: of 1 profiles, 1 name a label of the task and 0 the user's most frequent" in out


def profiled_folder(tmp_path):
    """A task folder with one test and one other user, their profiles and gen_profile.py's config
    for them: (the folder, gen_profile's argv, the config)."""
    folder = tmp_path / TASK.name
    folder.mkdir()
    (folder / "user_top_100_history.json").write_text(json.dumps([user("a", 2)]))
    (folder / "user_others.json").write_text(json.dumps([user("o", 1)]))
    (folder / "profile_user_100.json").write_text(json.dumps([{"user_id": "a", "output": "writes"}]))
    (folder / "profile_user_others.json").write_text(json.dumps([{"user_id": "o", "output": "writes"}]))
    argv = ["--task_name", TASK.name, "--data_dir", str(tmp_path)]
    config = gen_profile.profile_config(gen_profile.parse_args(argv), TASK, folder)
    (folder / PROFILE_CONFIG_FILE).write_text(json.dumps(config))
    return folder, argv, config


def test_profiles_of_rewritten_user_files_are_rejected_and_an_old_config_is_kept(tmp_path):
    folder, argv, config = profiled_folder(tmp_path)
    gen_profile.main(argv)  # the same user files: the profiles are kept
    (folder / PROFILE_CONFIG_FILE).write_text(json.dumps({k: v for k, v in config.items() if k != PROFILE_USERS_KEY}))
    (folder / "user_top_100_history.json").write_text(json.dumps([user("a", 3)]))
    gen_profile.main(argv)  # a config from before the hashes were recorded cannot tell: kept
    (folder / PROFILE_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError, match="made from other user files in this folder; use --overwrite"):
        gen_profile.main(argv)


def test_a_retry_depends_on_its_user_only(monkeypatch):
    """Each empty profile is retried alone under its own seed, so a user's retry is the same
    whichever users share its batch (a --max_users run, then the rest on resume)."""
    import torch

    def fake_generate(model, tokenizer, prompts, cfg, **kwargs):
        if not cfg.do_sample:
            return [""] * len(prompts)
        return [f"profile {int(torch.randint(10**9, (1,)))}" for _ in prompts]  # what the seed gives

    monkeypatch.setattr(profiles, "generate", fake_generate)
    together, retried = profiles.generate_profiles(None, None, TASK, [USERS[0], USERS[1]], 3, 0, DecodeConfig())
    alone, _ = profiles.generate_profiles(None, None, TASK, [USERS[1]], 3, 0, DecodeConfig())
    assert retried == 2 and together[1] == alone[0] and together[0] != together[1]


def test_no_users_asked_for_writes_nothing_and_loads_no_model(tmp_path):
    folder = tmp_path / TASK.name
    folder.mkdir()
    (folder / "user_top_100_history.json").write_text(json.dumps(USERS[:2]))
    (folder / "user_others.json").write_text(json.dumps([user("o", 1)]))
    counts = gen_profile.main(
        ["--task_name", TASK.name, "--data_dir", str(tmp_path), "--overwrite", "--max_users", "0"]
    )
    assert [c.kept + c.written for c in counts.values()] == [0, 0]
    assert not list(folder.glob("profile_user_*.json"))


def test_overwrite_drops_the_old_profiles_before_its_config_is_written(tmp_path, monkeypatch):
    """A --overwrite run killed half-way leaves no profile of the old run under the new config,
    which a resume would otherwise keep as its own."""
    folder = tmp_path / TASK.name
    folder.mkdir()
    (folder / "user_top_100_history.json").write_text(json.dumps([user("a", 2)]))
    (folder / "user_others.json").write_text(json.dumps([user("o", 1)]))
    for name, who in (("profile_user_100.json", "a"), ("profile_user_others.json", "o")):
        (folder / name).write_text(json.dumps([{"user_id": who, "output": "an old model's profile"}]))
    monkeypatch.setattr(gen_profile, "load_model", lambda spec: (None, None))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen_profile, "generate_profiles", killed)
    argv = ["--task_name", TASK.name, "--data_dir", str(tmp_path), "--overwrite", "--num_history", "2"]
    with pytest.raises(KeyboardInterrupt):
        gen_profile.main(argv)
    assert not list(folder.glob("profile_user_*.json"))
    assert read_json(folder / PROFILE_CONFIG_FILE)["num_history"] == 2


def test_the_stages_refuse_profiles_made_from_an_earlier_user_file(tmp_path):
    """prepare_data rewrites user files and leaves the profiles: a stage with --add_profile stops
    where gen_profile.py recorded other user files than the ones there now."""
    import argparse

    from oppu import cli

    folder, argv, config = profiled_folder(tmp_path)
    args = argparse.Namespace(data_dir=str(tmp_path), add_profile=True, user_stride=1, max_users=-1)
    assert cli.load_test_users(args, TASK)[1] == ["writes"] and cli.load_other_users(args, TASK)[1] == ["writes"]
    (folder / "user_top_100_history.json").write_text(json.dumps([user("a", 3)]))
    with pytest.raises(UserError, match="profile_user_100.json: made from an earlier user_top_100_history.json"):
        cli.load_test_users(args, TASK)
    assert cli.load_other_users(args, TASK)[1] == ["writes"]  # its own file did not change
