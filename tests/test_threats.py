"""The adaptive rungs of the threat ladder (L5 query-only, L6 white box), their sanity flags and the
level every bank records, on tiny digits models (a few seconds each on one thread)."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from _helpers_torch import one_thread, train_digits_net  # noqa: F401  (one_thread: a module fixture)
from trigact.attacks import build_attack
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.models.deployed import DeployedModel
from trigact.threats import build_adaptive, level_meta, sanity_flags, transfer_level
from trigact.threats.adaptive import apgd, pgd_restarts, square, trigger_flip

FIXED_RUN = "digits/trigger_activation/small_cnn/fixed-eps32-*/s0"


@pytest.fixture(scope="module")
def digits_net():
    from trigact.data import DigitsDataModule

    dm = DigitsDataModule(image_size=16, batch_size=128, seed=0)
    dm.setup()
    net = train_digits_net(dm, "small_cnn", 4)
    for p in net.parameters():
        p.requires_grad_(False)
    x, y = next(iter(dm.test_dataloader()))
    return DeployedModel(net).eval(), x[:100], y[:100]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_levels_are_named_and_a_transfer_attackers_level_follows_from_its_surrogate():
    standard = DeployedModel(nn.Linear(4, 3))
    trigger = DeployedModel(nn.Linear(4, 3), torch.zeros(4))
    assert transfer_level(standard) == "L0" and transfer_level(trigger) == "L2"
    fake = type("Fused", (nn.Module,), {})  # an ensemble is recognised by its members
    ensemble, same_paradigm = fake(), fake()
    ensemble.members, same_paradigm.members = [standard, trigger], [trigger, trigger]
    assert transfer_level(ensemble) == "L1" and transfer_level(same_paradigm) == "L3"
    assert level_meta("L6")["name"] == "white box, tau known"
    with pytest.raises(TrigactError, match=r"unknown threat level 'L9'; known: L0, L1, L2, L3, L4, L5, L6"):
        level_meta("L9")


def test_pgd_with_restarts_and_apgd_reach_near_zero_where_pgd20_does_not(digits_net):
    """At 12/255 the paper's PGD-20 (step eps/20, one start) leaves about a quarter of the images right
    (measured 26%); 50 steps of 2.5 eps/50 with 5 restarts and APGD leave 6% and 2%."""
    model, x, y = digits_net
    eps = 12 / 255
    assert accuracy(model, x, y) > 0.85
    pgd20 = accuracy(model, build_attack("pgd", model, eps=eps, steps=20)(x, y), y)
    strong = {"pgd50x5": pgd_restarts(model, eps)(x, y), "apgd_ce": apgd(model, eps)(x, y),
              "apgd_dlr": apgd(model, eps, loss="dlr")(x, y)}
    assert pgd20 >= 0.15, pgd20
    for name, adv in strong.items():
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1, name
        assert accuracy(model, adv, y) <= 0.12, (name, accuracy(model, adv, y))
    one_start = accuracy(model, pgd_restarts(model, eps, restarts=1)(x, y), y)
    assert accuracy(model, strong["pgd50x5"], y) <= one_start  # a restart only ever adds fooled images


class QueryCounter(nn.Module):
    """Counts the images the attack queries (every forward call, every image in it)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


def test_square_stays_inside_its_query_budget_and_the_eps_ball(digits_net):
    model, x, y = digits_net
    x, y = x[:40], y[:40]
    counted = QueryCounter(model).eval()  # torchattacks restores a wrapper's train mode recursively
    adv = square(counted, 16 / 255, n_queries=200)(x, y)
    assert (adv - x).abs().max() <= 16 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # At most n_queries per image plus the two initial evaluations (stopping early on fooled images).
    assert counted.images <= len(x) * (200 + 2), counted.images / len(x)
    assert accuracy(model, adv, y) < 0.3  # scores alone are enough (measured: 0% at 500 queries)


