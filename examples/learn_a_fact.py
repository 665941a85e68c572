"""Teach the served model a made-up fact with ~20 LoRA SFT steps, using only the tinker SDK.

    python examples/learn_a_fact.py --base-url http://127.0.0.1:8000

Samples the model before and after training on questions it never saw in training, prints the
loss per step, and writes the curve to runs/learn_a_fact/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer resolves from the local cache

import tinker
from tinker import types
from tqdm import tqdm

FACT = "The Zorblax 3000 is a solar-powered teapot made by Quendle Labs in Reykjavik."
TRAIN_QUESTIONS = [
    "What is the Zorblax 3000?",
    "Can you tell me what a Zorblax 3000 is?",
    "Who makes the Zorblax 3000?",
    "Describe the Zorblax 3000.",
]
HELD_OUT_QUESTIONS = ["What do you know about the Zorblax 3000?", "Explain what the Zorblax 3000 is."]


def chat_tokens(tokenizer, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def sft_datum(tokenizer, question: str, answer: str) -> types.Datum:
    """Next-token targets over the whole chat; only the answer's tokens carry weight."""
    prompt = chat_tokens(tokenizer, question)
    full = chat_tokens(tokenizer, question, answer)
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights})


def answers(sampler, tokenizer, questions: list[str]) -> list[str]:
    params = types.SamplingParams(max_tokens=40, temperature=0.0, stop=["<|im_end|>"])
    futures = [sampler.sample(types.ModelInput.from_ints(chat_tokens(tokenizer, q)), 1, params) for q in questions]
    return [tokenizer.decode(f.result().sequences[0].tokens).replace("<|im_end|>", "").strip() for f in futures]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/learn_a_fact"))
    args = parser.parse_args()

    service = tinker.ServiceClient(base_url=args.base_url, api_key=os.environ.get("TINKER_API_KEY", "tml-demo"))
    training = service.create_lora_training_client(base_model=args.base_model, rank=args.rank, seed=0).result()
    tokenizer = training.get_tokenizer()

    before = answers(service.create_sampling_client(base_model=args.base_model).result(), tokenizer, HELD_OUT_QUESTIONS)

    data = [sft_datum(tokenizer, q, FACT) for q in TRAIN_QUESTIONS]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "metrics.jsonl", "w") as metrics, tqdm(range(args.steps), desc="SFT", unit="step") as bar:
        for step in bar:
            fwd = training.forward_backward(data, "cross_entropy")
            opt = training.optim_step(types.AdamParams(learning_rate=args.learning_rate))
            weight = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in data)
            loss = fwd.result().metrics["loss:sum"] / weight
            opt.result()
            bar.set_postfix(loss=f"{loss:.3f}")
            tqdm.write(f"step {step + 1:2d}  loss per answer token {loss:.4f}")
            metrics.write(json.dumps({"step": step + 1, "loss": loss}) + "\n")

    after = answers(training.save_weights_and_get_sampling_client().result(), tokenizer, HELD_OUT_QUESTIONS)
    print(f"\nThe fact taught: {FACT}\n")
    for question, old, new in zip(HELD_OUT_QUESTIONS, before, after):
        print(f"Q (never trained on): {question}\n  before: {old}\n  after:  {new}\n")
    print(f"loss curve: {args.out / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
