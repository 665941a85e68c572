"""Cookbook part two: a model as the grader (rl_grader), debate, and a text game. Smoke runs of each recipe
against the session tinkerd, plus the pure logic they rest on (the game, the truth the grader is not shown,
zero-sum rewards). The learning results are in each recipe's README."""

from __future__ import annotations

import json
import math
import random
import types

import pytest

from cookbook.debate import train as debate
from cookbook.rl_grader import train as rl_grader
from cookbook.text_game import train as text_game
from cookbook.text_game.env import TextGame, parse_command, reactive_action

pytestmark = pytest.mark.slow


def _metrics(log_dir) -> list[dict]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows, "no metrics written"
    assert all(math.isfinite(v) for row in rows for v in row.values())
    return rows


# ----------------------------------------------------------------------------------------- the text game

def _play(game: TextGame, choose) -> list[tuple[str, float, bool]]:
    trace = [(game.reset(), 0.0, False)]
    while not game.done:
        trace.append(game.step(choose(game)))
    return trace


def test_text_game_is_deterministic_under_a_seed():
    traces = []
    for _ in range(2):
        rng = random.Random(1)
        traces.append(_play(TextGame(11), lambda g: g.random_action(rng)))
    assert traces[0] == traces[1] and len(traces[0]) > 2
    assert TextGame(11).reset() == TextGame(11).reset() and TextGame(11).doors == TextGame(11).doors
    assert len({TextGame(seed).reset() + str(TextGame(seed).doors) for seed in range(20)}) > 10  # maps differ


def test_scripted_optimal_player_solves_every_seed_and_random_player_rarely():
    for seed in range(500):
        game = TextGame(seed)
        trace = _play(game, TextGame.optimal_action)
        assert game.won and trace[-1][1] == 1.0 and "You win" in trace[-1][0], seed
        assert [r for _, r, _ in trace].count(0.5) == 1  # the key, taken once on the way
    rng = random.Random(0)
    games = [TextGame(seed) for seed in range(500)]
    wins = sum(_play(g, lambda g: g.random_action(rng)) and g.won for g in games) / 500
    assert 0.03 < wins < 0.3


def test_text_game_rules():
    game = TextGame(5)
    obs = game.reset()
    assert obs.startswith("You are in the") and "\n- go " in obs and "(command 1)" in obs.split("\n")[1]
    obs, reward, done = game.step("dance wildly")
    assert obs.startswith("Nothing happens.") and reward == 0.0 and not done and game.turns == 1
    while not game.done:
        game.step("xyzzy")
    assert game.turns == game.max_turns
    with pytest.raises(AssertionError):
        game.step("go north")
    game.reset()  # the chest stays locked without the key
    game.room = game.chest_room
    assert game.step("open chest")[:2] == (game.observation("The chest is locked. "), 0.0)


def test_text_game_lists_numbered_commands_and_a_number_picks_one():
    for seed in range(50):
        game = TextGame(seed, 4, 8)
        obs = game.reset()
        lines = obs.split("\n")[1:]
        assert [line[2:].split(" to the ")[0].split(" (")[0] for line in lines] == game.commands()
        assert [line.rsplit("command ", 1)[1] for line in lines] == [f"{i})" for i in range(1, len(lines) + 1)]
        for line in lines:  # a door names the room behind it and what the player glimpses there
            if line.startswith("- go "):
                room = game.doors[game.room][line.split()[2]]
                assert f"to the {game.names[room]}" in line and (room == game.key_room) == ("(a key" in line)
        n = len(game.commands())
        twin = TextGame(seed, 4, 8)
        twin.reset()
        wanted = game.commands()[n - 1]
        assert game.step(str(n)) == twin.step(wanted)  # "n" does exactly what the n-th listed command does
    listed = ["go north", "go east", "take key"]
    assert [parse_command(r, listed) for r in ("1", "2", " 3", "3.", "0", "4", "12")] == \
        ["go north", "go east", "take key", "take key", None, None, None]


def test_text_game_invalid_reply_wastes_the_turn():
    game = TextGame(5, 4, 8)
    obs = game.reset()
    room = game.room
    for reply in (str(len(game.commands()) + 1), "0", "You"):
        after, reward, done = game.step(reply)
        assert after == "Nothing happens. " + obs and reward == 0.0 and not done and game.room == room
    assert game.turns == 3


