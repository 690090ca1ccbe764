"""Diff-PGD (Xue et al., NeurIPS 2023, "Diffusion-Based Adversarial Sample Generation for Improved
Stealthiness and Controllability"): PGD through a diffusion purification step (SDEdit).

It needs a pretrained diffusion model (the paper uses guided-diffusion's unconditional ImageNet
256x256 checkpoint, ``256x256_diffusion_uncond.pt``), which cannot be obtained on our machines. The
entry is registered so that configs and tables can name it, and building it fails with one clear line
instead of silently running something else.
"""

from __future__ import annotations

from trigact.attacks.registry import register_attack
from trigact.common.errors import TrigactError


@register_attack("diff_pgd", params={"alpha": None, "diffusion_weights": None})
def diff_pgd(model, *, device, eps, steps, alpha, diffusion_weights):
    """Diff-PGD (Xue et al., 2023): not available, it needs a pretrained diffusion model."""
    given = (
        f" (diffusion_weights={diffusion_weights!r} given)" if diffusion_weights else ""
    )
    raise TrigactError(
        "attack 'diff_pgd' needs a pretrained diffusion model (guided-diffusion 256x256_diffusion_uncond.pt, "
        f"as in Xue et al. 2023) and is not implemented in this build{given}; choose another attack"
    )
