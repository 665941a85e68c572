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


def test_interleaved_adapters_match_each_alone_with_gradients():
    """Rows [a, b, a, None]: a's rows are not contiguous, b's are (a slice): the mixed routing path."""
    rt = make_tiny_runtime()
    tokens = torch.tensor([[5, 9, 3, 7], [4, 4, 8, 1], [2, 6, 1, 3], [7, 7, 2, 5]])
    mask = torch.ones_like(tokens)
    for key, seed in (("a", 1), ("b", 2)):
        rt.lora.add(key, AdapterSpec(rank=4, seed=seed))
        for module in rt.lora.modules.values():
            module.adapters[key].B.data.normal_(generator=torch.Generator().manual_seed(seed))
    mixed = rt.logits(tokens, mask, ["a", "b", "a", None])
    mixed.square().mean().backward()
    grads = {k: [m.adapters[k].B.grad.clone() for m in rt.lora.modules.values()] for k in "ab"}
    for m in rt.lora.modules.values():
        for k in "ab":
            m.adapters[k].B.grad = None
    alone = torch.cat([rt.logits(tokens[[0, 2]], mask[[0, 2]], ["a", "a"]),
                       rt.logits(tokens[[1]], mask[[1]], ["b"]), rt.logits(tokens[[3]], mask[[3]], [None])])
    alone[[0, 2, 1, 3]].square().mean().backward()  # the same loss over the same rows
    assert torch.allclose(mixed[[0, 2, 1, 3]], alone, atol=1e-5)
    for k in "ab":
        for got, want in zip(grads[k], [m.adapters[k].B.grad for m in rt.lora.modules.values()]):
            assert torch.allclose(got, want, atol=1e-5)


def test_without_autograd_the_cached_compute_pair_follows_every_change_of_A_and_B():
    """add_to reuses scale * A and B between passes without gradients; an in-place step, a copy into A or B or a new A must
    each show in the next pass (compared with delta(), which computes it afresh)."""
    from tinkerd.engine.lora import LoRAWeights

    gen = torch.Generator().manual_seed(0)
    w = LoRAWeights(torch.randn(8, 4, generator=gen), torch.randn(4, 6, generator=gen), 0.5)
    x = torch.randn(3, 8, generator=gen)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return w.add_to(torch.zeros(3, 6), x), w.delta(x)

    got, want = both()
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        w.A.add_(1.0)  # what an optimizer step does
    got, want = both()
    torch.testing.assert_close(got, want)
    w.A.copy_(torch.randn(8, 4, generator=gen))  # what publishing into a kept key does
    got, want = both()
    torch.testing.assert_close(got, want)
    w.A = torch.randn(8, 4, generator=gen)
    got, want = both()
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        w.B.mul_(-2.0)
    got, want = both()
    torch.testing.assert_close(got, want)
    y = torch.ones(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(w.add_to(y, x), 1 + w.delta(x))  # accumulates onto what the base gave


def test_without_autograd_many_adapters_run_as_one_stacked_bmm_that_matches_each_alone():
    """Rows [a, b, c, a, None] through adapters of ranks 4, 2 and 3 (no autograd: the stacked path, ranks
    zero-padded) equal each row through its adapter alone; the stack follows an in-place change of an adapter,
    is kept when a pass uses fewer of its adapters, and is dropped with an adapter it holds."""
    rt = make_tiny_runtime()
    gen = torch.Generator().manual_seed(3)
    for key, rank in (("a", 4), ("b", 2), ("c", 3)):
        rt.lora.add(key, AdapterSpec(rank=rank, seed=rank), trainable=False)
        for module in rt.lora.modules.values():
            module.adapters[key].B.normal_(0, 0.1, generator=gen)
    tokens = torch.tensor([[5, 9, 3, 7, 2], [4, 4, 8, 1, 0], [6, 2, 2, 9, 1], [3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    mask = torch.ones_like(tokens)
    routes = ["a", "b", "c", "a", None]

    def each_alone() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([rt.logits(tokens[[i]], mask[[i]], [key]) for i, key in enumerate(routes)])

    with torch.no_grad():
        mixed = rt.logits(tokens, mask, routes)
    q_proj = next(m for name, m in rt.lora.modules.items() if name.endswith("q_proj"))
    assert q_proj.stacked is not None and q_proj.stacked.keys == ("a", "b", "c")
    torch.testing.assert_close(mixed, each_alone(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[4])  # the adapters are real deltas

    with torch.no_grad():  # an optimizer step on b, then a pass without c: the same stack, b's slot refreshed
        for module in rt.lora.modules.values():
            module.adapters["b"].A.mul_(-1.5)
    stack = q_proj.stacked
    routes = ["a", "b", "b", None, "a"]
    with torch.no_grad():
        mixed = rt.logits(tokens, mask, routes)
    assert q_proj.stacked is stack
    torch.testing.assert_close(mixed, each_alone(), atol=1e-5, rtol=1e-5)

    rt.lora.remove("c")
    assert q_proj.stacked is None