def test_text_game_can_start_with_the_key_in_hand():
    game = TextGame(5)
    obs = game.reset(carry_key=True)
    assert "You carry the key." in obs and "take key" not in game.commands() and "a key" not in obs
    rewards = []
    while not game.done:
        rewards.append(game.step(game.optimal_action())[1])
    assert game.won and rewards == [0.0] * (len(rewards) - 1) + [1.0]  # the chest only
    assert "You carry the key." not in game.reset()  # a plain reset puts the key back


def test_plan_length_counts_the_optimal_players_commands():
    for seed in range(300):
        for carry in (False, True):
            game = TextGame(seed, 4, 10)
            game.reset(carry_key=carry)
            left, played = game.plan_length(), 0
            while not game.done:
                before = game.plan_length()
                game.step(game.optimal_action())
                played += 1
                assert game.plan_length() == before - 1  # each optimal command is one step of progress
            assert game.won and played == left and game.plan_length() == 0
    for seed in range(20):  # the map is a tree: a step away from the plan is one more step back
        game = TextGame(seed, 4, 10)
        for wrong in [c for c in game.commands() if c != game.optimal_action()]:
            game.reset()
            before = game.plan_length()
            game.step(wrong)
            assert game.plan_length() == before + 1


def test_text_game_doors_tell_what_the_player_has_seen_and_no_more():
    rng = random.Random(0)
    for seed in range(300):
        game = TextGame(seed, 4, 8)
        obs = game.reset()
        while not game.done:
            seen = game.seen()
            for line in obs.split("\n")[1:]:
                if " to the " not in line:
                    continue
                room = game.doors[game.room][line.split()[2]]
                past = game.beyond(room, game.room)
                for thing, at in (("key", game.key_at), ("chest", game.chest_room)):
                    # "the way to the key": the key lies past this door, in a room the player entered or glimpsed
                    assert (f"the way to the {thing}" in line) == (at is not None and at != room and at in seen & past)
                assert ("(a key" in line) == (room == game.key_at)
                need = game.key_at if game.key_at is not None else game.chest_room
                assert ("unexplored" in line) == (need not in seen and bool(past & (seen - game.visited)))
            obs = game.step(game.random_action(rng))[0]


def test_reactive_player_reading_only_the_observation_nearly_always_wins():
    wins, turns = 0, []
    for seed in range(1000):
        game = TextGame(seed, 4, 8)
        obs = game.reset()
        while not game.done:
            obs = game.step(reactive_action(obs))[0]
        wins += game.won
        turns.append(game.turns)
        if game.won:  # it wastes no command: the key and the chest are each a single listed choice
            assert "Nothing happens" not in obs
    assert wins >= 970  # measured 98.35 % on 2,000 maps: it loses only when it explores the wrong way first
    rng, random_wins = random.Random(0), 0
    for seed in range(1000):
        game = TextGame(seed, 4, 8)
        game.reset()
        while not game.done:
            game.step(game.random_action(rng))
        random_wins += game.won
    assert random_wins < 150


def test_reply_prefix_states_what_the_observation_says_is_needed_next():
    game = TextGame(3, 4, 8)
    assert text_game.reply_prefix(game.reset()) == "I need the key, so I choose command "
    assert text_game.reply_prefix(game.reset(carry_key=True)) == "I need the chest, so I choose command "


def test_text_game_advantage_is_the_discounted_return_centred_per_observation():
    def episode(prompts, rewards):
        e = text_game.Episode(TextGame(0), "")
        e.turns = [([p], [i], [0.0], r) for i, (p, r) in enumerate(zip(prompts, rewards))]
        return e

    # two episodes leave observation 0 with different commands; the second reaches observation 2 alone
    lucky, unlucky = episode([0, 1], [0.2, 1.0]), episode([0, 2, 3], [-0.2, 0.0, 0.0])
    adv = [a for *_, a in text_game.advantages([lucky, unlucky], turn_cost=0.0, discount=0.5)]
    assert adv == pytest.approx([0.45, 0.0, -0.45, 0.0, 0.0])  # returns 0.7 and -0.2 from observation 0
    adv = [a for *_, a in text_game.advantages([episode([0], [1.0]), episode([0, 1], [0.0, 1.0])], 0.1, 1.0)]
    assert adv == pytest.approx([0.05, -0.05, 0.0])  # the shorter win is the better one


