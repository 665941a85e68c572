"""Our LoRA math equals PEFT's on the same tiny model and adapter values (fp32): logits and gradients."""

import torch
from peft import PeftModel

from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.trainer import LocalTrainer
from tests.conftest import make_tiny_model, make_tiny_runtime


def test_logits_and_gradients_match_peft(tmp_path):
    trainer = LocalTrainer({"tiny": make_tiny_runtime(seed=5)})
    trainer.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=2))
    lora = trainer.runtimes["tiny"].lora
    for name, p in lora.named_parameters("m"):
        if name.endswith("lora_B"):
            p.data.normal_(std=0.1)
    trainer.save_sampler_weights("m", tmp_path / "adapter")

    reference = PeftModel.from_pretrained(make_tiny_model(seed=5), tmp_path / "adapter", is_trainable=True)
    tokens = torch.tensor([[5, 9, 3, 7, 2, 11]])
    targets = torch.tensor([[9, 3, 7, 2, 11, 4]])

    ours = trainer.runtimes["tiny"].logits(tokens, torch.ones_like(tokens), ["m"])
    theirs = reference(input_ids=tokens).logits.float()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    ours.log_softmax(-1).gather(-1, targets[..., None]).sum().backward()
    theirs.log_softmax(-1).gather(-1, targets[..., None]).sum().backward()
    peft_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    compared = 0
    for name, p in lora.named_parameters("m"):
        module, kind = name.rsplit(".", 1)
        peft_grad = peft_grads[f"base_model.model.{module}.{kind}.default.weight"]
        torch.testing.assert_close(p.grad, peft_grad.T, atol=1e-5, rtol=1e-4)
        compared += 1
    assert compared == len(lora.named_parameters("m")) > 0