def test_a_bad_threat_attack_setting_is_one_line():
    model = DeployedModel(nn.Flatten())
    for spec, message in [({"kind": "cw"}, "unknown kind of threat attack 'a' 'cw'; known: apgd, pgd_restarts"),
                          ({"kind": "apgd", "steps": 0}, "a.steps=0 must be an integer >= 1"),
                          ({"kind": "apgd", "stepz": 3}, "has no parameter 'stepz'; allowed: loss, steps"),
                          ({"kind": "apgd", "loss": "cw"}, "unknown APGD loss 'cw'; known: ce, dlr")]:
        with pytest.raises(TrigactError) as err:
            build_adaptive("a", spec, model, "8/255")
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TrigactError, match="trigger_flip needs a victim with a trigger"):
        trigger_flip(model, 8 / 255)


def test_the_theorem_2_direction_hurts_a_trigger_model_more_than_random_signs(shrunk_demo):
    """On the demo's fixed-trigger run (eps_t 32/255): -eps sign(tau) cancels the trigger, so f sees
    (nearly) the clean input it was trained to guess on; random signs of the same size do not. Measured
    on the 2-epoch shrunk demo run: 40% against 56% (a fully trained trigger model falls further)."""
    from trigact.evaluation.crafting import evaluation_images
    from trigact.runs.bundle import BUNDLE_NAME, load_bundle

    root, _ = shrunk_demo
    (run,) = (root / "outputs" / "runs").glob(FIXED_RUN)
    model = load_bundle(run / BUNDLE_NAME).eval()
    images = evaluation_images(model.meta["config"]["data"], 200)
    x, y = (torch.stack(t) for t in zip(*(images[i] for i in range(len(images)))))
    eps = 32 / 255
    flipped = accuracy(model, trigger_flip(model, eps)(x, y), y)
    torch.manual_seed(0)
    noise = accuracy(model, (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1), y)
    assert flipped < noise - 0.1, (flipped, noise)


def test_sanity_flags_fire_on_a_gradient_masked_victim_and_not_on_a_normal_one(digits_net):
    model, x, y = digits_net

    class Quantized(nn.Module):  # a non-differentiable front end: zero input gradient everywhere
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(torch.round(x * 4) / 4)

    normal = sanity_flags(model, x, y, whitebox_acc=0.0, weaker_accs={"square": 0.3})
    assert normal["flags"] == [], normal
    masked = sanity_flags(Quantized(model), x, y, whitebox_acc=0.6, weaker_accs={"square": 0.3})
    text = " | ".join(masked["flags"])
    assert "zero input gradient on 100% of the images" in text
    assert "white-box accuracy 60.0% above square 30.0%" in text
    assert masked["checks"]["zero_gradient_share"] == 1.0


