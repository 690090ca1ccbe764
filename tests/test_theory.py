"""Theorems 1 and 2 measured (``trigact.analysis.theory``): hand computations on a linear toy model,
the bound's formula on a synthetic bank, and the command on the shrunken demo pipeline."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trigact.analysis.theory import input_gradient_mean, sign_agreement, theorem1_row, theorem2_rows
from trigact.evaluation.bank import Bank
from trigact.models.deployed import DeployedModel


def linear_model():
    """f(x) = W flatten(x) + b on 1x2x2 images, 3 classes, float64; and (W, b) as numpy."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.5, -2.0, 0.5, 1.0], [-1.0, 0.7, 2.0, -0.3], [0.2, 1.1, -1.4, 0.8]]))
        net[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return net, net[1].weight.detach().numpy().copy(), net[1].bias.detach().numpy().copy()


def toy_images(n=5):
    x = torch.tensor(np.random.default_rng(0).uniform(0.2, 0.8, size=(n, 1, 2, 2)))
    y = torch.tensor([0, 1, 2, 1, 0][:n])
    return x, y


def hand_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def hand_gradients(W, b, x, y):
    """Per-image grad_x CE(Wx + b, y) = W^T (softmax(Wx + b) - onehot(y)), and the per-image CE."""
    flat = x.reshape(len(x), -1)
    p = hand_softmax(flat @ W.T + b)
    onehot = np.eye(W.shape[0])[y]
    return (p - onehot) @ W, -np.log(p[np.arange(len(y)), y])


def test_theorem1_equals_the_closed_form_on_a_linear_model():
    net, W, b = linear_model()
    x, y = toy_images()
    grads, ce = hand_gradients(W, b, x.numpy(), y.numpy())
    g_hand = grads.mean(0)  # the mean of each image's own gradient

    # batch_size 2 over 5 images: a batch-mean loss would scale the gradients by 1/2 (or 1/1).
    g = input_gradient_mean(net, x, y, batch_size=2)
    assert g.shape == (1, 2, 2)
    np.testing.assert_allclose(g.flatten().numpy(), g_hand, rtol=1e-12, atol=1e-14)

    # tau: -eps sgn(g) on coordinates 0 and 1 (agree), +eps sgn(g) on 3 (disagrees), 0 on 2 (not counted).
    eps = 0.2
    s = np.sign(g_hand)
    assert (s != 0).all()
    tau_np = np.array([-eps * s[0], -eps * s[1], 0.0, eps * s[3]])
    tau = torch.tensor(tau_np).reshape(1, 2, 2)
    agree = (-np.sign(g_hand) == np.sign(tau_np)) & (tau_np != 0)
    counted = tau_np != 0
    hand_agreement = agree.sum() / counted.sum()
    hand_weighted = np.abs(g_hand)[agree].sum() / np.abs(g_hand)[counted].sum()
    assert hand_agreement == pytest.approx(2 / 3)

    signs = sign_agreement(g, tau)
    assert signs["coords"] == 3
    assert signs["agreement"] == pytest.approx(hand_agreement, abs=1e-12)
    assert signs["weighted"] == pytest.approx(hand_weighted, abs=1e-12)

    row, g_row = theorem1_row("toy", DeployedModel(net, tau), x, y, batch_size=2)
    torch.testing.assert_close(g_row, g)
    g_dot_tau = float(g_hand @ tau_np)
    assert row["g_dot_tau"] == pytest.approx(g_dot_tau, abs=1e-12)
    assert g_dot_tau < 0  # two agreeing coordinates against one: a descent direction here
    assert row["sign_agreement"] == pytest.approx(hand_agreement, abs=1e-12)
    assert row["sign_agreement_weighted"] == pytest.approx(hand_weighted, abs=1e-12)
    assert row["classes"] == 3 and row["minus_log_c"] == pytest.approx(-math.log(3))
    assert row["eq9_ratio"] == pytest.approx(g_dot_tau / -math.log(3), abs=1e-12)
    assert row["eq9_le"] == (g_dot_tau <= -math.log(3))
    assert row["eps_t"] == pytest.approx(eps) and row["support"] == pytest.approx(0.75)
    norms = np.linalg.norm(g_hand) * np.linalg.norm(tau_np)
    assert row["cos_neg_g_tau"] == pytest.approx(-g_dot_tau / norms, abs=1e-12)
    # The first-order picture: CE(f(x)) + g^T tau against CE(f(x + tau)), all by hand.
    assert row["ce_clean"] == pytest.approx(ce.mean(), abs=1e-12)
    assert row["first_order"] == pytest.approx(ce.mean() + g_dot_tau, abs=1e-12)
    shifted = x.numpy().reshape(5, -1) + tau_np
    _, ce_shift = hand_gradients(W, b, shifted.reshape(5, 1, 2, 2), y.numpy())
    assert row["ce_trigger_unclamped"] == pytest.approx(ce_shift.mean(), abs=1e-12)
    clamped = np.clip(shifted, 0, 1)  # pixels 0.2-0.8 and |tau| 0.2: the clamp does not bite here
    _, ce_clamp = hand_gradients(W, b, clamped.reshape(5, 1, 2, 2), y.numpy())
    assert row["ce_trigger"] == pytest.approx(ce_clamp.mean(), abs=1e-12)
    per_image = ce + ((clamped - x.numpy().reshape(5, -1)) * grads).sum(1)
    assert row["first_order_clamped"] == pytest.approx(per_image.mean(), abs=1e-12)


def test_theorem2_bound_and_loss_on_a_synthetic_bank():
    net, W, b = linear_model()
    x, y = toy_images()
    tau_np = np.array([0.2, -0.1, 0.0, 0.05])  # eps_t = max |tau| = 0.2
    tau = torch.tensor(tau_np).reshape(1, 2, 2)
    model = DeployedModel(net, tau)
    delta = np.random.default_rng(1).choice([-1.0, 1.0], size=(5, 4)) * (8 / 255)
    x_adv = torch.tensor(np.clip(x.numpy().reshape(5, -1) + delta, 0, 1)).reshape(5, 1, 2, 2)
    g = input_gradient_mean(net, x, y)
    g_np = g.flatten().numpy()

    def bank(eps):
        return Bank(x_adv=x_adv, x_clean=x, y=y, meta={"eps": eps}, path=Path(f"synthetic-{eps}"))

    banks = {("s", "tiny"): bank(1e-3), ("s", "huge"): bank(1.0)}
    rows = theorem2_rows("toy", model, g, banks, batch_size=2, ce_clean_train=1.25,
                         accuracies={("s", "tiny"): 0.4})
    _, ce_adv = hand_gradients(W, b, np.clip(x_adv.numpy().reshape(5, -1) + tau_np, 0, 1).reshape(5, 1, 2, 2), y.numpy())
    _, ce_clean = hand_gradients(W, b, np.clip(x.numpy().reshape(5, -1) + tau_np, 0, 1).reshape(5, 1, 2, 2), y.numpy())
    by_attack = {r["attack"]: r for r in rows}
    for attack, eps in (("tiny", 1e-3), ("huge", 1.0)):
        row = by_attack[attack]
        bound = eps / 0.2 * math.log(3)
        assert row["eps"] == eps and row["eps_t"] == pytest.approx(0.2)
        assert row["bound"] == pytest.approx(bound, rel=1e-12)
        assert row["ce_adv"] == pytest.approx(ce_adv.mean(), abs=1e-12)
        assert row["ce_clean"] == pytest.approx(ce_clean.mean(), abs=1e-12)
        assert row["increase"] == pytest.approx(ce_adv.mean() - ce_clean.mean(), abs=1e-12)
        assert row["holds"] == (ce_adv.mean() <= bound)
        g_dot_delta = ((x_adv.numpy() - x.numpy()).reshape(5, -1) @ g_np).mean()
        assert row["g_dot_delta"] == pytest.approx(g_dot_delta, abs=1e-12)
        assert row["first_order_loss"] == pytest.approx(1.25 + g_np @ tau_np + g_dot_delta, abs=1e-12)
        assert row["linear_max"] == pytest.approx(eps * np.abs(g_np).sum(), abs=1e-12)
    # The loss sits between the two bounds: the comparison's direction is tested both ways.
    assert by_attack["tiny"]["holds"] is False and by_attack["huge"]["holds"] is True
    assert by_attack["tiny"]["acc_matrix"] == 0.4 and by_attack["huge"]["acc_matrix"] is None


def test_the_theory_command_on_the_demo_pipeline(shrunk_demo, tmp_path):
    """``python -m trigact.analysis.theory`` in a fresh process: one Theorem 1 row per trigger victim,
    one Theorem 2 row per (trigger victim, matrix.csv cell), on the very banks matrix.csv was scored on."""
    import subprocess
    import sys

    root, _ = shrunk_demo
    results = root / "outputs" / "pipeline" / "demo"
    out = tmp_path / "theory"
    done = subprocess.run([sys.executable, "-m", "trigact.analysis.theory", f"results={results}", f"out_dir={out}",
                           f"paths.root_dir={tmp_path}", "n_train=200"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"md: {out / 'theory.md'}" in done.stdout and "Theorem 2" in done.stdout

    records = json.loads((results / "victims.json").read_text())
    trigger_victims = [r["name"] for r in records if r["trigger_kind"] != "none"]
    assert len(trigger_victims) == 2
    with open(results / "matrix.csv") as handle:
        cells = [line.split(",") for line in handle.read().splitlines()[1:]]
    pairs = sorted({(c[1], c[2]) for c in cells})
    assert len(pairs) == 4

    text = (out / "theory.md").read_text()
    t1_table = text.split("## Theorem 1")[1].split("## Theorem 2")[0]
    t1_rows = [line for line in t1_table.splitlines() if line.startswith("| ") and not line.startswith("| victim")]
    assert sorted(line.split(" | ")[0][2:] for line in t1_rows) == sorted(trigger_victims)
    assert "- standard: no trigger" in text

    report = json.loads((out / "theory.json").read_text())
    assert report["skipped"] == [{"name": "standard", "reason": "no trigger"}] and report["notes"] == []
    assert sorted((r["victim"], r["surrogate"], r["attack"]) for r in report["theorem2"]) == sorted(
        (v, *p) for v in trigger_victims for p in pairs)
    accuracy = {(c[0], c[1], c[2]): float(c[3]) for c in cells}
    for row in report["theorem2"]:
        assert row["acc_adv"] == pytest.approx(accuracy[(row["victim"], row["surrogate"], row["attack"])], abs=1e-9)
        assert row["bound"] == pytest.approx(row["eps"] / row["eps_t"] * math.log(row["classes"]), rel=1e-12)
        assert row["holds"] == (row["ce_adv"] <= row["bound"])
    for row in report["theorem1"]:
        assert 0 <= row["sign_agreement"] <= 1 and row["n_train"] == 200
    # The pipeline recorded which bank each cell used (banks.json); theory read exactly those.
    recorded = {(b["surrogate"], b["attack"]): str(Path(b["bank"])) for b in json.loads((results / "banks.json").read_text())}
    assert set(recorded) == set(pairs)
    assert all(str(Path(row["bank"])) == recorded[(row["surrogate"], row["attack"])] for row in report["theorem2"])
    csv_lines = (out / "theory.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(report["theorem1"]) + len(report["theorem2"])


def test_named_banks_and_bad_input(shrunk_demo, tmp_path):
    from hydra import compose, initialize_config_dir

    from trigact.cli.theory import run_theory
    from trigact.common.config import CONF_DIR
    from trigact.common.errors import TrigactError

    root, _ = shrunk_demo
    results = root / "outputs" / "pipeline" / "demo"
    banks = f"{root}/outputs/advbank/**/pgd-*"

    def config(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="theory", overrides=[f"paths.root_dir={tmp_path}", f"out_dir={tmp_path}/t",
                                                            "n_train=50", *overrides])

    done = run_theory(config(f"results={results}", f"banks=['{banks}']"))
    assert {r["attack"] for r in done["theorem2"]} == {"pgd"} and len(done["theorem2"]) == 4
    assert all(r["acc_adv"] == pytest.approx(r["acc_matrix"]) for r in done["theorem2"])
    # banks.json is read as is: with nothing to search (an empty bank_root) every cell still finds its bank,
    # and without banks.json the same setting finds none.
    (tmp_path / "empty").mkdir()
    found = run_theory(config(f"results={results}", f"bank_root={tmp_path / 'empty'}"))
    assert len(found["theorem2"]) == 8
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("victims.json", "matrix.csv", "runs.json"):
        (bare / name).write_bytes((results / name).read_bytes())
    assert run_theory(config(f"results={bare}", f"bank_root={tmp_path / 'empty'}"))["theorem2"] == []
    with pytest.raises(TrigactError, match="matches no TAE bank"):
        run_theory(config(f"results={results}", f"banks=['{root}/nothing-*']"))
    with pytest.raises(TrigactError, match="has no victims.json"):
        run_theory(config(f"results={tmp_path}"))
