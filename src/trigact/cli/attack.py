"""``python -m trigact.attack surrogates=[...] attacks=[...]``: craft TAE banks for trained surrogates.

Surrogates are picked by bundle, run folder, glob or Hydra sweep folder (see
:mod:`trigact.runs.selection`). One bank per (surrogate, attack) on the first ``n_eval`` test
images of the surrogates' dataset (validation images with ``split=val``), in ``<output_dir>/advbank/``;
existing complete banks are reused, never redone, so this is also how a pipeline's banks are found
again. Ends with a table of each bank's white-box success rate on its own surrogate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trigact.attacks.config import budget_overrides
from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.tracking import job_run, log_tables
from trigact.common.validate import check_n_eval, check_seed, check_split, check_steps
from trigact.evaluation.budgets import check_attacks, craft_at_budgets
from trigact.evaluation.crafting import data_config_of, evaluation_images
from trigact.common.batching import AUTO, batch_size_for
from trigact.common.devices import model_device
from trigact.evaluation.tables import bank_rows
from trigact.runs import register_resolvers
from trigact.runs.selection import as_dict, select

ATTACK_COPIES = 32  # the most copies of a batch one attack forward holds in the suite, rounded up

register_resolvers()


def run_attack(cfg: DictConfig) -> list[dict]:
    # Every setting is checked before the surrogates and the data load, and before the first bank.
    batch_size = cfg.batch_size if cfg.batch_size == AUTO else check_steps(cfg.batch_size, "batch_size")
    seed = check_seed(cfg.seed, "seed")
    n_eval, split = check_n_eval(cfg.get("n_eval")), check_split(cfg.get("split", "test"))
    overrides = budget_overrides(as_dict(cfg.get("attack_protocol")), as_dict(cfg.get("attack_overrides")),
                                 as_dict(cfg.get("attack_params")))
    data_overrides = as_dict(cfg.get("data_overrides"))
    check_attacks(CONF_DIR, cfg.attacks, overrides)
    surrogates = select(cfg, "surrogates")
    data_cfg = data_config_of(surrogates)
    images = evaluation_images(data_cfg, n_eval, data_overrides, split=split)
    # auto: the largest batch whose forward and input-gradient backward fit on every surrogate's device,
    # divided by the widest attack's copies per forward (FIA's 30 aggregate samples, BSR's 20 shuffles,
    # Admix's 15 mixes: torchattack concatenates them into one batch).
    if batch_size == AUTO:
        batch_size = batch_size_for(surrogates.values(), tuple(images[0][0].shape), AUTO)
        if any(model_device(m).type == "cuda" for m in surrogates.values()):
            batch_size = max(1, batch_size // ATTACK_COPIES)
    banks = craft_at_budgets(
        cfg.paths.output_dir, data_cfg["name"], images, surrogates, list(cfg.attacks), CONF_DIR,
        overrides, batch_size=batch_size, seed=seed, progress=bool(cfg.get("progress", True)),
        n_eval=n_eval, split=split, data_overrides=data_overrides,
    )
    rows = bank_rows(banks)
    run = job_run(cfg, "attack", f"attack-{data_cfg['name']}", Path(cfg.paths.output_dir))
    if run is not None:
        log_tables(run, {"banks": rows})
        run.finish()
    return rows


def print_banks(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="trigact.attack: TAE banks")
    for column in ("surrogate", "attack", "n", "clean acc", "white-box success"):
        table.add_column(column, justify="left" if column in ("surrogate", "attack") else "right")
    for row in rows:
        # Labels are data, not markup: an attack row "pgd@[8/255]" or a run "[a]" must print as written.
        table.add_row(escape(row["surrogate"]), escape(row["attack"]), str(row["n"]), f"{100 * row['clean acc']:.2f}",
                      f"{100 * row['white-box success']:.2f}")
    Console().print(table)


def print_attack_list() -> None:
    """``python -m trigact.attack --list``: every attack with its family, class, pinned settings and paper."""
    from rich.console import Console
    from rich.table import Table

    from trigact.attacks import FAMILIES, describe_attacks

    table = Table(title="trigact.attack --list: attacks (conf/attack/<name>.yaml); budget: attack_protocol")
    for column in ("attack", "family", "class", "settings", "paper"):
        table.add_column(column, overflow="fold")
    for row in describe_attacks():
        table.add_row(*(str(row[c]) for c in ("attack", "family", "class", "settings", "paper")))
    Console(width=max(160, Console().width)).print(table)
    print("families: " + "; ".join(f"{k}: {v}" for k, v in FAMILIES.items()))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="attack")
def hydra_main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        rows = run_attack(cfg)
        print_banks(rows)
        print(f"banks: {Path(cfg.paths.output_dir, 'advbank').resolve()}")


def main() -> None:
    if "--list" in sys.argv[1:]:
        with user_errors():
            print_attack_list()
        return
    hydra_main()


if __name__ == "__main__":
    main()
