"""The RL losses against independent per-datum references (values and d loss / d lp), and through the trainer.

The references below loop over unpadded float64 datums and write each loss and its gradient out by
hand (piecewise, not with the implementation's min/clamp/mask tricks), so a wrong sign, a missing
mask, a wrong clip branch or a gradient leaking through a stop-gradient makes these tests fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.losses import LOSSES, get_loss
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall
from tests.conftest import make_tiny_runtime

RL_LOSSES = ["importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]


# ---------------------------------------------------------------- independent references (float64)
# Each takes one datum's unpadded 1-D arrays and the resolved config; returns (loss, d loss / d lp).

def ref_importance_sampling(lp, d, cfg):
    r = np.exp(lp - d["logprobs"])
    return -(r * d["advantages"]).sum(), -r * d["advantages"]


def _ref_ppo_tokens(ratios, adv, lo, hi):
    """Per token: A > 0 keeps A·min(r, hi); A < 0 keeps A·max(r, lo); the grad dies where the bound is taken."""
    loss, grad = 0.0, np.zeros_like(ratios)
    for t, (r, a) in enumerate(zip(ratios, adv)):
        if a > 0:
            loss -= a * min(r, hi)
            grad[t] = -a * r if r <= hi else 0.0
        elif a < 0:
            loss -= a * max(r, lo)
            grad[t] = -a * r if r >= lo else 0.0
    return loss, grad


def ref_ppo(lp, d, cfg):
    ratios = np.exp(lp - d["logprobs"])
    return _ref_ppo_tokens(ratios, d["advantages"], cfg["clip_low_threshold"], cfg["clip_high_threshold"])


def ref_cispo(lp, d, cfg):
    coeff = np.clip(np.exp(lp - d["logprobs"]), cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -(coeff * lp * d["advantages"]).sum(), -coeff * d["advantages"]


def ref_dro(lp, d, cfg):
    beta, diff = cfg["beta"], lp - d["logprobs"]
    return -(lp * d["advantages"] - 0.5 * beta * diff**2).sum(), -(d["advantages"] - beta * diff)


def ref_gspo(lp, d, cfg):
    marked = [t for t in range(len(lp)) if d["sequence_ratio_mask"][t] != 0]
    s = math.exp(np.mean([lp[t] - d["logprobs"][t] for t in marked])) if marked else 1.0
    # each token's ratio has value s and derivative d r_t / d lp_t = s (its own logprob only)
    return _ref_ppo_tokens(np.full(len(lp), s), d["advantages"], cfg["clip_low_threshold"],
                           cfg["clip_high_threshold"])


def ref_stable_reinforce(lp, d, cfg):
    q = d["sampler_logprobs"] if "sampler_logprobs" in d else d["logprobs"]
    loss, grad = 0.0, np.zeros_like(lp)
    for t in range(len(lp)):
        w = min(math.exp(lp[t] - q[t]), cfg["clip_high"])
        k3 = math.exp(q[t] - lp[t]) - (q[t] - lp[t]) - 1.0
        loss += -w * lp[t] * d["advantages"][t] + cfg["kl_coeff"] * k3
        grad[t] = -w * d["advantages"][t] + cfg["kl_coeff"] * (1.0 - math.exp(q[t] - lp[t]))
    return loss, grad


REFS = {"importance_sampling": ref_importance_sampling, "ppo": ref_ppo, "cispo": ref_cispo, "dro": ref_dro,
        "gspo": ref_gspo, "stable_reinforce": ref_stable_reinforce}


def reference(name, lps, datums, cfg):
    total, grads = 0.0, []
    for lp, d in zip(lps, datums):
        loss, grad = REFS[name](np.asarray(lp, np.float64), {k: np.asarray(v, np.float64) for k, v in d.items()}, cfg)
        total += loss
        grads.append(grad)
    return total, grads


# ---------------------------------------------------------------- random padded batches

def make_datums(seed, with_sampler=False):
    """Datums of lengths 7, 3, 5, 4 (padding), with log-ratios spanning ratios ~0.3..3, exact ratio-1 tokens
    (q = lp bit for bit), negative and zero advantages. Returns (per-datum lp, per-datum inputs)."""
    rng = np.random.default_rng(seed)
    lps, datums = [], []
    for i, n in enumerate([7, 3, 5, 4]):
        lp = rng.uniform(-4.0, -0.05, n).astype(np.float32)
        delta = rng.uniform(-1.2, 1.2, n)
        delta[rng.random(n) < 0.3] = 0.0  # ratio exactly 1
        if i == 3:
            delta[:] = 0.0  # a whole datum on-policy: the GSPO sequence ratio is exactly 1
        if i == 2:
            delta = rng.uniform(-2e-4, 3e-4, n)  # inside GSPO's tight band
        q = np.where(delta == 0.0, lp, lp - delta).astype(np.float32)
        adv = rng.normal(0.0, 1.5, n).astype(np.float32)
        adv[rng.random(n) < 0.15] = 0.0
        srm = (rng.random(n) < 0.7).astype(np.float32)
        srm[0] = 0.0  # e.g. a prompt token left out of the sequence ratio
        if i == 1:
            srm[:] = 0.0  # no token in the ratio at all: s = 1
        d = {"logprobs": q, "advantages": adv, "sequence_ratio_mask": srm}
        if with_sampler:
            d["sampler_logprobs"] = (lp - rng.uniform(-0.8, 0.8, n)).astype(np.float32)
        lps.append(lp)
        datums.append(d)
    return lps, datums


def pad(lps, datums, names):
    B, T = len(lps), max(len(lp) for lp in lps)
    lp = torch.full((B, T, 1), -3.7)  # padding logprobs are real, nonzero numbers in the trainer too
    inputs = {n: torch.zeros(B, T, 1) for n in (*names, "mask")}
    for i, (row, d) in enumerate(zip(lps, datums)):
        lp[i, : len(row), 0] = torch.from_numpy(row)
        inputs["mask"][i, : len(row), 0] = 1.0
        for n in names:
            inputs[n][i, : len(row), 0] = torch.from_numpy(d[n])
    return lp.requires_grad_(True), inputs


CASES = [
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.0}),  # ratio exactly at hi
    ("ppo", {"clip_low_threshold": 1.0, "clip_high_threshold": 1.3}),  # ratio exactly at lo
    ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.0}),
    ("cispo", {"clip_low_threshold": 1.0, "clip_high_threshold": 1.2}),
    ("dro", {}),
    ("dro", {"beta": 0.7}),
    ("dro", {"beta": 0}),
    ("gspo", {}),
    ("gspo", {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}),
    ("gspo", {"clip_low_threshold": 1.0, "clip_high_threshold": 1.0}),  # s exactly at both bounds
    ("stable_reinforce", {}),
    ("stable_reinforce", {"clip_high": 1.0, "kl_coeff": 0.3}),
    ("stable_reinforce", {"clip_high": 1.5, "kl_coeff": 0.05}),
]


@pytest.mark.parametrize("name,config,with_sampler",
                         [(*case, False) for case in CASES]
                         + [(*case, True) for case in CASES if case[0] == "stable_reinforce"])
def test_value_and_gradient_match_reference(name, config, with_sampler):
    loss_def = get_loss(name)
    cfg = loss_def.resolve_config(name, config)
    for seed in range(3):
        lps, datums = make_datums(seed, with_sampler)
        names = [n for n in (*loss_def.required_inputs, *loss_def.optional_inputs)
                 if n != "target_tokens" and n in datums[0]]
        lp, inputs = pad(lps, datums, names)
        loss, metrics = loss_def.fn(lp, inputs, cfg)
        loss.backward()
        want, want_grads = reference(name, lps, [{n: d[n] for n in names} for d in datums], cfg)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-5)
        for i, g in enumerate(want_grads):
            np.testing.assert_allclose(lp.grad[i, : len(g), 0].numpy(), g, atol=1e-5, rtol=1e-5)
            assert torch.all(lp.grad[i, len(g):] == 0), "padding must get no gradient"
        for key, value in metrics.items():
            assert key.count(":") == 1 and key.split(":")[1] in ("sum", "mean", "min", "max")
            assert math.isfinite(value)


def test_sampler_logprobs_replace_logprobs_in_stable_reinforce():
    lps, datums = make_datums(5, with_sampler=True)
    loss_def = get_loss("stable_reinforce")
    cfg = loss_def.resolve_config("stable_reinforce", {"kl_coeff": 0.2})
    with_s = loss_def.fn(*pad(lps, datums, ["logprobs", "advantages", "sampler_logprobs"]), cfg)[0]
    without = loss_def.fn(*pad(lps, datums, ["logprobs", "advantages"]), cfg)[0]
    assert float(with_s.detach()) == pytest.approx(reference("stable_reinforce", lps, datums, cfg)[0], rel=1e-5)
    assert abs(float(with_s.detach()) - float(without.detach())) > 1e-3


def test_ppo_clip_fraction_counts_tokens_whose_gradient_is_clipped():
    lp = torch.zeros(1, 5, 1, requires_grad=True)
    ratios = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.0])
    inputs = {"logprobs": -ratios.log().view(1, 5, 1),
              "advantages": torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0]).view(1, 5, 1),
              "mask": torch.ones(1, 5, 1)}
    loss, metrics = LOSSES["ppo"].fn(lp, inputs, LOSSES["ppo"].resolve_config("ppo", {}))
    # clipped: (r=0.5, A<0) and (r=1.5, A>0); the other three keep their gradient
    assert metrics["clip_fraction:mean"] == pytest.approx(2 / 5)
    loss.backward()
    assert lp.grad.view(-1).tolist() == pytest.approx([0.0, -0.5, 0.0, 1.5, -1.0])
    # a ratio exactly at the bound is not clipped (it keeps its gradient)
    at_bound = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}
    assert LOSSES["ppo"].fn(lp, inputs, at_bound)[1]["clip_fraction:mean"] == 0.0


def test_documented_defaults():
    assert LOSSES["importance_sampling"].config_defaults == {}
    assert LOSSES["ppo"].config_defaults == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert LOSSES["cispo"].config_defaults == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert LOSSES["dro"].config_defaults == {"beta": 0.05}
    assert LOSSES["gspo"].config_defaults == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert LOSSES["stable_reinforce"].config_defaults == {"clip_high": 2.0, "kl_coeff": 0.0}
    assert LOSSES["stable_reinforce"].optional_inputs == ("sampler_logprobs",)


def test_gspo_ratio_is_per_datum_and_ignores_unmarked_tokens():
    lp = torch.zeros(2, 3, 1, requires_grad=True)
    inputs = {"logprobs": torch.tensor([[0.0, -0.3, -5.0], [0.2, 0.0, 0.0]]).view(2, 3, 1),
              "advantages": torch.ones(2, 3, 1),
              "sequence_ratio_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).view(2, 3, 1),
              "mask": torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).view(2, 3, 1)}
    cfg = {"clip_low_threshold": 0.0, "clip_high_threshold": 100.0}
    loss, _ = LOSSES["gspo"].fn(lp, inputs, cfg)
    s0, s1 = math.exp(0.15), math.exp(-0.2)  # row 0: mean of (0, 0.3); row 1: only its one real token
    assert float(loss.detach()) == pytest.approx(-(3 * s0 + s1), rel=1e-6)
    loss.backward()
    assert lp.grad.view(-1).tolist() == pytest.approx([-s0, -s0, -s0, -s1, 0.0, 0.0], rel=1e-6)


# ---------------------------------------------------------------- through LocalTrainer

@pytest.fixture
def trainer():
    t = LocalTrainer({"tiny": make_tiny_runtime()})
    t.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=0))
    return t


def rl_datum(tokens, extra):
    tokens = np.asarray(tokens, dtype=np.int64)
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], **{k: np.asarray(v, np.float32) for k, v in extra.items()}})


def call(loss_fn, data, config=None, forward_only=True):
    return ForwardBackwardCall("m", 1, loss_fn, dict(config or {}), forward_only, data)


def trainer_data(with_sampler=False):
    rng = np.random.default_rng(7)
    data = []
    for n in (9, 5):
        extra = {"logprobs": rng.uniform(-6.0, -3.5, n - 1), "advantages": rng.normal(0, 1, n - 1),
                 "sequence_ratio_mask": np.r_[0.0, np.ones(n - 2)]}
        if with_sampler:
            extra["sampler_logprobs"] = rng.uniform(-6.0, -3.5, n - 1)
        data.append(rl_datum(rng.integers(2, 120, n), extra))
    return data


@pytest.mark.parametrize("name,config,with_sampler", [
    ("importance_sampling", {}, False), ("ppo", {"clip_high_threshold": 1.1}, False), ("cispo", {}, False),
    ("dro", {"beta": 0.3}, False), ("gspo", {}, False), ("stable_reinforce", {"kl_coeff": 0.1}, False),
    ("stable_reinforce", {"kl_coeff": 0.1, "clip_high": 1.5}, True),
])
def test_trainer_loss_sum_matches_reference_from_returned_logprobs(trainer, name, config, with_sampler):
    data = trainer_data(with_sampler)
    result = trainer.forward_backward(call(name, data, config))
    lps = [out["logprobs"] for out in result.outputs]
    assert [lp.shape for lp in lps] == [(8,), (4,)]
    inputs = [{k: v for k, v in d.loss_inputs.items() if k != "target_tokens"} for d in data]
    want, _ = reference(name, lps, inputs, get_loss(name).resolve_config(name, config))
    assert result.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert all(k.count(":") == 1 for k in result.metrics)


def test_trainer_unknown_config_key_names_it(trainer):
    with pytest.raises(BadRequest, match=r"loss_fn_config\.clip_low is not used by ppo .*clip_high_threshold"):
        trainer.forward_backward(call("ppo", trainer_data(), {"clip_low": 0.5}))
    with pytest.raises(BadRequest, match=r"loss_fn_config\.beta is not used by importance_sampling"):
        trainer.forward_backward(call("importance_sampling", trainer_data(), {"beta": 0.1}))


@pytest.mark.parametrize("name,config,message", [
    ("ppo", {"clip_low_threshold": 1.3}, r"loss_fn_config\.clip_low_threshold must be <= clip_high_threshold"),
    ("ppo", {"clip_low_threshold": -0.1}, r"loss_fn_config\.clip_low_threshold must be >= 0"),
    ("cispo", {"clip_high_threshold": "big"}, r"loss_fn_config\.clip_high_threshold must be a finite number"),
    ("gspo", {"clip_low_threshold": 1.0, "clip_high_threshold": 0.99},
     r"loss_fn_config\.clip_low_threshold must be <="),
    ("dro", {"beta": -1.0}, r"loss_fn_config\.beta must be >= 0"),
    ("dro", {"beta": float("nan")}, r"loss_fn_config\.beta must be a finite number"),
    ("stable_reinforce", {"clip_high": 0.0}, r"loss_fn_config\.clip_high must be > 0"),
    ("stable_reinforce", {"kl_coeff": -0.5}, r"loss_fn_config\.kl_coeff must be >= 0"),
    ("stable_reinforce", {"kl_coeff": True}, r"loss_fn_config\.kl_coeff must be a finite number"),
])
def test_trainer_bad_config_value_names_the_field_and_leaves_no_gradient(trainer, name, config, message):
    with pytest.raises(BadRequest, match=message):
        trainer.forward_backward(call(name, trainer_data(), config, forward_only=False))
    assert all(p.grad is None for p in trainer.runtimes["tiny"].lora.parameters("m"))


def test_trainer_missing_required_input_and_unknown_loss(trainer):
    data = trainer_data()
    del data[0].loss_inputs["sequence_ratio_mask"]
    with pytest.raises(BadRequest, match=r"data\[0\]\.loss_fn_inputs\.sequence_ratio_mask is required"):
        trainer.forward_backward(call("gspo", data))
    with pytest.raises(BadRequest) as err:
        trainer.forward_backward(call("grpo", trainer_data()))
    assert "'grpo' is not supported" in str(err.value)
    for name in ["cross_entropy", *RL_LOSSES]:
        assert name in str(err.value)
    assert sorted(LOSSES) == sorted(["cross_entropy", *RL_LOSSES])


@pytest.mark.parametrize("name,sign", [(n, 1.0) for n in RL_LOSSES] + [("importance_sampling", -1.0)])
def test_training_steps_move_the_sequence_logprob_with_the_advantage_sign(trainer, name, sign):
    tokens = [5, 17, 33, 8, 91, 12, 60]
    probe = rl_datum(tokens, {"logprobs": np.zeros(6), "advantages": np.zeros(6), "sequence_ratio_mask": np.ones(6)})
    before = trainer.forward_backward(call("importance_sampling", [probe])).outputs[0]["logprobs"]
    datum = rl_datum(tokens, {"logprobs": before, "advantages": np.full(6, sign), "sequence_ratio_mask": np.ones(6)})
    for _ in range(4):
        trainer.forward_backward(call(name, [datum], forward_only=False))
        trainer.optim_step("m", AdamParams(learning_rate=1e-2))
    after = trainer.forward_backward(call("importance_sampling", [probe])).outputs[0]["logprobs"]
    assert sign * (after.sum() - before.sum()) > 0.1