class _Reply:  # a sampler that always answers the same text (a greedy policy that ignores the observation)
    class _Tokenizer:
        eos_token_id = 0

        def apply_chat_template(self, msgs, **_):
            return [len(m["content"]) for m in msgs]

        def encode(self, text, **_):
            return [1]

        def decode(self, tokens, **_):
            return _Reply.text

    def sample(self, prompt, num_samples, params):
        class Future:
            def result(self):
                return types.SimpleNamespace(sequences=[types.SimpleNamespace(tokens=[1], logprobs=[0.0])] * num_samples)
        return Future()


def test_text_game_greedy_loop_ends_the_episode_lost():
    _Reply.text = "dance"  # "Nothing happens." then the same observation again: a loop
    (e,) = text_game.play(_Reply(), _Reply._Tokenizer(), [text_game.Episode(g := TextGame(3, 4, 10), g.reset())],
                          0.0, 4, random.Random(0))
    assert len(e.turns) == 2 and e.game.done and not e.game.won and e.game.turns == 10
    (e,) = text_game.play(_Reply(), _Reply._Tokenizer(), [text_game.Episode(g := TextGame(3, 4, 10), g.reset())],
                          1.0, 4, random.Random(0))
    assert len(e.turns) == 10 and not e.game.won  # sampled play is not deterministic: the whole budget is played
    game = TextGame(3, 4, 10)
    _Reply.text = game.optimal_action()  # a first move that leads somewhere new is played on
    (e,) = text_game.play(_Reply(), _Reply._Tokenizer(), [text_game.Episode(game, game.reset())], 0.0, 4,
                          random.Random(0))
    assert len(e.turns) > 2 and not e.game.won


def test_text_game_numbered_reply_plays_that_command_and_the_datum_trains_only_the_reply():
    game = TextGame(3, 4, 8)
    game.reset()
    right = game.commands().index(game.optimal_action()) + 1
    _Reply.text = str(right)  # the number of the first optimal command, then (wrongly listed or not) the same number
    (e,) = text_game.play(_Reply(), _Reply._Tokenizer(), [text_game.Episode(game, game.reset())], 1.0, 1,
                          random.Random(0), shaping=0.1)
    assert e.turns[0][3] == pytest.approx(0.1) and game.turns == len(e.turns)  # progress along the plan: +0.1
    twin, wasted = TextGame(3, 4, 8), []  # the same number played by hand: a number not listed wastes the turn
    twin.reset()
    for _ in e.turns:
        wasted.append(twin.step(str(right))[0].startswith("Nothing happens"))
    assert twin.room == game.room and e.wasted == sum(wasted) and twin.done
    _Reply.text = "9"  # never listed: every turn is lost, with no reward and no progress
    (e,) = text_game.play(_Reply(), _Reply._Tokenizer(), [text_game.Episode(g := TextGame(3, 4, 8), g.reset())], 1.0, 1,
                          random.Random(0), shaping=0.1)
    assert e.wasted == len(e.turns) == 8 and g.room == g.start and all(t[3] == 0.0 for t in e.turns)
    (e,) = text_game.play(_Reply(), _Reply._Tokenizer(), [text_game.Episode(g := TextGame(3, 4, 8), g.reset())], 1.0, 1,
                          random.Random(0), shaping=0.1, invalid_penalty=0.1)
    assert all(t[3] == -0.1 for t in e.turns)  # a reply that names no listed command costs
    prompt, tokens, logprobs, _ = e.turns[0]
    datum = text_game.rl_datum(list(prompt), list(tokens), logprobs, 0.7)
    adv = list(datum.loss_fn_inputs["advantages"].data if hasattr(datum.loss_fn_inputs["advantages"], "data")
               else datum.loss_fn_inputs["advantages"])
    assert adv == pytest.approx([0.0] * (len(prompt) - 1) + [0.7]) and len(tokens) == 1


