"""Triggers (Algorithms 1 and 2 inits, the sign step), epsilons, and the dual-branch loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from trigact.common.validate import parse_eps
from trigact.common.errors import TrigactError
from trigact.losses import kl_to_uniform, trigger_activation_loss
from trigact.triggers import build_trigger, fixed_trigger, learnable_trigger


def test_fixed_trigger_is_exactly_plus_minus_eps_with_balanced_signs():
    trig = fixed_trigger((3, 32, 32), "8/255", seed=1)
    eps = 8 / 255
    tau = trig.tau
    assert torch.all((tau == eps) | (tau == -eps))
    frac_pos = (tau > 0).float().mean().item()
    # 3072 fair coin flips: the std of the fraction is ~0.009, so 0.45..0.55 is a >5-sigma band.
    assert 0.45 < frac_pos < 0.55


def test_fixed_trigger_depends_only_on_its_seed():
    a = fixed_trigger((1, 8, 8), 0.1, seed=3).tau
    torch.manual_seed(123)  # the global RNG must not matter (DDP ranks agree via the seed alone)
    b = fixed_trigger((1, 8, 8), 0.1, seed=3).tau
    c = fixed_trigger((1, 8, 8), 0.1, seed=4).tau
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_learnable_trigger_init_within_alpha_and_spread():
    alpha = 4 / 255
    tau = learnable_trigger((3, 16, 16), "4/255", seed=0).tau
    assert tau.abs().max() <= alpha
    # U(-alpha, alpha): mean ~0 and both halves of the range used.
    assert tau.min() < -alpha / 2 and tau.max() > alpha / 2
    assert abs(tau.mean().item()) < alpha / 10


def test_trigger_apply_clamps_to_pixel_range():
    trig = fixed_trigger((1, 2, 2), 0.5, seed=0)
    x = torch.tensor([[[[0.0, 1.0], [0.75, 0.25]]]])
    out = trig(x)
    assert torch.equal(out, (x + trig.tau).clamp(0, 1))
    assert out.min() >= 0 and out.max() <= 1


def test_sign_step_moves_by_exactly_alpha_against_the_gradient():
    trig = learnable_trigger((1, 2, 2), 0.1, seed=0)
    before = trig.tau.clone()
    grad = torch.tensor([[[1.5, -2.0], [0.0, 1e-9]]])
    trig.sign_step(grad)
    assert torch.allclose(trig.tau, before - 0.1 * grad.sign())


def test_fixed_trigger_has_no_update_rule():
    with pytest.raises(TrigactError, match="learnable"):
        fixed_trigger((1, 2, 2), 0.1).sign_step(torch.ones(1, 2, 2))


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.03", 0.03), (0, 0.0), (" 16 / 255 ", 16 / 255), (1, 1.0), ("0.5/255", 0.5 / 255)])
def test_parse_eps_accepts_paper_notation(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["-8/255", -0.1, "eight", "1/0", True, "nan", "1/2/3", "8/-255"])
def test_parse_eps_rejects_bad_values_in_one_line(bad):
    with pytest.raises(TrigactError) as err:
        parse_eps(bad, "trigger.eps")
    assert "trigger.eps" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("big", ["1e9/255", "256/255", 1.5, 2])
def test_parse_eps_refuses_more_than_the_pixel_range(big):
    for allow_zero, allowed in ((True, "[0, 1]"), (False, "(0, 1]")):
        with pytest.raises(TrigactError) as err:
            parse_eps(big, "trigger.eps", allow_zero=allow_zero)
        assert str(err.value).startswith(f"trigger.eps={big!r} must be in {allowed}")
        assert "\n" not in str(err.value)
    assert parse_eps("255/255") == 1.0  # the whole range is still allowed


def test_callers_refuse_an_epsilon_above_one():
    from trigact.attacks import build_attack
    from trigact.attacks.config import attack_config
    from trigact.models import build_model
    from trigact.common.config import CONF_DIR

    with pytest.raises(TrigactError, match=r"^trigger.eps='1e9/255' must be in \(0, 1\]"):
        build_trigger("fixed", (1, 4, 4), eps="1e9/255")
    with pytest.raises(TrigactError, match=r"^trigger.alpha='1e9/255' must be in \(0, 1\]"):
        build_trigger("learnable", (1, 4, 4), alpha="1e9/255")
    net = build_model("mlp", num_classes=2, in_chans=1, image_size=4)
    with pytest.raises(TrigactError, match=r"^attack.eps='1e9/255' must be in \[0, 1\]"):
        build_attack("pgd", net, eps="1e9/255")
    with pytest.raises(TrigactError, match=r"^attack_overrides.eps='1e9/255' must be in \[0, 1\]"):
        attack_config(CONF_DIR, "pgd", {"eps": "1e9/255"})


def test_build_trigger_registry_errors():
    with pytest.raises(TrigactError, match="known: fixed, learnable, none"):
        build_trigger("patch", (1, 4, 4), eps=0.1)
    with pytest.raises(TrigactError, match="trigger.eps"):
        build_trigger("fixed", (1, 4, 4))
    assert build_trigger("none", (1, 4, 4)) is None


LOGITS_POS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
LOGITS_NEG = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
TARGET = torch.tensor([0, 1])


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_loss_matches_hand_computation_default_direction():
    ce = -(math.log(_softmax([2.0, 0.0, -1.0])[0]) + math.log(_softmax([0.5, 1.5, 0.0])[1])) / 2
    # KL(U || p) = sum_c 1/3 * (log 1/3 - log p_c), averaged over the batch.
    kl = sum(sum((1 / 3) * (math.log(1 / 3) - math.log(p)) for p in _softmax(r)) for r in LOGITS_NEG.tolist()) / 2
    out = trigger_activation_loss(LOGITS_POS, LOGITS_NEG, TARGET, kl_weight=0.5)
    assert out.ce.item() == pytest.approx(ce, rel=1e-6)
    assert out.kl.item() == pytest.approx(kl, rel=1e-6)
    assert out.loss.item() == pytest.approx(ce + 0.5 * kl, rel=1e-6)
    # ... and it is PyTorch's literal reading of L_KLD(z_neg, 1/C * 1_C).
    ref = F.kl_div(F.log_softmax(LOGITS_NEG, 1), torch.full((2, 3), 1 / 3), reduction="batchmean")
    assert out.kl.item() == pytest.approx(ref.item(), rel=1e-6)


def test_loss_matches_hand_computation_other_direction():
    # KL(p || U) = sum_c p_c (log p_c - log 1/3).
    kl = sum(sum(p * (math.log(p) - math.log(1 / 3)) for p in _softmax(r)) for r in LOGITS_NEG.tolist()) / 2
    out = trigger_activation_loss(LOGITS_POS, LOGITS_NEG, TARGET, kl_direction="pred_to_uniform")
    assert out.kl.item() == pytest.approx(kl, rel=1e-6)


@pytest.mark.parametrize("direction", ["uniform_to_pred", "pred_to_uniform"])
def test_kl_is_zero_exactly_at_uniform_and_positive_elsewhere(direction):
    assert kl_to_uniform(torch.full((4, 10), 2.5), direction).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_to_uniform(LOGITS_NEG, direction).item() > 0.1


def _kl_gradient(logits, direction):
    z = logits.clone().requires_grad_(True)
    kl_to_uniform(z, direction).backward()
    return z.grad


def test_kl_gradients_match_their_closed_forms():
    # Per image, with p = softmax(z) and H(p) its entropy:
    #   d KL(U || p) / dz = p - U;   d KL(p || U) / dz_k = p_k (log p_k + H(p));
    # both divided by the batch size (batch mean).
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    p = z.softmax(dim=1)
    entropy = -(p * p.log()).sum(dim=1, keepdim=True)
    batch, classes = z.shape
    assert torch.allclose(_kl_gradient(z, "uniform_to_pred"), (p - 1 / classes) / batch)
    assert torch.allclose(_kl_gradient(z, "pred_to_uniform"), p * (p.log() + entropy) / batch)


def test_only_the_kl_from_the_prediction_vanishes_at_a_peaked_prediction():
    # As p -> one-hot, d KL(p || U) / dz -> 0 (a confident clean prediction is barely pushed back),
    # while d KL(U || p) / dz -> e_top - U, which does not vanish.
    previous = math.inf
    for peak in (2.0, 5.0, 10.0, 20.0, 40.0):
        z = torch.tensor([[peak, 0.0, 0.0, 0.0]], dtype=torch.float64)
        pred_to_uniform = _kl_gradient(z, "pred_to_uniform").norm().item()
        assert pred_to_uniform < previous
        previous = pred_to_uniform
        assert _kl_gradient(z, "uniform_to_pred").norm().item() > 0.5
    assert previous < 1e-14
    limit = torch.tensor([[0.75, -0.25, -0.25, -0.25]], dtype=torch.float64)  # e_0 - U
    assert torch.allclose(_kl_gradient(z, "uniform_to_pred"), limit)


def test_unknown_kl_direction():
    with pytest.raises(TrigactError, match="known"):
        kl_to_uniform(LOGITS_NEG, "sideways")
