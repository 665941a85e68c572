import torch

from tinkerd.engine.interface import AdapterSpec
from tests.conftest import make_tiny_runtime


def _logits(rt, adapters):
    tokens = torch.tensor([[5, 9, 3, 7, 2], [4, 4, 8, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        return rt.logits(tokens, mask, adapters)


def test_fresh_adapter_equals_base_model():
    rt = make_tiny_runtime()
    base = _logits(rt, [None, None])
    rt.lora.add("a", AdapterSpec(rank=4, seed=1))
    assert torch.equal(_logits(rt, ["a", "a"]), base)


def test_adapter_changes_only_its_rows_and_same_seed_gives_same_init():
    rt = make_tiny_runtime()
    base = _logits(rt, [None, None])
    rt.lora.add("a", AdapterSpec(rank=4, seed=7))
    rt.lora.add("b", AdapterSpec(rank=4, seed=7))
    for name, module in rt.lora.modules.items():
        assert torch.equal(module.adapters["a"].A, module.adapters["b"].A), name
        module.adapters["a"].B.data.normal_()
    mixed = _logits(rt, ["a", None])
    assert not torch.allclose(mixed[0], base[0])
    assert torch.equal(mixed[1], base[1])
    alone = _logits(rt, ["a", "a"])
    assert torch.allclose(mixed[0], alone[0], atol=1e-5)


def test_train_flags_choose_target_modules():
    rt = make_tiny_runtime()
    rt.lora.add("mlp_only", AdapterSpec(rank=2, train_attn=False, train_unembed=False))
    kinds = {m.kind for m in rt.lora.modules.values() if "mlp_only" in m.adapters}
    assert kinds == {"mlp"}
    rt.lora.add("all", AdapterSpec(rank=2))
    kinds = {m.kind for m in rt.lora.modules.values() if "all" in m.adapters}
    assert kinds == {"attn", "mlp", "unembed"}
