"""Two processes asking for the same TAE bank at once: one crafts it, the other waits and reuses it."""

import multiprocessing
import os
import time

import torch

from trigact.evaluation.bank import BANK_FILE, LOCK_FILE, META_FILE, load_bank

BATCHES = 3


def _slow_attack_factory(calls_file):
    def slow_attack(x, y):
        with open(calls_file, "a") as f:  # O_APPEND: lines of both processes never interleave
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the second process asks while the first is crafting
        return (x + 4 / 255).clamp(0, 1)

    return slow_attack


def _craft_in_child(root, barrier, calls_file, out_file):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from trigact.evaluation.bank import ensure_bank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(4 * BATCHES, 1, 4, 4), torch.randint(0, 3, (4 * BATCHES,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    barrier.wait(timeout=120)  # both processes are imported and ready: now they really overlap
    bank = ensure_bank(root, "digits", "linear-s0", None, model, "slow", _slow_attack_factory(calls_file),
                       {"name": "slow"}, "8/255", 1, loader, progress=False)
    torch.save({"x_adv": bank.x_adv, "x_clean": bank.x_clean, "y": bank.y, "path": str(bank.path)}, out_file)


def test_two_processes_crafting_one_bank_give_one_bank(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    calls = tmp_path / "calls.txt"
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    procs = [ctx.Process(target=_craft_in_child, args=(str(tmp_path / "root"), barrier, str(calls), str(out)))
             for out in outs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=180)
    assert [proc.exitcode for proc in procs] == [0, 0]

    pids = calls.read_text().split()
    assert len(pids) == BATCHES and len(set(pids)) == 1  # the attack ran once, in one process
    results = [torch.load(out, weights_only=True) for out in outs]
    assert results[0]["path"] == results[1]["path"]
    for key in ("x_adv", "x_clean", "y"):
        assert torch.equal(results[0][key], results[1][key])

    (folder,) = (tmp_path / "root" / "advbank" / "digits" / "linear-s0").iterdir()  # one bank
    assert str(folder) == results[0]["path"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([BANK_FILE, META_FILE, LOCK_FILE])
    bank = load_bank(folder)
    assert torch.equal(bank.x_adv, results[0]["x_adv"]) and torch.equal(bank.y, results[0]["y"])
