"""Batch sizes that follow the device's memory: integers kept, ``auto`` from free memory and a measured
per-image footprint on CUDA (the CUDA calls are monkeypatched here), a fixed default elsewhere."""

import pytest
import torch
from torch import nn

from trigact.common import batching
from trigact.common.batching import batch_from_memory, eval_batch_size, probe_bytes_per_image
from trigact.common.errors import TrigactError

MiB, GiB = 1 << 20, 1 << 30


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_an_integer_is_kept_and_never_probed(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("an integer batch size was probed")

    monkeypatch.setattr(batching, "probe_bytes_per_image", no_probe)
    for device in ("cpu", "cuda:0"):
        assert eval_batch_size(small_model(), (1, 8, 8), device, 64) == 64
        assert eval_batch_size(small_model(), (1, 8, 8), device, 1) == 1


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "big", None, "Auto"])
def test_a_bad_request_is_one_line_naming_it(bad):
    with pytest.raises(TrigactError, match="must be an integer >= 1 or 'auto'") as err:
        eval_batch_size(small_model(), (1, 8, 8), "cpu", bad)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)


def test_auto_on_the_cpu_is_the_fixed_default():
    assert eval_batch_size(small_model(), (1, 8, 8), "cpu") == 256
    assert eval_batch_size(small_model(), (1, 8, 8), torch.device("cpu"), "auto", cpu_default=32) == 32
    for shape in ((), (1, 0, 8), "1x8x8", (1, 8.0, 8)):
        with pytest.raises(TrigactError, match="sample_shape"):
            eval_batch_size(small_model(), shape, "cpu")
    with pytest.raises(TrigactError, match="device='tpu!'"):
        eval_batch_size(small_model(), (1, 8, 8), "tpu!")
    with pytest.raises(TrigactError, match="headroom=0"):
        eval_batch_size(small_model(), (1, 8, 8), "cpu", headroom=0)


def test_batch_from_memory_rounds_down_to_a_power_of_two_and_caps():
    assert batch_from_memory(1000, 10, headroom=1.0) == 64  # 100 fit
    assert batch_from_memory(1280, 10, headroom=1.0) == 128  # exactly a power of two
    assert batch_from_memory(1279, 10, headroom=1.0) == 64
    assert batch_from_memory(1000, 10, headroom=0.5) == 32  # 50 fit
    assert batch_from_memory(10 * GiB, 1, cap=4096) == 4096
    assert batch_from_memory(10 * GiB, 1, cap=3000) == 3000
    assert batch_from_memory(5, 10) == 1  # not even one: try one
    assert batch_from_memory(5, 0, cap=512) == 512  # nothing measured per image


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA's memory queries, answered by hand: 10 GiB free, 2 GiB reserved of which 1 GiB in use."""
    stats = {"allocated": 1 * GiB, "peak": 1 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: stats["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return stats


def test_auto_on_cuda_sizes_from_free_memory_and_the_probe(fake_cuda, monkeypatch):
    seen = []

    def probe(model, shape, device, probe_batch, backward):
        seen.append((shape, device, probe_batch, backward))
        return per_image

    monkeypatch.setattr(batching, "probe_bytes_per_image", probe)
    # free = 10 GiB from the driver + 1 GiB cached and unused; 0.8 of it is 9011.2 MiB.
    assert batching.free_cuda_bytes(torch.device("cuda", 0)) == 11 * GiB
    # 8.4 MiB: 1072 fit with the cached GiB (1024), 975 without it (512).
    for per_image, expected in ((4 * MiB, 2048), (3 * MiB, 2048), (1.5 * MiB, 4096), (64 * MiB, 128),
                                (8.4 * MiB, 1024)):
        assert eval_batch_size(small_model(), (1, 8, 8), "cuda", "auto") == expected, per_image
    per_image = 1 * MiB  # 9011 images fit: the cap
    assert eval_batch_size(small_model(), (1, 8, 8), "cuda:0") == 4096
    assert eval_batch_size(small_model(), (1, 8, 8), "cuda:0", cap=1000) == 1000
    assert eval_batch_size(small_model(), [1, 8, 8], "cuda", probe_batch=2, backward=False, headroom=0.001) == 8
    assert seen[-1] == ((1, 8, 8), torch.device("cuda", 0), 2, False)


def test_the_probe_measures_the_peak_per_image_without_side_effects(fake_cuda, monkeypatch):
    """Run on the CPU with the CUDA statistics faked: the peak above what was allocated before,
    per image; eval mode during the probe, every mode restored, no parameter gradient, no RNG drawn,
    no BatchNorm statistics updated."""
    class RandomizedDefense(nn.Module):  # draws from the global RNG in eval mode too (like R&P)
        def forward(self, x):
            return x + 0 * torch.rand_like(x)

    model = nn.Sequential(RandomizedDefense(), *small_model())
    model.train()
    model[3].eval()  # a deliberately frozen submodule stays as it was
    modes = [m.training for m in model.modules()]
    running_mean = model[2].running_mean.clone()
    calls = []

    def forward_hook(module, args, out):
        calls.append((module.training, args[0].shape, args[0].requires_grad))
        fake_cuda["peak"] = fake_cuda["allocated"] + 8 * 3000  # what this forward "allocated"

    model.register_forward_hook(forward_hook)
    rng = torch.get_rng_state()
    per_image = probe_bytes_per_image(model, (1, 8, 8), torch.device("cpu"), probe_batch=8)
    assert per_image == 3000
    assert calls == [(False, (8, 1, 8, 8), True)]
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[2].running_mean, running_mean)

    calls.clear()
    probe_bytes_per_image(model, (1, 8, 8), torch.device("cpu"), probe_batch=2, backward=False)
    assert calls == [(False, (2, 1, 8, 8), False)]
    with torch.inference_mode():  # a caller scoring under inference mode can still probe the backward
        assert probe_bytes_per_image(model, (1, 8, 8), torch.device("cpu"), probe_batch=8) == 3000


def test_a_model_on_another_device_is_refused_before_probing():
    with pytest.raises(TrigactError, match="the model is on cpu, not on cuda:0; move it first"):
        eval_batch_size(small_model(), (1, 8, 8), "cuda:0")


@pytest.mark.requires_gpu
def test_auto_on_a_real_gpu_is_a_power_of_two_that_fits():
    model = small_model().cuda()
    per_image = probe_bytes_per_image(model, (1, 8, 8), torch.device("cuda", torch.cuda.current_device()))
    assert per_image > 0 and all(p.grad is None for p in model.parameters())
    size = eval_batch_size(model, (1, 8, 8), "cuda")
    assert 1 <= size <= 4096 and size & (size - 1) == 0
    x = torch.rand(size, 1, 8, 8, device="cuda", requires_grad=True)
    torch.autograd.grad(model.eval()(x).sum(), [x])  # the batch it chose runs


def test_batch_size_for_keeps_integers_and_takes_the_smallest_auto(monkeypatch):
    from trigact.common import batching

    models = [nn.Linear(2, 2), nn.Linear(2, 2)]
    assert batching.batch_size_for(models, (1, 4, 4), 64) == 64
    assert batching.batch_size_for(models, (1, 4, 4), "auto") == batching.CPU_DEFAULT  # CPU models
    sizes = iter([512, 128])
    monkeypatch.setattr(batching, "eval_batch_size", lambda *a, **k: next(sizes))
    assert batching.batch_size_for(models, (1, 4, 4), "auto") == 128  # one batch size that fits every model
    with pytest.raises(TrigactError, match="batch_size='big' must be an integer >= 1 or 'auto'"):
        batching.batch_size_for(models, (1, 4, 4), "big")