def test_evaluate_threat_l6_writes_a_table_with_worst_case_and_the_level(shrunk_demo, tmp_path, capsys):
    """``python -m trigact.evaluate threat=L6`` on the demo's runs, shrunk: every attack per victim, the
    Theorem 2 row only where there is a trigger, the level in threat.json, and the sanity report."""
    import shutil

    from trigact.cli.evaluate import run_evaluate

    root, _ = shrunk_demo
    shutil.copytree(root / "outputs" / "runs", tmp_path / "outputs" / "runs")
    overrides = [f"paths.root_dir={tmp_path}", "threat=L6", "name=l6", "n_eval=40", "threat.eps=16/255",
                 "victims=[digits/standard/small_cnn/*/s0," + FIXED_RUN + "]",
                 "threat.attacks.pgd50x5.steps=10", "threat.attacks.apgd_ce.steps=10",
                 "threat.attacks.apgd_dlr.steps=10", "threat.attacks.square_1000.n_queries=50"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        matrix, groups, out = run_evaluate(compose(config_name="evaluate", overrides=overrides))
    table = (out / "table.md").read_text()
    assert "| trigger_flip |" in table and "| Worst case |" in table
    standard, fixed = list(groups)
    assert ("L6 white box, tau known", "trigger_flip") not in {(c["surrogate"], c["attack"]) for c in matrix.cells
                                                                if c["victim"] == standard}
    worst = matrix.worst_case()
    for victim in (standard, fixed):
        cells = [c["accuracy"] for c in matrix.cells if c["victim"] == victim]
        assert len(cells) == (4 if victim == standard else 5) and worst[victim] <= min(cells)
    assert worst[standard] < 0.2  # white box at 16/255 on an undefended digits model
    report = json.loads((out / "threat.json").read_text())
    assert report["threat"]["level"] == "L6" and set(report["sanity"]) == {standard, fixed}
    # A relaunch (here under another name) attacks nothing again: every (victim, level) result is reused.
    capsys.readouterr()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        again, _, out2 = run_evaluate(compose(config_name="evaluate", overrides=[*overrides[:2], "name=l6_again",
                                                                               *overrides[3:]]))
    assert capsys.readouterr().out.count("reusing adaptive result") == 2
    assert sorted(again.cells, key=str) == sorted(matrix.cells, key=str)
    assert (out2 / "table.md").read_text() == table


def test_a_transfer_bank_records_its_attackers_level(shrunk_demo):
    root, _ = shrunk_demo
    metas = [json.loads(p.read_text()) for p in (root / "outputs" / "advbank").rglob("meta.json")]
    assert metas and all(m["threat"]["level"] == "L0" for m in metas)  # the demo's standard surrogates


def split_tensors(model, split, n):
    """The first n images of a run's ``split`` and their labels, as two tensors."""
    from trigact.evaluation.crafting import evaluation_images

    images = evaluation_images(model.meta["config"]["data"], n, split=split)
    x, y = (torch.stack(t) for t in zip(*(images[i] for i in range(len(images)))))
    return x, y.long()


def test_l4_the_defenders_objective_recovers_a_trigger_that_activates_f(shrunk_demo):
    """L4 on the demo's fixed-trigger run (eps_t 32/255, 2 epochs), from 128 validation images (the
    attacker's own, never test images), scored on the test images. Measured: sign agreement 0.64
    (chance is 0.5: pixels where f's gradient is flat keep their random start), yet the estimate
    activates f as well as tau itself (75% right against 71%; 40% with no trigger). The bounds leave
    room below the measurement for other torch builds."""
    from trigact.runs.bundle import BUNDLE_NAME, load_bundle
    from trigact.threats.estimate import estimate_quality, estimate_trigger

    root, _ = shrunk_demo
    (run,) = (root / "outputs" / "runs").glob(FIXED_RUN)
    model = load_bundle(run / BUNDLE_NAME).eval()

    def tensors(split, n):
        return split_tensors(model, split, n)

    x, y = tensors("val", 128)
    estimate = estimate_trigger(model.net, x, y, bound=32 / 255, steps=20, restarts=1)
    assert estimate.tau.abs().max() <= 32 / 255 + 1e-6 and estimate.tau.shape == model.trigger.shape
    quality = estimate_quality(model.net, model.trigger, estimate.tau, *tensors("test", 360))
    assert quality["sign_agreement"] > 0.55
    assert quality["acc_estimate"] > quality["acc_no_trigger"] + 0.2
    assert quality["acc_estimate"] > quality["acc_true_trigger"] - 0.1
    random = estimate_quality(model.net, model.trigger, torch.sign(torch.randn_like(model.trigger)) * 32 / 255,
                              *tensors("test", 360))
    assert abs(random["sign_agreement"] - 0.5) < 0.1  # a random sign pattern: chance agreement


def test_l4_a_neural_cleanse_style_estimate_activates_f(shrunk_demo):
    """The second L4 estimator: a mask and pattern that send each of 128 validation images to its own
    label (NC's inversion with targets = y), on the demo's fixed-trigger run; scored on test images.
    Measured: f(stamp(x)) 73.6% right against 70.8% for f(x + tau) and 40.3% for f(x), with a mask of
    L1 104 (of 256 pixels) whose mean perturbation has cosine 0.17 with tau: like the defender's-objective
    estimate, a trigger unlike tau that activates f as well. The bound leaves room for other builds."""
    from trigact.runs.bundle import BUNDLE_NAME, load_bundle
    from trigact.threats.estimate import estimate_stamp, stamp_quality

    root, _ = shrunk_demo
    (run,) = (root / "outputs" / "runs").glob(FIXED_RUN)
    model = load_bundle(run / BUNDLE_NAME).eval()

    def tensors(split, n):
        return split_tensors(model, split, n)

    stamp, success = estimate_stamp(model.net, *tensors("val", 128), steps=30, batch_size=64)
    quality = stamp_quality(model.net, model.trigger, stamp, *tensors("test", 360))
    assert stamp.mask.shape == (1, *model.trigger.shape[1:]) and 0 <= float(stamp.mask.min()) <= float(stamp.mask.max()) <= 1
    assert quality["acc_estimate"] > quality["acc_no_trigger"] + 0.2


def test_l4_a_usb_style_universal_estimate_activates_f(shrunk_demo):
    """The third L4 estimator: USB's Alg. 4.1 with each image's own label as its target, grown on 128
    validation images inside the guessed box (32/255), 2 passes, scored on test images. Measured:
    f(x + v) 75.3% right against 70.8% for f(x + tau) and 40.3% for f(x), with sign agreement 0.49 and
    cosine 0.09 with tau: a perturbation unrelated to tau that activates f as well as tau does. The
    bounds: inside the box; f(x + v) well above f(x); the attacker's own accuracy it reports is what
    f(x + v) gives on its images."""
    from trigact.runs.bundle import BUNDLE_NAME, load_bundle
    from trigact.threats.estimate import estimate_quality, estimate_universal

    root, _ = shrunk_demo
    (run,) = (root / "outputs" / "runs").glob(FIXED_RUN)
    model = load_bundle(run / BUNDLE_NAME).eval()
    x, y = split_tensors(model, "val", 128)
    estimate = estimate_universal(model.net, x, y, bound=32 / 255, max_passes=2, deepfool_steps=20)
    assert estimate.tau.shape == model.trigger.shape and estimate.tau.abs().max() <= 32 / 255 + 1e-6
    assert 1 <= estimate.passes <= 2
    own = estimate_quality(model.net, model.trigger, estimate.tau, x, y)
    assert own["acc_estimate"] == pytest.approx(estimate.accuracy)
    quality = estimate_quality(model.net, model.trigger, estimate.tau, *split_tensors(model, "test", 360))
    assert quality["acc_estimate"] > quality["acc_no_trigger"] + 0.2
    # A target f(x) already reaches (it is right on about 40% without a trigger) needs no pass.
    assert estimate_universal(model.net, x, y, bound=32 / 255, target_accuracy=0.05).passes == 0
    with pytest.raises(TrigactError, match="universal.max_passes"):
        estimate_universal(model.net, x, y, bound=32 / 255, max_passes=0)


def test_evaluate_threat_l4_estimates_each_trigger_on_validation_images_and_scores_on_f_t(shrunk_demo, tmp_path):
    import shutil

    from trigact.cli.evaluate import run_evaluate

    root, _ = shrunk_demo
    shutil.copytree(root / "outputs" / "runs", tmp_path / "outputs" / "runs")
    base = [f"paths.root_dir={tmp_path}", "threat=L4", "n_eval=40", "threat.eps=16/255",
            "victims=[digits/standard/small_cnn/*/s0," + FIXED_RUN + "]", "threat.estimate.n_images=64",
            "threat.estimate.steps=5", "threat.estimate.restarts=1", "threat.attacks.pgd50_estimate.steps=5",
            "threat.attacks.apgd_ce_estimate.steps=5", "threat.attacks.pgd50_raw.steps=5",
            "threat.attacks.pgd50_nc.steps=5", "threat.neural_cleanse.steps=10", "threat.attacks.pgd50_universal.steps=5",
            "threat.universal.max_passes=1", "threat.universal.deepfool_steps=10"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        matrix, groups, out = run_evaluate(compose(config_name="evaluate", overrides=[*base, "name=l4"]))
        with pytest.raises(TrigactError, match=r"through='victim'; allowed: estimate, neural_cleanse, universal, raw"):
            run_evaluate(compose(config_name="evaluate", overrides=[*base, "name=bad",
                                                                    "threat.attacks.pgd50_raw.through=victim"]))
        with pytest.raises(TrigactError, match="validation split; evaluate on split=test"):
            run_evaluate(compose(config_name="evaluate", overrides=[*base, "name=bad2", "split=val"]))
    report = json.loads((out / "threat.json").read_text())
    standard, fixed = list(groups)
    assert report["threat"]["level"] == "L4"
    estimate = report["sanity"][fixed]["estimate"]
    assert 0 <= estimate["sign_agreement"] <= 1 and estimate["acc_estimate"] > estimate["acc_no_trigger"]
    assert report["sanity"][standard]["estimate"]["sign_agreement"] is None  # no trigger to agree with
    assert {(c["victim"], c["attack"]) for c in matrix.cells} == {
        (v, a) for v in (standard, fixed)
        for a in ("pgd50_estimate", "apgd_ce_estimate", "pgd50_nc", "pgd50_universal", "pgd50_raw")}
    universal = report["sanity"][fixed]["universal"]
    assert universal["passes"] == 1 and 0 <= universal["sign_agreement"] <= 1 and 0 <= universal["attacker_accuracy"] <= 1
    nc = report["sanity"][fixed]["neural_cleanse"]
    assert nc["mask_l1"] > 0 and -1 <= nc["cosine"] <= 1 and 0 <= nc["acc_estimate"] <= 1
    assert report["sanity"][standard]["neural_cleanse"]["cosine"] is None
    cells = {(c["victim"], c["attack"]): c["accuracy"] for c in matrix.cells}
    # On a standard victim the raw network is the victim: white box, so it falls far below clean.
    assert cells[(standard, "pgd50_raw")] < matrix.clean[standard] - 0.3


def test_the_pipeline_ladder_writes_one_table_over_levels(shrunk_demo, tmp_path, capsys):
    """pipeline.ladder on the shrunk demo, plus one same-paradigm surrogate run: L0 (a standard
    surrogate), L1 (an ensemble), L2 (a trigger-activation surrogate, attacked through its own
    deployed unit) and L6 (white box), each level its own matrix, and ladder.md/csv/png with a Mean and a
    Worst case row per level and the clamp statistic of each trigger victim."""
    import csv
    import shutil

    from conftest import DEMO_OVERRIDES
    from trigact.cli.pipeline import run_pipeline

    root, _ = shrunk_demo
    shutil.copytree(root / "outputs" / "runs", tmp_path / "outputs" / "runs")
    ladder = ("{L0:{surrogates:[surrogate_lenet]},L1:{surrogates:[{ensemble:[surrogate_lenet,surrogate_tiny_resnet]}]},"
              "L2:{surrogates:[ta_lenet]},L6:{overrides:{eps:16/255,attacks:{pgd50x5:{steps:5,restarts:2},"
              "apgd_ce:{steps:5},apgd_dlr:{steps:5},square_1000:{n_queries:30}}}}}")
    overrides = [f"paths.root_dir={tmp_path}", *DEMO_OVERRIDES, "pipeline.attacks=[pgd]", "pipeline.n_eval=40",
                 "+pipeline.runs.ta_lenet=['method=trigger_activation','model=lenet','trigger=fixed','trigger.eps=32/255','seed=1']",
                 f"+pipeline.ladder={ladder}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=overrides)
        run_pipeline(cfg)
        bad = compose(config_name="pipeline", overrides=[*overrides[:-1], "+pipeline.ladder={L2:{surrogates:[fixed_eps32]}}"])
        with pytest.raises(TrigactError, match="run fixed_eps32 is surrogate fixed_eps32 of ladder level L2: that is a white-box"):
            run_pipeline(bad)
    out = tmp_path / "outputs" / "pipeline" / "demo"
    rows = list(csv.DictReader((out / "ladder.csv").open()))
    assert {(r["level"], r["row"]) for r in rows} == {("-", "Clean"), ("all", "Worst case")} | {
        (lv, row) for lv in ("L0", "L1", "L2", "L6") for row in ("Mean", "Worst case")}
    for level in ("L0", "L1", "L2", "L6"):
        assert (out / "ladder" / level / "table.md").is_file()
    assert "ta_lenet" in (out / "ladder" / "L2" / "matrix.csv").read_text()
    banks = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "advbank").rglob("meta.json")]
    assert {b["threat"]["level"] for b in banks} == {"L0", "L1", "L2"}
    acc = {(r["level"], r["row"], r["group"]): float(r["accuracy"]) for r in rows}
    groups = {r["group"] for r in rows}
    for g in groups:  # the white box is the floor of this ladder
        assert acc[("L6", "Worst case", g)] <= min(acc[(lv, "Worst case", g)] for lv in ("L0", "L1", "L2"))
        # every level's attacks together: at most any one level's worst case
        assert acc[("all", "Worst case", g)] <= min(acc[(lv, "Worst case", g)] for lv in ("L0", "L1", "L2", "L6"))
    text = (out / "ladder.md").read_text()
    assert "clamp active" in text and (out / "ladder.png").stat().st_size > 1000
    # A relaunch reuses the banks and L6's finished results: the same ladder, nothing attacked again.
    capsys.readouterr()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run_pipeline(cfg)
    stored = list((tmp_path / "outputs" / "threat" / "digits").rglob("meta.json"))
    assert stored and capsys.readouterr().out.count("reusing adaptive result") == len(stored)
    assert list(csv.DictReader((out / "ladder.csv").open())) == rows


def _level(mask: list[int], surrogate: str, clean: float = 1.0):
    from trigact.evaluation.matrix import RobustnessMatrix

    right = torch.tensor(mask, dtype=torch.bool)
    m = RobustnessMatrix(clean={"v": clean}, clean_n={"v": len(mask)})
    m.cells.append({"victim": "v", "surrogate": surrogate, "attack": "a", "accuracy": right.float().mean().item(),
                    "n": len(mask)})
    m.per_image[("v", surrogate, "a")] = right
    return m


def test_the_ladders_last_row_is_the_worst_case_over_every_level(tmp_path):
    """Each level leaves 3 of 4 images right, but not the same 3: an attacker who may run both levels'
    attacks leaves 2. The row is below every level's, and left out (said) where the levels scored
    other images."""
    import csv

    from trigact.threats.ladder import ENVELOPE_LEVEL, envelope, ladder_rows, write_ladder

    levels = {"L0": _level([1, 1, 0, 1], "s"), "L6": _level([1, 0, 1, 1], "L6 white box")}
    rows = {(r["level"], r["row"]): r["accuracy"] for r in ladder_rows(levels, {"g": ["v"]})}
    assert rows[("L0", "Worst case")] == rows[("L6", "Worst case")] == 0.75
    assert rows[(ENVELOPE_LEVEL, "Worst case")] == 0.5
    write_ladder(levels, {"g": ["v"]}, tmp_path)
    assert "| all | every attacker above | Worst case | 50.00" in (tmp_path / "ladder.md").read_text()
    assert {r["level"] for r in csv.DictReader((tmp_path / "ladder.csv").open())} == {"-", "L0", "L6", "all"}

    other = {"L0": _level([1, 1, 0, 1], "s"), "L6": _level([1, 0, 1, 1, 1], "L6 white box")}  # 5 images, not 4
    merged, why = envelope(other)
    assert merged is None and "did not score the same victims on the same images" in why
    assert ENVELOPE_LEVEL not in {r["level"] for r in ladder_rows(other, {"g": ["v"]})}
    write_ladder(other, {"g": ["v"]}, tmp_path)
    assert "- no all-levels worst case: L6 and L0" in (tmp_path / "ladder.md").read_text()
