"""Ensembles as surrogates: ``surrogates=[run, {ensemble: [runA, runB], fusion: logits|probs}]``.

The fusion and the refusals use tiny untrained networks; crafting and reuse read the runs of the
shrunken demo pipeline (the ``shrunk_demo`` session fixture, shared with test_attack_evaluate.py).
"""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.models import EnsembleModel, build_model, feature_layer
from trigact.models.deployed import DeployedModel
from trigact.models.ensemble import run_paths

LENET = "digits/standard/lenet/*/s0"
TINY = "digits/standard/tiny_resnet"
ENSEMBLE = f"{{ensemble:[{LENET},{TINY}]}}"
CHEAP = ["attacks=[ifgsm]", "attack_overrides.eps=32/255", "attack_overrides.steps=2", "n_eval=24", "progress=false"]


def member(name="mlp", data="digits", image_size=8, seed=0, path=None):
    torch.manual_seed(seed)
    net = build_model(name, num_classes=10, in_chans=1, image_size=image_size)
    meta = {"config": {"data": {"name": data, "image_size": image_size}}, "model": net.spec}
    if path:
        meta["path"] = path
    return DeployedModel(net, None, meta).eval()


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------- the model


def test_logit_fusion_is_the_mean_of_the_members_logits_and_probs_fusion_the_log_mean_softmax():
    members = [member(seed=s) for s in range(3)]
    x = torch.rand(5, 1, 8, 8)
    ensemble = EnsembleModel(members)
    with torch.no_grad():
        z = [m(x) for m in ensemble.members]
        assert torch.equal(ensemble(x), (z[0] + z[1] + z[2]) / 3)
        probs = EnsembleModel(members, fusion="probs")(x)
        mean_softmax = sum(torch.softmax(m(x), 1) for m in members) / 3
        assert torch.allclose(probs, mean_softmax.log(), atol=1e-6)
        assert torch.allclose(probs.exp().sum(1), torch.ones(5))  # log-probabilities: CE works on them
    # Order-independent: another order of the same runs is the same model, bit for bit, and name.
    reordered = EnsembleModel(members[::-1])
    assert reordered.name == ensemble.name and reordered.name.startswith("ensemble-") and len(reordered.name) == 17
    with torch.no_grad():
        assert torch.equal(reordered(x), ensemble(x))
    assert EnsembleModel(members, fusion="probs").name != ensemble.name
    assert EnsembleModel(members[:2]).name != ensemble.name
    assert not ensemble.training and ensemble.meta["model"]["num_classes"] == 10


def test_ensembles_of_mixed_data_duplicates_or_one_member_are_refused_in_one_line():
    with pytest.raises(TrigactError) as err:
        EnsembleModel([member(data="digits"), member(data="fashion_mnist", seed=1)])
    assert "trained on different data" in one_line(err) and "fashion_mnist" in str(err.value)
    with pytest.raises(TrigactError) as err:
        EnsembleModel([member(image_size=8), member(image_size=16, seed=1)])
    assert "different data" in one_line(err)
    same = member()
    with pytest.raises(TrigactError) as err:
        EnsembleModel([same, member()])  # same seed: the same weights
    assert "listed twice" in one_line(err)
    with pytest.raises(TrigactError) as err:
        EnsembleModel([same])
    assert "at least 2" in one_line(err)
    with pytest.raises(TrigactError) as err:
        EnsembleModel([member(), member(seed=1)], fusion="loss")
    assert "unknown ensemble fusion 'loss'; known: logits, probs" == one_line(err)


@pytest.mark.parametrize("attack", ["fia", "naa", "rpa"])
def test_a_feature_level_attack_on_an_ensemble_is_refused_in_one_line_naming_it(tmp_path, attack):
    from trigact.attacks import build_attack
    from trigact.evaluation.crafting import craft_banks

    ensemble = EnsembleModel([member("lenet", image_size=16), member("small_cnn", image_size=16, seed=1)])
    with pytest.raises(TrigactError) as err:
        craft_banks(tmp_path, "digits", [], {"ens": ensemble}, ["pgd", attack], CONF_DIR)
    message = one_line(err)
    assert f"attack {attack!r} is feature-level" in message and "ensemble surrogate ens" in message
    assert not (tmp_path / "advbank").exists()  # refused before the first bank, the valid pgd included
    # The model registry refuses it too, for callers that build the attack directly.
    with pytest.raises(TrigactError) as err:
        feature_layer(ensemble)
    assert "has no single feature layer" in one_line(err)
    with pytest.raises(TrigactError, match="has no single feature layer"):
        build_attack(attack, ensemble, eps="8/255", steps=1)
    assert feature_layer(ensemble.members[0]) == "net.backbone.act2"  # a member alone still has its own


