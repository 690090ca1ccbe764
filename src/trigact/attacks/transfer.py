"""Attacks torchattack implements, with every hyperparameter pinned here (not torchattack's defaults).

Iterative attacks use step size ``alpha = eps / steps`` (``alpha: None``), as the transfer papers do.
Models take pixels in [0, 1] and normalize inside, so ``normalize=None`` throughout.
"""

from __future__ import annotations

import torchattack

from trigact.attacks.registry import register_attack


@register_attack("ifgsm", params={"alpha": None})
def ifgsm(model, *, device, eps, steps, alpha):
    """I-FGSM (Kurakin et al., 2017): iterated signed gradient steps, no random start."""
    return torchattack.IFGSM(
        model, normalize=None, device=device, eps=eps, steps=steps, alpha=alpha
    )


@register_attack("pgd", params={"alpha": None, "random_start": True})
def pgd(model, *, device, eps, steps, alpha, random_start):
    """PGD (Madry et al., 2018): I-FGSM from a uniform random start in the eps-ball."""
    return torchattack.PGD(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        random_start=random_start,
    )


@register_attack("mifgsm", params={"alpha": None, "decay": 1.0})
def mifgsm(model, *, device, eps, steps, alpha, decay):
    """MI-FGSM (Dong et al., 2018): momentum over L1-normalized gradients, decay 1.0 as in the paper."""
    return torchattack.MIFGSM(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        decay=decay,
    )


# DI-FGSM: torchattack defaults to resize_rate=0.9 and diversity_prob=1.0 (shrink, always transform).
# The original paper (Xie et al., CVPR 2019; cihangxie/DI-2-FGSM) resizes a W x W image to rnd x rnd
# with rnd uniform in [W, int(1.1 W)), zero-pads to int(1.1 W) and feeds that, with probability
# p = 0.5 (else the image unchanged). torchattack's `input_diversity` with resize_rate=1.1 reproduces
# exactly that, so we pin resize_rate=1.1, diversity_prob=0.5. decay=1.0 makes it M-DI2-FGSM, the
# momentum variant most transfer papers report as "DI". The transformed input is int(1.1 W) wide, as
# in the paper: surrogates must accept that size (all our conv nets pool adaptively; `mlp` does not).
@register_attack(
    "difgsm",
    params={"alpha": None, "decay": 1.0, "resize_rate": 1.1, "diversity_prob": 0.5},
)
def difgsm(model, *, device, eps, steps, alpha, decay, resize_rate, diversity_prob):
    """DI-FGSM (Xie et al., 2019) with momentum (M-DI2-FGSM): random resize-and-pad with p = 0.5."""
    return torchattack.DIFGSM(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        decay=decay,
        resize_rate=resize_rate,
        diversity_prob=diversity_prob,
    )


# torchattack's NAA aggregates gradients over scaled copies of x that do not require grad, so the
# gradient reaches the feature layer only through the weights: they must stay trainable.
@register_attack(
    "naa",
    params={"alpha": None, "decay": 1.0, "num_ens": 30},
    feature_level=True,
    needs_param_grads=True,
)
def naa(model, *, device, eps, steps, alpha, decay, num_ens, feature_layer):
    """NAA (Zhang et al., CVPR 2022): neuron-attribution-weighted feature attack, N = 30 integration steps."""
    return torchattack.NAA(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        decay=decay,
        num_ens=num_ens,
        feature_layer_cfg=feature_layer,
    )


@register_attack(
    "fia",
    params={"alpha": None, "decay": 1.0, "num_ens": 30, "drop_rate": 0.3},
    feature_level=True,
)
def fia(model, *, device, eps, steps, alpha, decay, num_ens, drop_rate, feature_layer):
    """FIA (Wang et al., ICCV 2021): feature importance from N = 30 pixel-dropped copies (drop 0.3)."""
    return torchattack.FIA(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        decay=decay,
        num_ens=num_ens,
        drop_rate=drop_rate,
        feature_layer_cfg=feature_layer,
    )


# BSR's rotation range (-24, 24) degrees is hard-coded in torchattack, and matches the paper.
@register_attack(
    "bsr", params={"alpha": None, "decay": 1.0, "num_scale": 20, "num_block": 3}
)
def bsr(model, *, device, eps, steps, alpha, decay, num_scale, num_block):
    """BSR (Wang et al., CVPR 2024): 20 copies, 3x3 blocks shuffled and rotated, with momentum."""
    return torchattack.BSR(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        decay=decay,
        num_scale=num_scale,
        num_block=num_block,
    )


@register_attack(
    "gra",
    params={"alpha": None, "beta": 3.5, "eta": 0.94, "num_neighbors": 20, "decay": 1.0},
)
def gra(model, *, device, eps, steps, alpha, beta, eta, num_neighbors, decay):
    """GRA (Zhu et al., ICCV 2023): gradient relevance over 20 neighbours (beta 3.5, decay indicator 0.94)."""
    return torchattack.GRA(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        beta=beta,
        eta=eta,
        num_neighbors=num_neighbors,
        decay=decay,
    )


@register_attack(
    "l2t",
    params={"alpha": None, "decay": 1.0, "num_scale": 5, "ops_num": 2, "aug_lr": 0.01},
)
def l2t(model, *, device, eps, steps, alpha, decay, num_scale, ops_num, aug_lr):
    """L2T (Zhu et al., CVPR 2024): learnt augmentation schedule over 100 ops, 5 samples per step."""
    from trigact.attacks.l2t import PortableL2T

    return PortableL2T(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        decay=decay,
        num_scale=num_scale,
        ops_num=ops_num,
        aug_lr=aug_lr,
    )


@register_attack(
    "rpa",
    params={
        "alpha": None,
        "decay": 1.0,
        "num_ens": 60,
        "patch_sizes": (1, 3, 5, 7),
        "p_modify": 0.3,
        "fill": "uniform",
        "ens_batch": 10,
    },
    feature_level=True,
)
def rpa(
    model,
    *,
    device,
    eps,
    steps,
    alpha,
    decay,
    num_ens,
    patch_sizes,
    p_modify,
    fill,
    ens_batch,
    feature_layer,
):
    """RPA (Zhang et al., IJCAI 2022): FIA over N = 60 random patch-masked copies (n in 1,3,5,7; p_m 0.3)."""
    from trigact.attacks.rpa import RPA

    return RPA(
        model,
        normalize=None,
        device=device,
        eps=eps,
        steps=steps,
        alpha=alpha,
        decay=decay,
        num_ens=num_ens,
        patch_sizes=tuple(patch_sizes),
        p_modify=p_modify,
        fill=fill,
        ens_batch=ens_batch,
        feature_layer_cfg=feature_layer,
    )
