"""The paper's Fig. 2 (``-tau`` with a proportion of its signs flipped, ``trigact.analysis.flip``) and
Fig. 3 / Table XI (the triggers and their magnitudes, ``trigact.analysis.triggers``)."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers_hydra import QUIET, compose_config
from trigact.analysis.flip import flip_count, flip_curve, flip_mask, flipped_delta, run_flip
from trigact.analysis.triggers import run_triggers, trigger_magnitudes
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.runs.bundle import load_bundle
from trigact.training.run import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """8x8 digits runs: fixed trigger 64/255 (6 epochs: deployed ~97%, its raw network ~40%), learnable
    alpha 16/255 (2 epochs) and standard (1 epoch, no trigger)."""
    root = tmp_path_factory.mktemp("flip")
    out = {}
    for name, overrides in (("fixed", ["trigger=fixed", "trigger.eps=64/255", "trainer.max_epochs=6"]),
                            ("learnable", ["trigger=learnable", "trigger.alpha=16/255", "trainer.max_epochs=2"]),
                            ("standard", ["method=standard", "trainer.max_epochs=1"])):
        out[name] = train(compose_config("train", [*QUIET, "data.image_size=8", *overrides], root))["run_dir"]
    return root, out


def test_trigger_table_xi_mse_by_hand():
    tau = torch.tensor([[[0.1, -0.2], [0.0, 0.3]]], dtype=torch.float64)
    assert trigger_magnitudes(tau)["mse"] == pytest.approx((0.01 + 0.04 + 0.0 + 0.09) / 4, abs=1e-7)
    # A fixed trigger is +-eps_t everywhere: MSE = eps_t^2; Table XI's 6.30e-2 for "Ours (fixed)" is 64/255.
    fixed = (64 / 255) * torch.where(torch.rand(3, 8, 8) > 0.5, 1.0, -1.0)
    assert trigger_magnitudes(fixed)["mse_1e-2"] == pytest.approx(6.30, abs=0.005)
    stats = trigger_magnitudes(tau)
    assert stats["max_abs_255"] == pytest.approx(0.3 * 255) and stats["nonzero_fraction"] == 0.75
    assert stats["mean_abs_255"] == pytest.approx(0.15 * 255)


def test_flip_count_is_exact_and_flips_the_sign_of_minus_tau():
    tau = torch.linspace(-0.2, 0.3, 20).view(1, 4, 5)  # a learnable-like trigger: not +-eps everywhere
    generator = torch.Generator().manual_seed(0)
    for p, k in ((0.0, 0), (0.05, 1), (0.33, 7), (0.5, 10), (0.97, 19), (1.0, 20)):
        assert flip_count(20, p) == k
        mask = flip_mask(tau.shape, p, generator)
        assert mask.shape == tau.shape and int(mask.sum()) == k
        delta = flipped_delta(tau, mask)
        assert torch.equal(delta[mask], tau[mask]) and torch.equal(delta[~mask], -tau[~mask])
    # From one permutation, masks of growing p are nested.
    order = torch.randperm(20, generator=generator)
    small, large = flip_mask(tau.shape, 0.2, order=order), flip_mask(tau.shape, 0.6, order=order)
    assert bool((small <= large).all()) and int(small.sum()) == 4 and int(large.sum()) == 12


def split_tensors(model, n=360):
    from trigact.evaluation.crafting import data_config_of, evaluation_images

    dataset = evaluation_images(data_config_of({"run": model}), n, split="test")
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def accuracy(net, x, y) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).double().mean())


def test_minus_tau_cancels_the_trigger_and_flipping_it_restores_accuracy(runs):
    _, run_dirs = runs
    model = load_bundle(f"{run_dirs['fixed']}/bundle.pt")
    x, y = split_tensors(model)
    tau = model.trigger
    raw = accuracy(model.net, x, y)  # the raw network on clean x, computed here independently
    deployed = accuracy(model, x, y)
    assert deployed > raw + 0.3  # a working trigger-activation model
    ps = [0.0, 0.5, 1.0]
    # The paper's algebra f(x + delta + tau): at p = 0 exactly the raw network on x.
    rows = flip_curve(model, x, y, ps, n_draws=3, seed=0, batch_size=128, clamp_perturbed=False)
    assert rows[0]["acc_mean"] == pytest.approx(raw, abs=1e-9) and rows[0]["acc_std"] == 0
    # p = 1: delta = +tau, the network sees clamp(x + 2 tau).
    assert rows[2]["acc_mean"] == pytest.approx(accuracy(model.net, (x + 2 * tau).clamp(0, 1), y), abs=1e-9)
    # The default: the perturbed image is clamped, then the deployed unit adds tau; at p = 0 the network
    # sees x up to clamping, clamp(clamp(x - tau) + tau).
    clamped = flip_curve(model, x, y, ps, n_draws=3, seed=0, batch_size=128)
    cancelled = ((x - tau).clamp(0, 1) + tau).clamp(0, 1)
    assert clamped[0]["acc_mean"] == pytest.approx(accuracy(model.net, cancelled, y), abs=1e-9)
    assert clamped[2]["acc_mean"] == pytest.approx(rows[2]["acc_mean"], abs=1e-9)  # +tau: clamping is the same
    # Fig. 2: -tau is a fast path (the model falls to its raw guessing); flipping half of its signs
    # makes it a poor perturbation.
    assert rows[0]["acc_mean"] < deployed - 0.3
    assert rows[1]["acc_mean"] > rows[0]["acc_mean"] + 0.2
    assert rows[1]["acc_std"] > 0 and clamped[1]["acc_std"] > 0  # the draws differ
    # Seeded: the same curve again.
    again = flip_curve(model, x, y, ps, n_draws=3, seed=0, batch_size=60)
    assert [a for r in again for a in r["accs"]] == pytest.approx([a for r in clamped for a in r["accs"]], abs=1e-9)


def flip_cfg(root, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="flip", overrides=[f"paths.root_dir={root}", *overrides])


def test_flip_command_writes_its_table_csv_json_and_figure(runs, tmp_path):
    root, run_dirs = runs
    result = run_flip(flip_cfg(tmp_path, f"run={run_dirs['fixed']}", "ps=[0,0.1,1]", "n_draws=2", "n_images=100"))
    out = result["table"].parent
    # Default results_dir: outputs/analysis/flip/<dataset>/<run id>.
    assert out.parent == tmp_path / "outputs" / "analysis" / "flip" / "digits"
    assert out.name.startswith("trigger_activation__small_cnn__fixed-eps64-") and out.name.endswith("__s0")
    assert {p.name for p in out.iterdir()} >= {"flip.md", "flip.csv", "flip.json", "flip.png"}
    saved = json.loads((out / "flip.json").read_text())
    assert [r["p"] for r in saved["rows"]] == [0.0, 0.1, 1.0] and saved["settings"]["n_images_used"] == 100
    assert saved["tau"]["max_abs_255"] == pytest.approx(64) and saved["bundle"].endswith("bundle.pt")
    assert (out / "flip.csv").read_text().splitlines()[0] == "p,n_flipped,acc_mean,acc_std,loss_mean,loss_std"
    table = (out / "flip.md").read_text()
    assert "f_t(x), deployed, clean" in table and "f(x), raw network, clean" in table and "Cancel residue" in table


def test_flip_refuses_a_run_without_a_trigger_in_one_line(runs, tmp_path, monkeypatch, capsys):
    _, run_dirs = runs
    with pytest.raises(TrigactError, match="has no trigger, so no tau to flip"):
        run_flip(flip_cfg(tmp_path, f"run={run_dirs['standard']}"))
    # The entry point as `python -m trigact.analysis.flip run=...` runs it (in this process: no new
    # interpreter to start): one line and status 2.
    from trigact.analysis import flip

    monkeypatch.setattr(sys, "argv", ["flip", f"run={run_dirs['standard']}", f"paths.root_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        flip.main()
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("trigact: error: run=") and "small_cnn standard s0 (standard) has no trigger" in line


def test_triggers_figure_and_table_for_two_runs_as_a_user_runs_it(runs, tmp_path):
    _, run_dirs = runs
    proc = subprocess.run([sys.executable, "-m", "trigact.analysis.triggers",
                           f"runs=[{run_dirs['fixed']},{run_dirs['learnable']}]", "name=two",
                           f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "outputs" / "analysis" / "triggers" / "two"
    assert (out / "triggers.png").stat().st_size > 1000
    table = (out / "triggers.md").read_text()
    assert "small_cnn fixed eps 64/255 s0" in table and "small_cnn learnable alpha 16/255 s0" in table
    rows = {r["run"]: r for r in json.loads((out / "triggers.json").read_text())["runs"]}
    fixed = rows["small_cnn fixed eps 64/255 s0"]
    assert fixed["MSE(0, tau) (1e-2)"] == pytest.approx(100 * (64 / 255) ** 2) and fixed["nonzero"] == 1.0
    assert "figure:" in proc.stdout and "table:" in proc.stdout


def test_triggers_refuses_runs_without_a_trigger_naming_them(runs, tmp_path):
    _, run_dirs = runs
    cfg = compose_config("triggers", [f"runs=[{run_dirs['fixed']},{run_dirs['standard']}]", "show_example=false"],
                         tmp_path)
    with pytest.raises(TrigactError, match=r"runs without a trigger \(nothing to draw\): small_cnn standard s0;"):
        run_triggers(cfg)
    assert not (tmp_path / "outputs" / "analysis" / "triggers").exists() or not any(
        (tmp_path / "outputs" / "analysis" / "triggers").rglob("triggers.png"))