def test_pgd_on_the_ensemble_lowers_the_fused_models_accuracy():
    """White-box on the fused model: cheap, and it fails if the gradient does not reach the members."""
    from trigact.attacks import build_attack

    ensemble = EnsembleModel([member(seed=0), member(seed=1)])
    x, y = torch.rand(32, 1, 8, 8), torch.zeros(32, dtype=torch.long)
    with torch.no_grad():
        y = ensemble(x).argmax(1)  # the fused model is right on every clean image by construction
    x_adv = build_attack("pgd", ensemble, eps="32/255", steps=5)(x, y)
    with torch.no_grad():
        fused_acc = (ensemble(x_adv).argmax(1) == y).float().mean().item()
    assert fused_acc < 0.5
    assert (x_adv - x).abs().max() <= 32 / 255 + 1e-6


# ------------------------------------------------------------------------------ selection and banks


def registry_copy(shrunk_demo, tmp_path):
    root, _ = shrunk_demo
    shutil.copytree(root / "outputs" / "runs", tmp_path / "outputs" / "runs")
    return tmp_path


def compose_entry(name, root, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.root_dir={root}", *overrides])


def test_selection_takes_mixed_entries_and_refuses_bad_ensembles_in_one_line(shrunk_demo):
    from trigact.runs.selection import find_runs, select, select_models

    root, _ = shrunk_demo
    runs_dir = root / "outputs" / "runs"
    cfg = compose_entry("attack", root, [f"surrogates=[{LENET},{ENSEMBLE}]"])  # the command-line syntax
    surrogates = select(cfg, "surrogates")
    assert list(surrogates) == ["lenet standard s0", "ensemble(lenet standard s0 + tiny_resnet standard s0)"]
    ensemble = surrogates["ensemble(lenet standard s0 + tiny_resnet standard s0)"]
    lenet, tiny = find_runs([LENET], runs_dir)[0], find_runs([TINY], runs_dir)[0]
    assert sorted(run_paths(ensemble)) == sorted([str(lenet), str(tiny)])
    assert run_paths(surrogates["lenet standard s0"]) == [str(lenet)]
    # A glob may name several members; the same ensemble twice (another order) counts once.
    both = select_models([{"ensemble": ["digits/standard/[lt]*"], "fusion": "probs"},
                          {"ensemble": [TINY, LENET], "fusion": "probs"}], runs_dir)
    assert list(both) == ["ensemble(lenet standard s0 + tiny_resnet standard s0) probs"]
    single = select_models({"ensemble": [LENET, TINY]}, runs_dir)  # one mapping: one ensemble
    assert [m.name for m in single.values()] == [ensemble.name]

    bad = [({"ensemble": [LENET]}, "an ensemble needs at least 2 distinct runs"),
           ({"ensemble": [LENET, LENET]}, "an ensemble needs at least 2 distinct runs"),
           ({"ensemble": [LENET, TINY], "weights": [1, 2]}, "unknown key(s) weights"),
           ({"members": [LENET, TINY]}, "an ensemble is {ensemble: [runs...], fusion: logits|probs}"),
           ({"ensemble": [LENET, {"ensemble": [TINY]}]}, "ensembles do not nest"),
           ({"ensemble": [LENET, TINY], "fusion": "loss"}, "unknown ensemble fusion 'loss'"),
           ({"ensemble": [LENET, "digits/nothing/*"]}, "no finished run matches 'digits/nothing/*'")]
    for entry, expected in bad:
        with pytest.raises(TrigactError) as err:
            select_models([entry], runs_dir)
        assert expected in one_line(err), (entry, str(err.value))
    with pytest.raises(TrigactError) as err:  # victims are runs: find_runs refuses an ensemble entry
        find_runs([{"ensemble": [LENET, TINY]}], runs_dir)
    assert "an ensemble can only be a surrogate" in one_line(err)


def test_an_ensemble_bank_is_crafted_once_reused_and_named_apart_from_its_members(shrunk_demo, tmp_path, capsys):
    from trigact.cli.attack import run_attack
    from trigact.cli.evaluate import run_evaluate
    from trigact.evaluation.bank import load_bank

    root = registry_copy(shrunk_demo, tmp_path)
    attack = [f"surrogates=[{LENET},{ENSEMBLE}]", *CHEAP]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        rows = run_attack(compose(config_name="attack", overrides=[f"paths.root_dir={root}", *attack]))
    assert capsys.readouterr().out.count("TAE bank written") == 2
    banks = {r["surrogate"]: r for r in rows}
    ens_row = banks["ensemble(lenet standard s0 + tiny_resnet standard s0)"]
    # White-box on the fused model: the bank fools the ensemble it was crafted on.
    assert ens_row["clean acc"] > 0.5 and ens_row["white-box success"] > 0.3, ens_row
    lenet_bank, ens_bank = load_bank(banks["lenet standard s0"]["bank"]), load_bank(ens_row["bank"])
    assert ens_bank.path.parent.name.startswith("ensemble-")
    assert ens_bank.path.parent != lenet_bank.path.parent and ens_bank.path.parent.parent == lenet_bank.path.parent.parent
    key = ens_bank.meta["key"]["surrogate"]
    assert key["name"] == ens_bank.path.parent.name and len(key["sha256"]) == 64
    assert key["ensemble"]["fusion"] == "logits"
    assert [m["run"] for m in key["ensemble"]["members"]] == sorted(
        [lenet_bank.meta["key"]["surrogate"]["name"], next(m["run"] for m in key["ensemble"]["members"]
                                                           if m["run"].startswith("standard__tiny_resnet"))])
    assert "ensemble" not in lenet_bank.meta["key"]["surrogate"]  # a single run's key is unchanged
    json.dumps(ens_bank.meta)

    # Again, members in the other order: the same ensemble, nothing crafted.
    again = [f"surrogates=[{LENET},{{ensemble:[{TINY},{LENET}]}}]", *CHEAP]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        rows2 = run_attack(compose(config_name="attack", overrides=[f"paths.root_dir={root}", *again]))
    out = capsys.readouterr().out
    assert out.count("reusing TAE bank") == 2 and "TAE bank written" not in out
    assert [r["bank"] for r in rows2] == [r["bank"] for r in rows]

    # evaluate finds the ensemble's bank by the same key and scores a victim on it.
    victims = "[digits/standard/small_cnn]"
    evaluate = [f"surrogates=[{ENSEMBLE}]", f"victims={victims}", "name=ens", *CHEAP[:-1]]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        matrix, groups, out_dir = run_evaluate(compose(config_name="evaluate",
                                                       overrides=[f"paths.root_dir={root}", *evaluate]))
    assert "ensemble(lenet standard s0 + tiny_resnet standard s0)" in (out_dir / "matrix.csv").read_text()


def test_a_victim_that_is_a_member_of_an_ensemble_surrogate_is_white_box(shrunk_demo, tmp_path):
    from trigact.cli.attack import run_attack
    from trigact.cli.evaluate import run_evaluate

    root = registry_copy(shrunk_demo, tmp_path)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run_attack(compose(config_name="attack", overrides=[f"paths.root_dir={root}", f"surrogates=[{ENSEMBLE}]",
                                                            *CHEAP]))
        cfg = compose(config_name="evaluate", overrides=[f"paths.root_dir={root}", f"surrogates=[{ENSEMBLE}]",
                                                          f"victims=[{LENET}]", "name=wb", *CHEAP[:-1]])
        with pytest.raises(TrigactError, match="is a member of surrogate ensemble.*white-box"):
            run_evaluate(cfg)


def test_the_pipeline_leaves_out_a_feature_level_attack_on_its_ensemble_and_says_so(shrunk_demo, tmp_path, capsys):
    """An ensemble beside single surrogates with a feature-level attack: the pipeline crafts every pair
    that can run, lists the one that cannot in skipped.json and under table.md, and the fia row averages
    the single surrogates only."""
    import csv

    from conftest import DEMO_OVERRIDES
    from trigact.cli.pipeline import run_pipeline

    root = registry_copy(shrunk_demo, tmp_path)
    plan = ["pipeline.attacks=[pgd,fia]", "pipeline.n_eval=24", "pipeline.attack_overrides.steps=2",
            "pipeline.surrogates=[surrogate_lenet,{ensemble:[surrogate_lenet,surrogate_tiny_resnet]}]"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={root}", *DEMO_OVERRIDES, *plan])
        run_pipeline(cfg)
    out = capsys.readouterr().out
    ensemble = "ensemble(surrogate_lenet + surrogate_tiny_resnet)"
    assert f"skipped: attack 'fia' is feature-level (it needs one network's intermediate layer); it cannot run " \
           f"on surrogate {ensemble}" in out
    results = root / "outputs" / "pipeline" / "demo"
    assert json.loads((results / "skipped.json").read_text()) == [
        {"surrogate": ensemble, "attack": "fia", "reason": "attack 'fia' is feature-level (it needs one network's "
                                                           "intermediate layer)"}]
    cells = {(r["surrogate"], r["attack"]) for r in csv.DictReader((results / "matrix.csv").open())}
    assert cells == {("surrogate_lenet", "pgd"), ("surrogate_lenet", "fia"), (ensemble, "pgd")}
    assert f"fia not on {ensemble}" in (results / "table.md").read_text()
