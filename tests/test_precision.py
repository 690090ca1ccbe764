"""bf16 autocast for attacks (trigact.common.precision): it is recorded in the attack's config and its
bank key (fp32 keys unchanged), convolutions really run in bf16, and the image stays fp32 in the box."""

import pytest
import torch
from torch import nn

from trigact.attacks import attack_from_config
from trigact.attacks.config import attack_config
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.common.precision import parse_precision
from trigact.evaluation.bank import bank_key, key_hash


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)
        self.spec = {"num_classes": 10}
        self.conv_dtypes = []
        self.conv.register_forward_hook(lambda m, i, o: self.conv_dtypes.append(o.dtype))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("value,expected", [(None, None), ("32", None), ("fp32", None), (32, None),
                                            ("32-true", None), ("bf16", "bf16"), ("bf16-mixed", "bf16")])
def test_parse_precision(value, expected):
    assert parse_precision(value) == expected


def test_a_bad_precision_is_one_line():
    with pytest.raises(TrigactError, match="attack_overrides.precision='fp8': expected one of 32"):
        attack_config(CONF_DIR, "pgd", {"precision": "fp8"})


def test_bf16_is_in_the_config_and_bank_key_and_fp32_keys_are_unchanged():
    plain = attack_config(CONF_DIR, "pgd")
    assert "precision" not in plain and attack_config(CONF_DIR, "pgd", {"precision": "32"}) == plain
    bf16 = attack_config(CONF_DIR, "pgd", {"precision": "bf16"})
    assert bf16 == {**plain, "precision": "bf16"}

    def key(cfg):
        return key_hash(bank_key("digits", "s", "pgd", cfg, cfg["eps"], cfg["steps"]))

    assert key(bf16) != key(plain)  # a bf16 bank is another bank, never reused as the fp32 one


@pytest.mark.parametrize("precision,conv_dtype", [(None, torch.float32), ("bf16", torch.bfloat16)])
def test_attack_runs_its_passes_in_the_asked_precision(precision, conv_dtype):
    torch.manual_seed(0)
    net = ConvNet()
    cfg = attack_config(CONF_DIR, "pgd", {"eps": "8/255", "steps": 3, "precision": precision})
    attack = attack_from_config(cfg, net)
    assert attack.config.get("precision") == precision
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    x_adv = attack(x, y)
    assert net.conv_dtypes and set(net.conv_dtypes) == {conv_dtype}
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and (x_adv - x).abs().max() > 0
    assert 0 <= x_adv.min() and x_adv.max() <= 1


def test_bf16_covers_the_model_only_not_the_attacks_own_ops():
    """TI-FGSM smooths the gradient with a conv of its own: that stays fp32 while the model runs bf16,
    and the model's forward is its own again after the attack."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = ConvNet()
    cfg = attack_config(CONF_DIR, "tifgsm", {"eps": "8/255", "steps": 2, "precision": "bf16"})
    attack = attack_from_config(cfg, net)
    dtypes = []
    real_conv2d = F.conv2d

    def spy(input, weight, *args, **kwargs):
        out = real_conv2d(input, weight, *args, **kwargs)
        if weight.shape[1] == 1 and weight.shape[0] == input.shape[1]:  # the depthwise smoothing kernel
            dtypes.append(out.dtype)
        return out

    original_forward = net.forward
    F.conv2d = spy
    try:
        attack(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    finally:
        F.conv2d = real_conv2d
    assert set(net.conv_dtypes) == {torch.bfloat16}
    assert dtypes and set(dtypes) == {torch.float32}
    assert net.forward == original_forward and "forward" not in net.__dict__
