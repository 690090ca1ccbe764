"""``python -m trigact.train``: train one model (standard or with trigger activation) and write its bundle.

Thin on purpose: :func:`trigact.training.run.train` builds the datamodule, the network, the trigger
and the method's LightningModule from the Hydra config, calls ``Trainer.fit``, tests, and saves the
deployment bundle; this prints its summary.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.report import print_table
from trigact.runs import register_resolvers
from trigact.runs.status import RunLocked
from trigact.training.run import train

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        try:
            summary = train(cfg)
        except RunLocked as busy:
            # Another launch (e.g. an overlapping sweep) is training this very run: not an error
            # of this launch, and a sweep's other jobs go on.
            print(f"skipped: {busy}")
            return
        if not summary.get("is_global_zero", True):
            return  # under DDP only rank 0 reports (and writes)
        print_table([{"name": f"{cfg.method.name} / {cfg.model.name}", **summary}], "trigact.train")
        print(f"bundle: {summary['bundle']}")


if __name__ == "__main__":
    main()
