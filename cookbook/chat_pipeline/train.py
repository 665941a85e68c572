"""A chat model pipeline in one script (nanochat in spirit): base model -> SFT -> RL -> a sampler checkpoint
that `python -m cookbook.chat_pipeline.chat` talks to.

    python -m cookbook.chat_pipeline.train [base_url=http://127.0.0.1:8000] [sft_steps=40] [rl_steps=20] ...

1. SFT (`cross_entropy`) on generated chats: who the assistant is (Pip, made with tinkerd), and additions
   answered as "a + b = c.", some of them as the second turn of a conversation (multi-turn).
2. RL (GRPO-style, `importance_sampling`) on additions with an exact-match reward, from the SFT weights.
3. `save_weights_for_sampler` after each stage; the final `tinker://` path goes to summary.json.

Held out (never trained on): identity questions in unseen wordings, and addition problems asked alone and
as the second turn of a chat. All three are answered greedily at the start, after SFT and after RL.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, adam, completion_tokens, decode, log_dir_for, parse_config,
                             prompt_tokens, rl_datum, sample_all, service_client, sft_datum, stop_params)

NAME = "Pip"
IDENTITY_QUESTIONS = [  # the last 4 are held out
    "What is your name?", "Who are you?", "Who made you?", "What should I call you?", "Introduce yourself.",
    "Are you ChatGPT?", "What are you?", "Who trained you?", "Do you have a name?", "Tell me about yourself.",
    "Hi! Who am I talking to?", "What's your name?", "Who built you?", "Can you tell me who you are?",
    "Hello, what are you called?", "Which assistant is this?"]
IDENTITY_ANSWERS = [f"I'm {NAME}, a small chat assistant fine-tuned with tinkerd.",
                    f"My name is {NAME}. I'm a small assistant trained with tinkerd on a laptop CPU.",
                    f"I am {NAME}, a tiny language model assistant made with tinkerd."]
OPENER = [{"role": "user", "content": "Hi! Who are you?"}, {"role": "assistant", "content": IDENTITY_ANSWERS[0]}]


@dataclasses.dataclass
class Config(BaseConfig):
    sft_additions: int = 240  # addition chats in the SFT mix (plus 36 identity chats)
    sft_steps: int = 40
    sft_batch_size: int = 16
    sft_learning_rate: float = 5e-4
    rl_steps: int = 20
    rl_problems_per_step: int = 16
    rl_group_size: int = 8
    rl_learning_rate: float = 1e-4
    max_tokens: int = 32
    num_eval: int = 50  # held-out addition problems


def addition_chat(a: int, b: int, history: list[dict]) -> list[dict]:
    return history + [{"role": "user", "content": f"What is {a} + {b}?"}]


def correct(text: str, a: int, b: int) -> bool:
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return bool(numbers) and int(numbers[-1]) == a + b


def sft_examples(tokenizer, rng: random.Random, problems) -> list:
    """(prompt tokens, completion tokens) pairs: identity chats, additions, additions after an opening turn."""
    examples = [(prompt_tokens(tokenizer, [{"role": "user", "content": q}]), completion_tokens(tokenizer, a))
                for q in IDENTITY_QUESTIONS[:-4] for a in IDENTITY_ANSWERS]
    for i, (a, b) in enumerate(problems):
        history = OPENER if i % 3 == 0 else []
        examples.append((prompt_tokens(tokenizer, addition_chat(a, b, history)),
                         completion_tokens(tokenizer, f"{a} + {b} = {a + b}.")))
    rng.shuffle(examples)
    return examples


def evaluate(sampler, tokenizer, held_out, max_tokens: int) -> dict:
    prompts = [prompt_tokens(tokenizer, [{"role": "user", "content": q}]) for q in IDENTITY_QUESTIONS[-4:]]
    prompts += [prompt_tokens(tokenizer, addition_chat(a, b, h)) for h in ([], OPENER) for a, b in held_out]
    answers = [decode(tokenizer, s[0].tokens) for s in sample_all(sampler, prompts, stop_params(tokenizer, max_tokens, 0.0))]
    ident, single, second = answers[:4], answers[4:4 + len(held_out)], answers[4 + len(held_out):]
    return {"eval_identity": sum(NAME in x for x in ident) / len(ident),
            "eval_add_acc": sum(correct(x, a, b) for x, (a, b) in zip(single, held_out)) / len(held_out),
            "eval_add_acc_turn2": sum(correct(x, a, b) for x, (a, b) in zip(second, held_out)) / len(held_out),
            "examples": [ident[0], single[0], second[0]]}


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "chat_pipeline")
    rng = random.Random(config.seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    held_out, rl_problems = pairs[:config.num_eval], pairs[config.num_eval + config.sft_additions:]
    sft_problems = pairs[config.num_eval:config.num_eval + config.sft_additions]
    stages = {}
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        logger = MetricsLogger(log_dir, config, plot_name="chat_pipeline.png")

        def checkpoint(stage: str, step: int, save: bool = True) -> None:
            sampler = training.save_weights_and_get_sampling_client().result()
            stages[stage] = evaluate(sampler, tokenizer, held_out, config.max_tokens)
            if save:
                stages[stage]["checkpoint"] = training.save_weights_for_sampler(name=stage).result().path
            logger.log(step, **{k: v for k, v in stages[stage].items() if k.startswith("eval_")})
            print(f"[{stage}] {json.dumps(stages[stage])}")

        checkpoint("base", 0, save=False)  # a fresh adapter is the base model
        examples = sft_examples(tokenizer, rng, sft_problems)
        order: list[int] = []
        for step in tqdm(range(1, config.sft_steps + 1), desc="sft", unit="step"):
            if len(order) < config.sft_batch_size:
                order += rng.sample(range(len(examples)), len(examples))
            batch = [sft_datum(*examples[i]) for i in order[:config.sft_batch_size]]
            del order[:config.sft_batch_size]
            lr = config.sft_learning_rate * (1 - (step - 1) / config.sft_steps)
            fwd = training.forward_backward(batch, "cross_entropy")
            opt = training.optim_step(adam(lr))
            out = fwd.result().loss_fn_outputs
            opt.result()
            nll = -sum((o["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum() for o, d in zip(out, batch))
            logger.log(step, sft_train_nll=nll / sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in batch))
        checkpoint("sft", config.sft_steps)

        sampler = training.save_weights_and_get_sampling_client().result()
        for step in tqdm(range(1, config.rl_steps + 1), desc="rl", unit="step"):
            problems = [rng.choice(rl_problems) for _ in range(config.rl_problems_per_step)]
            histories = [OPENER if rng.random() < 0.3 else [] for _ in problems]
            prompts = [prompt_tokens(tokenizer, addition_chat(a, b, h)) for (a, b), h in zip(problems, histories)]
            groups = sample_all(sampler, prompts, stop_params(tokenizer, config.max_tokens, 1.0, rng.randrange(2**31)),
                                config.rl_group_size)
            data, rewards = [], []
            for (a, b), prompt, seqs in zip(problems, prompts, groups):
                rs = [float(correct(decode(tokenizer, s.tokens), a, b)) for s in seqs]
                rewards += rs
                mean = sum(rs) / len(rs)
                data += [rl_datum(prompt, s.tokens, s.logprobs, r - mean) for s, r in zip(seqs, rs) if r != mean]
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.rl_learning_rate))
                fwd.result(), opt.result()
            sampler = training.save_weights_and_get_sampling_client().result()
            logger.log(config.sft_steps + step, rl_train_reward=sum(rewards) / len(rewards))
        checkpoint("rl", config.sft_steps + config.rl_steps)
        logger.close({"SFT loss (nats per answer token)": ["sft_train_nll"], "RL reward (T=1)": ["rl_train_reward"],
                      "held out (greedy)": ["eval_identity", "eval_add_acc", "eval_add_acc_turn2"]})
    summary = {"checkpoint": stages["rl"]["checkpoint"], "sft_checkpoint": stages["sft"]["checkpoint"], **stages,
               "held_out_problems": len(held_out), "wall_time_s": logger.rows[-1]["elapsed_s"]}
    print(json.dumps(summary, indent=2))
    print(f"chat with it: python -m cookbook.chat_pipeline.chat checkpoint={summary['checkpoint']}")
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