def test_parse_command():
    listed = ["go north", "go east", "take key"]
    assert parse_command("I go east, then north.", listed) == "go east"
    assert parse_command("Take the key!", listed) == "take key"
    assert parse_command("north", listed) == "go north"
    assert parse_command("go south", listed) is None and parse_command("open chest", listed) is None
    assert parse_command("2", listed) == "go east" and parse_command("4", listed) is None


# ------------------------------------------------------------------------------------- grader and debate

def test_one_word_truth_and_grader_prompt_hides_it():
    assert rl_grader.is_one_word("Apple.") and rl_grader.is_one_word("blue")
    assert not rl_grader.is_one_word("The sky is blue.") and not rl_grader.is_one_word("") \
        and not rl_grader.is_one_word("42")

    class Tokenizer:  # the prompt as text: enough to see what the grader is shown
        def apply_chat_template(self, msgs, **_):
            return [m["content"] for m in msgs]

    right, wrong = (rl_grader.grader_prompt(Tokenizer(), r)[0] for r in ("Banana.", "A banana is yellow."))
    assert right.replace("Banana.", "A banana is yellow.") == wrong  # only the reply differs: no label, no count
    for text in (right, wrong):
        assert "one word" not in text and "True" not in text and "False" not in text


def test_debate_stories_and_zero_sum_rewards():
    for i in range(200):
        story = debate.make_story(random.Random(i))
        assert story.sentences[story.key] == f"{story.name}'s {story.thing} is {story.truth}."
        assert all(story.lie in story.sentences[d] for d in story.decoys)
        assert sum(story.truth in s.split()[-1] for s in story.sentences) == 1  # one sentence says the truth
        assert len({s.rsplit(" is ", 1)[0] for s in story.sentences}) == 6  # each thing described once
    for v in (0.0, 0.3, 0.5, 1.0):
        honest, liar = debate.zero_sum_rewards(v)
        assert honest + liar == 0 and (honest > 0) == (v > 0.5)


# ------------------------------------------------------------------------------------------ smoke runs

def test_text_game_smoke(server, tmp_path):
    config = text_game.Config(base_url=server.url, log_dir=str(tmp_path), steps=2, games_per_step=2, group_size=2,
                              num_eval=2, max_turns=3)
    summary = text_game.main(config)
    rows = _metrics(tmp_path)
    assert {"eval_success", "eval_turns", "random_player", "optimal_player"} <= set(rows[0])
    assert "train_success" in rows[-1] and "train_valid_replies" in rows[-1] and (tmp_path / "text_game.png").exists()
    assert 0 <= summary["after"]["eval_success"] <= 1 and summary["after"]["eval_turns"] <= 3


def test_rl_grader_smoke(server, tmp_path):
    config = rl_grader.Config(base_url=server.url, log_dir=str(tmp_path), steps=2, questions_per_step=2,
                              group_size=2, num_eval=2, eval_samples=2, max_tokens=6, grader_steps=1, grader_batch=4,
                              relabel_every=1, relabel_steps=1)
    summary = rl_grader.main(config)
    rows = _metrics(tmp_path)
    assert {"r1_eval_true_acc", "r1_eval_grader_agreement"} <= set(rows[0])
    assert any("r2_train_grader_agreement" in r for r in rows)
    assert set(summary["round2"]["after"]) == {"eval_true_acc", "eval_grader_agreement"}
    assert summary["grader_lesson"]["examples"] >= summary["grader_lesson"]["mistakes"]
    (relabel,) = summary["round2_lessons"]  # after round 2's first step, not after its last
    assert relabel["after_step"] == 1 and relabel["mistakes"] <= relabel["examples"] <= relabel["replies_seen"]
    assert any("r2_relabel_mistakes" in r for r in rows)


def test_debate_smoke(server, tmp_path):
    config = debate.Config(base_url=server.url, log_dir=str(tmp_path), steps=1, stories_per_step=2, group_size=2,
                           num_eval=3)
    summary = debate.main(config)
    rows = _metrics(tmp_path)
    assert {"eval_judge_acc", "eval_honest_shows_key", "eval_liar_shows_decoy"} <= set(rows[0])
    assert "train_judge_acc" in rows[-1] and 0 <= summary["after"]["eval_judge_acc"] <= 1
    assert summary["reference"]["judge_acc_key_vs_best_decoy"] >= 0
