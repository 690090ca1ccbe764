"""A tiny vision transformer for 16x16 digits, 28x28 Fashion-MNIST and 32x32 CIFAR images.

It is timm's own ``VisionTransformer`` (the class the ViT-only attacks TGR, PNA-PatchOut, ATT and VDC hook:
``blocks[i].attn.attn_drop``, ``blocks[i].attn.qkv``, ``blocks[i].mlp``, ``blocks[i].norm2``, ``norm``), only
small: 4x4 patches, width 48, 4 blocks of 2 heads, a class token. The sizes are ours, chosen to train in
seconds on 2 CPU cores; ViT-B/16 (the attacks' papers' surrogate) is ``patch 16, dim 768, depth 12, heads 12``.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trigact.common.errors import TrigactError
from trigact.models.registry import check_int, register_model


@register_model("vit_tiny", family="small", feature_layer="backbone.blocks.1", min_image_size=4)
def vit_tiny(num_classes: int, in_chans: int, image_size: int, patch_size: int = 4, embed_dim: int = 48,
             depth: int = 4, num_heads: int = 2) -> nn.Module:
    """timm's VisionTransformer, tiny: 4x4 patches, width 48, 4 blocks of 2 heads, class token."""
    where = " (model 'vit_tiny')"
    for name, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth),
                        ("num_heads", num_heads)):
        check_int(name, value, 1, where)
    if image_size % patch_size:
        raise TrigactError(f"image_size={image_size} is not a multiple of patch_size={patch_size}{where}")
    if embed_dim % num_heads:
        raise TrigactError(f"embed_dim={embed_dim} is not a multiple of num_heads={num_heads}{where}")
    return VisionTransformer(
        img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=2.0, qkv_bias=True,
        # Resized inputs (DI-FGSM, L2T, ...): the position embedding is resampled and the image padded
        # to whole patches; at image_size both are the identity.
        dynamic_img_size=True, dynamic_img_pad=True,
    )
