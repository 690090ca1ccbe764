"""Subclasses of torchattack 1.7.2's feature-level, model-related, ViT and generative attacks that run on any
surrogate built by :func:`trigact.models.build_model` (and anything wrapping one, such as a deployed unit with a
trigger), on any device, channel count and image size, as their papers describe.

Each is registered in torchattack's registry as ``Trigact<Name>`` and named by its ``conf/attack/*.yaml``; none
patches the library's globals. What upstream gets wrong here, shared by several of them:

- **Hooks that outlive the attack.** BFA, DR, FDA, SGM, TGR, PNA-PatchOut and ATT register their forward or
  backward hooks on the surrogate when the attack is *built* and never remove them (FDA only in ``__del__``), so
  every later forward or backward of that surrogate (another attack's, an evaluation's) runs them: SGM's and the
  ViT attacks' hooks go on rescaling its gradients for good (on our tiny_resnet SGM's name-matched hooks land on
  convolutions too, and every later backward fails). Here every hook lives for one call only
  (:class:`_Hooks`), and BPA, which *replaces* the surrogate's ReLU and max-pool modules, puts them back.
- **Hooks found by architecture name.** BPA, SGM, TGR, PNA-PatchOut, ATT and VDC pick their layers by a
  ``hook_cfg`` name (``'resnet50'``, ``'vit_base_patch16_224'``, ...) and the attribute paths of the raw
  torchvision / timm model; on our surrogates (``backbone.layer3``, ``net.backbone.blocks.0``, ...) BPA silently
  changes nothing (it sets a new, unused ``maxpool`` attribute and finds no ``layer3``), the ViT attacks warn and
  fall back to ViT-B's 12 block paths, which do not exist. Here the layers are found by *what they are*: residual
  blocks and dense layers (torchvision's ``BasicBlock``, ``Bottleneck``, ``_DenseLayer``), ``nn.ReLU`` /
  ``nn.MaxPool2d`` modules, and the blocks of timm's ``VisionTransformer``, wherever they sit in the model. A
  surrogate without what an attack needs is refused in one line.
- **Batch coupling.** FDA's and DR's losses (one norm / one standard deviation over the whole batch) and the ViT
  attacks' token choices (TGR, ATT pick the extreme tokens from the batch's *first image* and apply them to all;
  ATT also derives every image's patch mask from image 0) make an image's adversarial example depend on the other
  images of its batch. TAE banks are crafted in batches, so here every loss, choice and mask is per image (what
  each paper's per-image definition, and its authors' batch-size-1 runs, amount to).
- **ViT sizes.** PNA-PatchOut and ATT assume 224x224 inputs with 16x16 patches (a 14x14 grid), ATT also ViT-B's
  12 blocks. Here the grid is the surrogate's own (``patch_embed.patch_size`` over the input size) and ATT's
  per-block settings are ViT-B's scaled to the surrogate's depth. timm's fused attention
  (``scaled_dot_product_attention``) never calls ``attn_drop``, where these attacks reach the attention map, so it
  is switched off for the call (and restored).

Per attack (papers' settings in the configs):

- **BFA**: the aggregate gradient is taken at a masked image that does not require grad, so with the surrogate's
  weights frozen (as :class:`trigact.attacks.TransferAttack` runs it) ``autograd.grad`` fails ("element 0 of
  tensors does not require grad"); here the masked image requires grad. Feature maps of any rank.
- **BPA** (Wang et al., NeurIPS 2023): ReLU's backward replaced by SiLU's derivative and max-pooling's by a
  softmax over each window (temperature 10), for the ReLUs from ``bpa_layer`` on and every max-pool (upstream:
  ResNets only, ``layer3[1:]``, ``layer4`` and the stem's max-pool), modules swapped for the call and put back.
- **DANAA**: its hooks live for one call (upstream's leak when the attack fails, e.g. on a ViT's 3-d features),
  and any feature rank (upstream normalises over dims 1-3 only).
- **DR**: per-image standard deviation of the feature map; upstream's unused ``decay`` argument is dropped.
- **FDA**: per image, channel means at each position as the authors' code (``fda/attacks.py``: ``reduce_mean``
  over the last, channel, axis of NHWC maps; upstream averages over space instead), every ReLU call counted (a
  ResNet block calls its ReLU twice), and PGD steps without momentum as in that code.
- **ILPD**: I-FGSM without momentum as the authors' code (``attacks/utils.py``), no tensor left on the module.
- **SSP**: upstream ignores the surrogate and downloads an ImageNet VGG-16; here the perceptual feature is the
  surrogate's own ``feature_layer`` (null: the model registry's default). SSP needs no labels.
- **SGM** (Wu et al., ICLR 2020): the gradient through each residual branch (dense layer) decays by ``gamma``
  relative to the skip connection, by scaling the blocks' ReLUs as the authors' code does
  (csdongxian/skip-connections-matter, ``utils_sgm.py``): a ``BasicBlock``'s ReLU (used twice) by ``gamma``, a
  ``Bottleneck``'s (used three times) and each of a ``_DenseLayer``'s two by ``gamma ** 0.5``, every residual
  block but the network's first (their ``'layer1.0.relu'`` exclusion) and every dense layer. Upstream's name test
  (``'0.relu' not in name``) also skips the first block of every stage and, by accident, every tenth block
  (``layer3.10``, ...). The authors' per-block gradient normalisation (by the batch's std) only rescales the
  whole gradient, which the sign step ignores: left out.
- **PNA-PatchOut**, **TGR**, **ATT**, **VDC**: see :class:`PortablePNAPatchOut`, :class:`PortableTGR`,
  :class:`PortableATT`, :class:`PortableVDC`. They act on the attention *map* (``attn_drop``'s output), as the
  papers say. (Upstream's module backward hooks on ``attn_drop``, the identity in eval mode, end up on the
  softmax node and so act on the pre-softmax scores; for PNA's zeroing that is the same thing.)
- **BIA, CDA, GAMA, LTP**: generators are loaded only from ``checkpoint_path`` (upstream downloads its release
  weights by default; ``allow_random_init`` builds an untrained generator, for tests only). Grayscale images are
  fed as 3 identical channels and the output averaged back, the generator's input side must be a multiple of 4.
  Their strength is not verified here: no trained generator for our data exists on this machine.
- **DeepFool, GeoDA**: minimum-norm attacks without an eps: refused in one line.

Every subclass returns ``x + delta`` within ``eps`` and ``[clip_min, clip_max]``, detached, and leaves
``self.alpha`` as given (upstream overwrites a None alpha with ``eps / steps`` on the first call).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Self

import torch
import torch.nn.functional as F
from torch import nn
from torchattack.att import ATT
from torchattack.attack import Attack, register_attack
from torchattack.bfa import BFA
from torchattack.bia import BIA
from torchattack.bpa import BPA
from torchattack.cda import CDA
from torchattack.danaa import DANAA
from torchattack.deepfool import DeepFool
from torchattack.dr import DR
from torchattack.fda import FDA
from torchattack.fia import FIA
from torchattack.gama import GAMA
from torchattack.generative.leaky_relu_resnet_generator import (
    ResNetGenerator as LeakyResNetGenerator,
)
from torchattack.generative.resnet_generator import ResNetGenerator
from torchattack.geoda import GeoDA
from torchattack.ilpd import ILPD
from torchattack.ltp import LTP
from torchattack.pna_patchout import PNAPatchOut
from torchattack.sgm import SGM
from torchattack.ssp import SSP
from torchattack.tgr import TGR
from torchattack.vdc import VDC
from torchvision.models.densenet import _DenseLayer
from torchvision.models.resnet import BasicBlock, Bottleneck

import trigact.models.vit  # noqa: F401  (registers vit_tiny, the ViT surrogate of the ViT-only attacks)
from trigact.common.errors import TrigactError

# ----------------------------------------------------------------------------------------------------------------
# Shared machinery: gradient maps, hooks that live for one call, the update loops
# ----------------------------------------------------------------------------------------------------------------


class _GradMap(torch.autograd.Function):
    """Identity forward (a copy: later in-place ops cannot reach back); backward ``fn(grad)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.fn(grad), None


def grad_map(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x`` in the forward pass; the gradient reaching it is replaced by ``fn(gradient)``."""
    return _GradMap.apply(x, fn)


class _Hooks:
    """Hooks registered for one ``with`` block, removed on leaving it (also on an exception)."""

    def __init__(self) -> None:
        self.handles: list = []

    def forward(self, module: nn.Module, fn) -> None:
        self.handles.append(module.register_forward_hook(fn))

    def pre(self, module: nn.Module, fn) -> None:
        self.handles.append(module.register_forward_pre_hook(fn))

    def map_output(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The gradient at ``module``'s output becomes ``fn(gradient)``."""
        self.forward(module, lambda m, i, o: grad_map(o, fn))

    def map_input(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The gradient reaching ``module``'s (first) input through ``module`` becomes ``fn(gradient)``."""
        self.pre(module, lambda m, args: (grad_map(args[0], fn), *args[1:]))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _alpha(attack) -> float:
    return attack.eps / attack.steps if attack.alpha is None else attack.alpha


def _project(attack, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    delta = delta.clamp(-attack.eps, attack.eps)
    return (x + delta).clamp(attack.clip_min, attack.clip_max) - x


def _iterate(attack, x: torch.Tensor, gradient: Callable[[torch.Tensor, int], torch.Tensor],
             delta: torch.Tensor | None = None, decay: float | None = None) -> torch.Tensor:
    """``steps`` sign steps up ``gradient(delta, step)`` (the ascent direction at ``x + delta``), with MI-FGSM's
    momentum ``g <- decay * g + grad / mean|grad|`` when ``decay`` is given, projected into the eps-ball and the
    pixel box after each step."""
    alpha = _alpha(attack)
    x = x.detach()
    delta = torch.zeros_like(x) if delta is None else delta.detach()
    g = torch.zeros_like(x)
    for step in range(attack.steps):
        grad = gradient(delta, step).detach()
        if decay is not None:
            g = decay * g + grad / grad.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-12)
            grad = g
        delta = _project(attack, x, delta + alpha * grad.sign())
    return (x + delta).detach()


def _input_grad(loss_of: Callable[[torch.Tensor], torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    leaf = delta.detach().requires_grad_(True)
    return torch.autograd.grad(loss_of(leaf), leaf)[0]


def _ce(attack, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(logits, y)
    return -loss if getattr(attack, "targeted", False) else loss


def _submodule(model: nn.Module, path: str, attack: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise TrigactError(f"attack {attack!r}: {path!r} is not a submodule of {type(model).__name__}") from None


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Each image's slice of ``t`` divided by its L2 norm."""
    return t / _per_image(t).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.ndim - 1))


# ----------------------------------------------------------------------------------------------------------------
# Feature-level attacks
# ----------------------------------------------------------------------------------------------------------------


@register_attack("TrigactBFA")
class PortableBFA(BFA):
    """BFA: feature-map attack weighted by the aggregate gradient at ``num_ens`` fitted (masked) images."""

    def _register_hook(self) -> None:  # upstream: a permanent forward hook; ours lives for one call
        self.feature_module = _submodule(self.model, self.feature_layer_cfg, "bfa")

    def _features(self, hooks: _Hooks) -> list:
        store: list = []
        hooks.forward(self.feature_module, lambda m, i, o: store.append(o))
        return store

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _Hooks() as hooks:
            store = self._features(hooks)

            def feature_logits(z):
                store.clear()
                logits = self.model(self.normalize(z))
                return store[-1], logits

            # Aggregate gradient (upstream's _get_aggregate_grad, with the masked image requiring grad).
            x_masked = x.detach().clone()
            agg = None
            for _ in range(self.num_ens):
                leaf = x_masked.detach().requires_grad_(True)
                mask_grad = torch.autograd.grad(self.lossfn(feature_logits(leaf)[1], y), leaf)[0]
                mask_grad = _unit(mask_grad)
                x_masked = (x + self.eta * mask_grad).detach().requires_grad_(True)
                feats, logits = feature_logits(x_masked)
                true_logit = logits.gather(1, y.view(-1, 1)).sum() / len(y)  # upstream: sum(outs * one_hot).mean()
                grad = torch.autograd.grad(true_logit, feats)[0]
                agg = grad if agg is None else agg + grad
            agg = -_unit(agg)

            def gradient(delta, step):
                def loss(d):
                    feats, _ = feature_logits(x + d)
                    value = _per_image(agg * feats).sum(1).mean()
                    return -value if self.targeted else value

                return _input_grad(loss, delta)

            return _iterate(self, x, gradient, decay=self.decay)


@register_attack("TrigactFIA")
class PortableFIA(FIA):
    """FIA: minimise ``sum(A(x') * Delta)``, with ``Delta`` the L2-normalised gradient of the true class's
    probability at the feature layer summed over ``num_ens`` pixel-dropped copies, by MI-FGSM steps.
    Upstream normalises ``Delta`` over dims (1, 2, 3), so it crashes on a vector (MLP) or token (ViT)
    feature layer, and leaves its forward hook registered; here any feature shape works and every hook
    is removed after the call."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _Hooks() as hooks:
            store: dict = {}

            def record(g):
                store["grad"] = g
                return g

            def capture(module, args, output):
                store["out"] = output
                return grad_map(output, record) if store.get("recording") else None

            hooks.forward(self.feature_module, capture)
            store["recording"], agg = True, None
            for _ in range(self.num_ens):
                leaf = self.drop_pixels(x).detach().requires_grad_(True)
                prob = torch.softmax(self.model(self.normalize(leaf)), 1).gather(1, y.view(-1, 1)).sum()
                torch.autograd.grad(prob, leaf)
                agg = store["grad"].detach() if agg is None else agg + store["grad"].detach()
            store["recording"] = False
            agg = _unit(agg)

            def loss(d):  # ascent on -sum(A * Delta): the features the true class relies on are suppressed
                self.model(self.normalize(x + d))
                return -(store["out"] * agg).sum()

            return _iterate(self, x, lambda d, s: _input_grad(loss, d), decay=self.decay)


@register_attack("TrigactDANAA")
class PortableDANAA(DANAA):
    """DANAA: MI-FGSM on the feature attribution ``(f(x') - f(x_t)) * g``, with ``g`` the gradient of the true
    class's probability at the feature layer aggregated along a noisy non-linear path ``x_t``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _Hooks() as hooks:
            store: dict = {}

            def record(g):
                store["grad"] = g
                return g

            def capture(module, args, output):
                store["out"] = output
                return grad_map(output, record) if store.get("recording") else None

            hooks.forward(self.feature_module, capture)
            # The attribution path (upstream's loop; its full backward hook is the gradient recorded here).
            store["recording"] = True
            x_t, agg = x.detach().clone(), None
            for _ in range(self.num_ens):
                leaf = x_t.requires_grad_(True)
                logits = self.model(self.normalize(leaf + torch.randn_like(leaf) * self.scale))
                prob = torch.softmax(logits, 1).gather(1, y.view(-1, 1)).sum()
                x_grad = torch.autograd.grad(prob, leaf)[0]
                x_t = (leaf + self.lr * x_grad.sign()).detach()
                agg = store["grad"].detach() if agg is None else agg + store["grad"].detach()
            store["recording"] = False
            agg = -_unit(agg)
            with torch.no_grad():
                self.model(self.normalize(x_t))
                base = store["out"].detach()

            def loss(d):
                self.model(self.normalize(x + d))
                return self._get_danaa_loss(store["out"], base, agg)

            return _iterate(self, x, lambda d, s: _input_grad(loss, d), decay=self.decay)


class _BPAReLU(torch.autograd.Function):
    """ReLU forward; backward with SiLU's derivative ``sigmoid(x) (1 + x (1 - sigmoid(x)))`` (BPA's Eq.)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class BPAReLU(nn.Module):
    def forward(self, x):
        return _BPAReLU.apply(x)


class _BPAMaxPool(torch.autograd.Function):
    """Max-pooling forward; backward spreads each window's gradient by a softmax of its inputs (temperature t)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, temperature):
        out = F.max_pool2d(x, kernel, stride, padding)
        ctx.save_for_backward(x)
        ctx.args = (kernel, stride, padding, temperature)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel, stride, padding, temperature = ctx.args
        n, c = x.shape[:2]
        k = kernel[0] * kernel[1]
        patches = F.unfold(x, kernel, padding=padding, stride=stride).view(n, c, k, -1)
        weights = torch.softmax(temperature * patches, dim=2)
        grad_in = (weights * grad.reshape(n, c, 1, -1)).view(n, c * k, -1)
        return F.fold(grad_in, x.shape[-2:], kernel, padding=padding, stride=stride), None, None, None, None


class BPAMaxPool(nn.Module):
    temperature = 10.0  # BPA's (TransferAttack's bpa.py: temp_coef=10; torchattack's MaxPool2dK3S2P1)

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        pair = nn.modules.utils._pair
        self.kernel, self.padding = pair(pool.kernel_size), pair(pool.padding)
        self.stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)

    def forward(self, x):
        return _BPAMaxPool.apply(x, self.kernel, self.stride, self.padding, self.temperature)


def _swap_modules(model: nn.Module, swaps: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``swaps`` (path -> module) into ``model``; returns what they replaced (to swap back)."""
    old = {}
    for path, module in swaps.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old[path] = getattr(parent, child)
        setattr(parent, child, module)
    return old


@register_attack("TrigactBPA")
class PortableBPA(BPA):
    """BPA: MI-FGSM through a backward pass with smooth ReLU and max-pool derivatives (modules swapped per call)."""

    def __init__(self, model, normalize=None, device=None, bpa_layer: str = "", eps: float = 8 / 255,
                 steps: int = 10, alpha: float | None = None, decay: float = 1.0, clip_min: float = 0.0,
                 clip_max: float = 1.0, targeted: bool = False) -> None:
        Attack.__init__(self, model, normalize, device)  # not BPA's: it replaces the model's modules for good
        self.bpa_layer = bpa_layer
        self.eps, self.steps, self.alpha, self.decay = eps, steps, alpha, decay
        self.clip_min, self.clip_max, self.targeted = clip_min, clip_max, targeted
        self.lossfn = nn.CrossEntropyLoss()
        self.swaps = self._find_swaps()

    def _find_swaps(self) -> dict[str, nn.Module]:
        names = [name for name, _ in self.model.named_modules()]
        if self.bpa_layer not in names:
            raise TrigactError(f"attack 'bpa': bpa_layer={self.bpa_layer!r} is not a submodule of "
                               f"{type(self.model).__name__}")
        start = names.index(self.bpa_layer)
        swaps: dict[str, nn.Module] = {}
        for index, (name, module) in enumerate(self.model.named_modules()):
            if isinstance(module, nn.ReLU) and index >= start:
                swaps[name] = BPAReLU()
            elif isinstance(module, nn.MaxPool2d):
                if module.dilation not in (1, (1, 1)) or module.ceil_mode or module.return_indices:
                    raise TrigactError(f"attack 'bpa': max-pool {name!r} uses dilation/ceil_mode/return_indices, "
                                       "which BPA's softmax backward does not cover")
                swaps[name] = BPAMaxPool(module)
        if not swaps:
            raise TrigactError(f"attack 'bpa' reshapes the backward pass of nn.ReLU and nn.MaxPool2d layers (Wang et "
                               f"al., NeurIPS 2023); {type(self.model).__name__} has no nn.ReLU from "
                               f"{self.bpa_layer!r} on and no nn.MaxPool2d")
        return swaps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        old = _swap_modules(self.model, self.swaps)
        try:
            return _iterate(self, x, lambda d, s: _input_grad(
                lambda z: _ce(self, self.model(self.normalize(x + z)), y), d), decay=self.decay)
        finally:
            _swap_modules(self.model, old)


@register_attack("TrigactDR")
class PortableDR(DR):
    """DR: PGD lowering the per-image standard deviation of the feature map (no momentum, as in the paper)."""

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 100,
                 alpha: float | None = None, feature_layer_cfg: str = "", clip_min: float = 0.0,
                 clip_max: float = 1.0) -> None:
        super().__init__(model, normalize, device, eps=eps, steps=steps, alpha=alpha,
                         feature_layer_cfg=feature_layer_cfg, clip_min=clip_min, clip_max=clip_max)
        del self.decay  # upstream takes it and never uses it

    def _register_model_hooks(self) -> None:  # upstream: permanent
        self.feature_module = _submodule(self.model, self.feature_layer_cfg, "dr")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with _Hooks() as hooks:
            store: list = []
            hooks.forward(self.feature_module, lambda m, i, o: store.append(o))

            def loss(d):
                store.clear()
                self.model(self.normalize(x + d))
                return -_per_image(store[-1]).std(dim=1).sum()

            return _iterate(self, x, lambda d, s: _input_grad(loss, d))


@register_attack("TrigactFDA")
class PortableFDA(FDA):
    """FDA: raise activations below each position's channel mean, lower those above, at every ReLU and avg-pool."""

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 10,
                 alpha: float | None = None, random_start: bool = True, clip_min: float = 0.0,
                 clip_max: float = 1.0) -> None:
        super().__init__(model, normalize, device, eps=eps, steps=steps, alpha=alpha, random_start=random_start,
                         clip_min=clip_min, clip_max=clip_max)
        del self.decay  # the authors' code steps without momentum

    def _register_hooks(self) -> None:  # upstream: permanent (until __del__)
        # Upstream's choice of layers: ReLUs not named conv/mixed (the authors' TF graph filter), and avg-pools.
        self.layers = [m for name, m in self.model.named_modules()
                       if (isinstance(m, nn.ReLU) and not any(s in name.lower() for s in ("conv", "mixed")))
                       or isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d))]
        if not self.layers:
            raise TrigactError(f"attack 'fda' disrupts ReLU and average-pooling outputs; {type(self.model).__name__} "
                               "has no nn.ReLU, nn.AvgPool2d or nn.AdaptiveAvgPool2d module")

    @staticmethod
    def _layer_loss(feats: torch.Tensor, n: int) -> torch.Tensor | None:
        if feats.ndim not in (2, 4) or feats.shape[0] != 2 * n:
            return None
        clean, adv = feats[:n], feats[n:]
        below = clean < clean.mean(dim=1, keepdim=True)  # channel mean at each position (authors' code)
        low = _per_image(adv * below).norm(dim=1) + 1e-8
        high = _per_image(adv * ~below).norm(dim=1) + 1e-8
        return (low.log() - high.log()).sum()  # per image, summed: no coupling across the batch

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        with _Hooks() as hooks:
            store: list = []
            for layer in self.layers:
                hooks.forward(layer, lambda m, i, o: store.append(o))

            def loss(d):
                store.clear()
                self.model(self.normalize(torch.cat([x, x + d])))
                terms = [t for t in (self._layer_loss(f, n) for f in store) if t is not None]
                return sum(terms) / max(len(terms), 1)

            start = torch.empty_like(x).uniform_(-self.eps, self.eps) if self.random_start else None
            if start is not None:
                start = _project(self, x, start)
            return _iterate(self, x, lambda d, s: _input_grad(loss, d), delta=start)


@register_attack("TrigactILPD")
class PortableILPD(ILPD):
    """ILPD: I-FGSM on the loss with the intermediate perturbation decayed towards a noisy clean feature."""

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 10,
                 alpha: float | None = None, sigma: float = 0.05, coef: float = 0.1, feature_layer_cfg: str = "",
                 clip_min: float = 0.0, clip_max: float = 1.0) -> None:
        super().__init__(model, normalize, device, eps=eps, steps=steps, alpha=alpha, sigma=sigma, coef=coef,
                         feature_layer_cfg=feature_layer_cfg, clip_min=clip_min, clip_max=clip_max)
        del self.decay  # the authors' code: plain sign steps (attacks/utils.py update_and_clip)
        self.feature_module = _submodule(self.model, feature_layer_cfg, "ilpd")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def gradient(delta, step):
            with torch.no_grad(), _Hooks() as hooks:
                store: list = []
                hooks.forward(self.feature_module, lambda m, i, o: store.append(o))
                self.model(self.normalize(x + self.sigma * torch.randn_like(x)))
                clean = store[-1]
            with _Hooks() as hooks:
                hooks.forward(self.feature_module, lambda m, i, o: self.coef * o + (1 - self.coef) * clean)
                return _input_grad(lambda d: self.lossfn(self.model(self.normalize(x + d)), y), delta)

        return _iterate(self, x, gradient)


@register_attack("TrigactSSP")
class PortableSSP(SSP):
    """SSP: PGD maximising the distortion (MSE) of the surrogate's own feature map; no labels."""

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 100,
                 alpha: float | None = None, feature_layer_cfg: str = "", clip_min: float = 0.0,
                 clip_max: float = 1.0, targeted: bool = False) -> None:
        Attack.__init__(self, model, normalize, device)  # not SSP's: it downloads an ImageNet VGG-16
        self.eps, self.steps, self.alpha = eps, steps, alpha
        self.clip_min, self.clip_max, self.targeted = clip_min, clip_max, targeted
        self.feature_layer_cfg = feature_layer_cfg
        self.feature_module = _submodule(self.model, feature_layer_cfg, "ssp")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with _Hooks() as hooks:
            store: list = []
            hooks.forward(self.feature_module, lambda m, i, o: store.append(o))

            def features(z):
                store.clear()
                self.model(self.normalize(z))
                return store[-1]

            with torch.no_grad():
                clean = features(x)

            def loss(d):
                dist = F.mse_loss(features(x + d), clean, reduction="none")
                return _per_image(dist).mean(dim=1).sum()  # each image's MSE, as the authors' per-image loss

            # Upstream's start (and the authors'): N(0, 1) noise; the first step's projection brings it into the ball.
            return _iterate(self, x, lambda d, s: _input_grad(loss, d), delta=torch.randn_like(x))


# ----------------------------------------------------------------------------------------------------------------
# Model-related: SGM
# ----------------------------------------------------------------------------------------------------------------


def residual_relus(model: nn.Module, gamma: float) -> list[tuple[nn.Module, float]]:
    """(ReLU module, factor) pairs that make SGM's decay of ``gamma`` on residual branches relative to skips:
    every residual block but the first (the authors' code skips ``layer1.0``), every dense layer."""
    pairs = []
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for block in blocks[1:]:
        # BasicBlock: its ReLU runs after bn1 and after the sum (residual gamma^2, skip gamma); Bottleneck: three
        # times, so gamma^0.5 each (residual gamma^1.5, skip gamma^0.5). Either way residual / skip = gamma.
        pairs.append((block.relu, gamma if isinstance(block, BasicBlock) else gamma**0.5))
    for layer in (m for m in model.modules() if isinstance(m, _DenseLayer)):
        pairs.extend([(layer.relu1, gamma**0.5), (layer.relu2, gamma**0.5)])  # the new features' branch
    return pairs


@register_attack("TrigactSGM")
class PortableSGM(SGM):
    """SGM: MI-FGSM with the gradients through residual branches decayed by ``gamma`` (skip gradients kept)."""

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 10,
                 alpha: float | None = None, decay: float = 1.0, gamma: float = 0.2, clip_min: float = 0.0,
                 clip_max: float = 1.0, targeted: bool = False) -> None:
        Attack.__init__(self, model, normalize, device)  # not SGM's: permanent hooks chosen by hook_cfg name
        self.eps, self.steps, self.alpha, self.decay, self.gamma = eps, steps, alpha, decay, gamma
        self.clip_min, self.clip_max, self.targeted = clip_min, clip_max, targeted
        self.lossfn = nn.CrossEntropyLoss()
        if not residual_relus(self.model, gamma):
            raise TrigactError(
                f"attack 'sgm' decays gradients through residual modules relative to skip connections (Wu et al., "
                f"ICLR 2020); surrogate {type(self.model).__name__} has no skip connections to favour (no "
                "torchvision BasicBlock / Bottleneck after the first, no _DenseLayer): use e.g. tiny_resnet, "
                "resnet18, densenet121"
            )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _Hooks() as hooks:
            for relu, factor in residual_relus(self.model, self.gamma):
                hooks.map_output(relu, lambda g, f=factor: g * f)
            return _iterate(self, x, lambda d, s: _input_grad(
                lambda z: _ce(self, self.model(self.normalize(x + z)), y), d), decay=self.decay)


# ----------------------------------------------------------------------------------------------------------------
# ViT attacks
# ----------------------------------------------------------------------------------------------------------------


def find_vit(model: nn.Module, attack: str):
    """The first timm ``VisionTransformer`` inside ``model``, checked to have the blocks the ViT attacks hook."""
    from timm.models.vision_transformer import VisionTransformer

    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise TrigactError(f"attack {attack!r} hooks vision-transformer blocks; surrogate {type(model).__name__} "
                           "has no timm VisionTransformer: use a ViT surrogate (e.g. model=vit_tiny)")
    for i, block in enumerate(vit.blocks):
        attn = getattr(block, "attn", None)
        if not all(hasattr(attn, a) for a in ("qkv", "attn_drop", "fused_attn")) or not hasattr(block, "mlp") \
                or not hasattr(block, "norm2"):
            raise TrigactError(f"attack {attack!r}: block {i} of the ViT is not timm's Block(attn: Attention with "
                               "qkv/attn_drop, mlp, norm2), which the attack hooks")
    return vit


class _Unfused:
    """timm attention without its fused kernel, which never calls ``attn_drop`` (where the map is hooked)."""

    def __init__(self, vit):
        self.attns = [block.attn for block in vit.blocks]

    def __enter__(self):
        self.saved = [a.fused_attn for a in self.attns]
        for a in self.attns:
            a.fused_attn = False
        return self

    def __exit__(self, *exc):
        for a, flag in zip(self.attns, self.saved):
            a.fused_attn = flag


def _powers(base: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``base ** count`` with ``base`` per image (shape (B,)) broadcast over ``count`` (B, ...); 0 ** 0 = 1."""
    return base.view(-1, *[1] * (count.ndim - 1)) ** count


def token_extremes(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad`` (B, N, C) times ``factor`` (per image) at each channel's largest and smallest token, per image
    (upstream picks the tokens from image 0 for the whole batch); twice where they coincide, as upstream."""
    n = grad.shape[1]
    count = F.one_hot(grad.argmax(dim=1), n) + F.one_hot(grad.argmin(dim=1), n)  # (B, C, N)
    return grad * _powers(factor, count.transpose(1, 2).to(grad.dtype))


def attention_extremes(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad`` (B, H, N, N) times ``factor`` on the row and the column of each head's largest and smallest entry,
    per image (upstream: from image 0 for the whole batch); a crossing gets ``factor`` twice, as upstream."""
    n = grad.shape[-1]
    flat = grad.flatten(2)
    hi, lo = flat.argmax(dim=2), flat.argmin(dim=2)  # (B, H)
    rows = F.one_hot(hi // n, n) + F.one_hot(lo // n, n)
    cols = F.one_hot(hi % n, n) + F.one_hot(lo % n, n)
    rows, cols = (_powers(factor, c.to(grad.dtype)) for c in (rows, cols))
    return grad * rows.unsqueeze(-1) * cols.unsqueeze(-2)


class _ViTAttack:
    """Mixin: the surrogate's ViT, found once; a loop running the model with the attack's hooks and no fused
    attention."""

    attack_key = ""

    def _init_vit(self) -> None:
        self.vit = find_vit(self.model, self.attack_key)
        self.depth = len(self.vit.blocks)

    def _patch_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        with _Unfused(self.vit):
            return self.model(self.normalize(z))


@register_attack("TrigactTGR", category="GRADIENT_VIT")
class PortableTGR(_ViTAttack, TGR):
    """TGR: MI-FGSM with each block's attention-map, QKV and MLP gradients scaled (0.25, 0.75, 0.5) and their
    extreme tokens zeroed, per image."""

    attack_key = "tgr"
    # TGR's gammas (the authors' code, as torchattack's hooks)
    scales: ClassVar[dict[str, float]] = {"attn": 0.25, "qkv": 0.75, "mlp": 0.5}

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 10,
                 alpha: float | None = None, decay: float = 1.0, clip_min: float = 0.0, clip_max: float = 1.0,
                 targeted: bool = False) -> None:
        Attack.__init__(self, model, normalize, device)
        self.eps, self.steps, self.alpha, self.decay = eps, steps, alpha, decay
        self.clip_min, self.clip_max, self.targeted = clip_min, clip_max, targeted
        self.lossfn = nn.CrossEntropyLoss()
        self._init_vit()

    def _hooks(self, hooks: _Hooks) -> None:
        def zeroed(extremes, scale):
            return lambda g: extremes(g * scale, torch.zeros(g.shape[0], dtype=g.dtype, device=g.device))

        for block in self.vit.blocks:
            hooks.map_output(block.attn.attn_drop, zeroed(attention_extremes, self.scales["attn"]))
            hooks.map_output(block.attn.qkv, zeroed(token_extremes, self.scales["qkv"]))
            hooks.map_output(block.mlp, zeroed(token_extremes, self.scales["mlp"]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _Hooks() as hooks:
            self._hooks(hooks)
            return _iterate(self, x, lambda d, s: _input_grad(lambda z: _ce(self, self._logits(x + z), y), d),
                            decay=self.decay)


@register_attack("TrigactPNAPatchOut", category="GRADIENT_VIT")
class PortablePNAPatchOut(_ViTAttack, PNAPatchOut):
    """PNA-PatchOut: MI-FGSM without gradients through the attention maps (PNA), perturbing a random
    ``patchout_fraction`` of the ViT's patches each step (PatchOut), plus ``lamb`` times each image's L2 norm."""

    attack_key = "pna_patchout"

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 10,
                 alpha: float | None = None, decay: float = 1.0, pna_skip: bool = True, pna_patchout: bool = True,
                 patchout_fraction: float = 130 / 196, lamb: float = 0.1, clip_min: float = 0.0,
                 clip_max: float = 1.0, targeted: bool = False) -> None:
        Attack.__init__(self, model, normalize, device)
        self.eps, self.steps, self.alpha, self.decay = eps, steps, alpha, decay
        self.pna_skip, self.pna_patchout = pna_skip, pna_patchout
        if not 0 < patchout_fraction <= 1:
            raise TrigactError(f"attack 'pna_patchout': patchout_fraction={patchout_fraction!r} must be in (0, 1]")
        self.patchout_fraction, self.lamb = patchout_fraction, lamb
        self.clip_min, self.clip_max, self.targeted = clip_min, clip_max, targeted
        self.lossfn = nn.CrossEntropyLoss()
        self._init_vit()

    def patch_mask(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """1 on the patches perturbed at ``step``: a random ``patchout_fraction`` of the patch grid, drawn from a
        generator seeded with the step (upstream: ``torch.manual_seed(step)``, which reseeds the global one)."""
        ph, pw = self._patch_size()
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        total = gh * gw
        keep = total if not self.pna_patchout else max(1, round(self.patchout_fraction * total))
        ids = torch.randperm(total, generator=torch.Generator().manual_seed(step))[:keep]
        grid = torch.zeros(total)
        grid[ids] = 1.0
        mask = grid.view(1, 1, gh, gw).repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)
        full = torch.zeros(1, 1, *x.shape[-2:])  # pixels beyond the grid (none for timm's strict sizes)
        full[..., : gh * ph, : gw * pw] = mask
        return full.to(x.device, x.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _Hooks() as hooks:
            if self.pna_skip:
                for block in self.vit.blocks:  # pay no attention: the attention map is a constant for backward
                    hooks.forward(block.attn.attn_drop, lambda m, i, o: o.detach())

            def gradient(delta, step):
                mask = self.patch_mask(x, step)

                def loss(d):
                    value = _ce(self, self._logits(x + d * mask), y)
                    return value + self.lamb * _per_image(d).norm(dim=1).sum()

                return _input_grad(loss, delta)

            return _iterate(self, x, gradient, decay=self.decay)


@register_attack("TrigactATT", category="GRADIENT_VIT")
class PortableATT(_ViTAttack, ATT):
    """ATT: MI-FGSM with adaptively scaled attention, QKV and MLP gradients (extreme tokens scaled by an
    adaptive factor, attention truncated in the last blocks) and a patch mask from a feature-gradient map, per image.

    ViT-B/16's settings (torchattack, from the authors' code) scaled to the surrogate's depth: the attention
    gradient of the last ``2/12`` of the blocks is cut, the feature map is the output of block ``depth - 2``.
    """

    attack_key = "att"
    weaken: ClassVar[dict[str, float]] = {"attn": 0.45, "qkv": 0.7, "mlp": 0.65}  # ViT-B's weaken_factor
    scale, offset, gamma = 0.4, 0.4, 0.5  # ViT-B's patch-map scale and offset; the factor's base
    kept_fraction = 10 / 12  # ViT-B: truncate_layers = 10 ones, then 2 zeros
    threshold_start = 0.99

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 10,
                 alpha: float | None = None, decay: float = 1.0, lambd: float = 0.01, clip_min: float = 0.0,
                 clip_max: float = 1.0, targeted: bool = False) -> None:
        Attack.__init__(self, model, normalize, device)
        self.eps, self.steps, self.alpha, self.decay, self.lambd = eps, steps, alpha, decay, lambd
        self.clip_min, self.clip_max, self.targeted = clip_min, clip_max, targeted
        self.lossfn = nn.CrossEntropyLoss()
        self._init_vit()
        self.kept_blocks = round(self.kept_fraction * self.depth)
        self.feature_block = max(self.depth - 2, 0)

    def _adaptive(self, key: str, index: int, grad: torch.Tensor, extremes) -> torch.Tensor:
        """One component's rule: weaken, then scale the extremes by ``gamma + lambd (1 - sqrt(var / var_prev))``
        (``gamma`` where the previous, deeper block's variance is 0), per image."""
        weight = self.weaken[key] * (1.0 if key != "attn" or index < self.kept_blocks else 0.0)
        out = grad * weight
        var = _per_image(out).var(dim=1)
        prev = self._vars[key]
        if prev is None:
            factor = torch.full_like(var, self.gamma)
        else:
            ratio = torch.sqrt(var / prev.clamp_min(1e-30))
            factor = torch.where(prev == 0, torch.full_like(var, self.gamma),
                                 (self.gamma + self.lambd * (1 - ratio)).clamp(0, 1))
        out = extremes(out, factor)
        self._vars[key] = _per_image(out).var(dim=1)
        return out

    def _reset(self) -> None:
        self._vars = {"attn": None, "qkv": None, "mlp": None}

    def _hooks(self, hooks: _Hooks) -> None:
        for i, block in enumerate(self.vit.blocks):
            hooks.map_output(block.attn.attn_drop, lambda g, i=i: self._adaptive("attn", i, g, attention_extremes))
            hooks.map_output(block.attn.qkv, lambda g, i=i: self._adaptive("qkv", i, g, token_extremes))
            hooks.map_output(block.mlp, lambda g, i=i: self._adaptive("mlp", i, g, token_extremes))

    def patch_values(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W): per image, the feature x gradient map of block ``depth - 2`` (gradient of the sum of all
        logits), resized to the image, averaged per patch, min-max normalised, ``scale * v + offset``."""
        store: dict = {}

        def record(g):
            store["grad"] = g
            return g

        def capture(module, args, output):
            store["feat"] = output
            return grad_map(output, record)

        handle = self.vit.blocks[self.feature_block].register_forward_hook(capture)
        try:
            self._reset()
            z = x.detach().clone().requires_grad_(True)
            self._logits(z).sum().backward()
        finally:
            handle.remove()
        prefix = self.vit.num_prefix_tokens
        ph, pw = self._patch_size()
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        gf = (store["feat"][:, prefix:] * store["grad"][:, prefix:]).sum(-1).detach().view(-1, 1, gh, gw)
        gf = F.interpolate(gf, size=x.shape[-2:], mode="bilinear", align_corners=False)
        means = F.avg_pool2d(gf[..., : gh * ph, : gw * pw], (ph, pw))
        flat = _per_image(means)
        low, high = flat.min(dim=1, keepdim=True)[0], flat.max(dim=1, keepdim=True)[0]
        norm = ((flat - low) / (high - low).clamp_min(1e-12)).view_as(means)
        values = (self.scale * norm + self.offset).repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)
        out = torch.full_like(gf, self.threshold_start)
        out[..., : gh * ph, : gw * pw] = values
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _Hooks() as hooks:
            self._hooks(hooks)
            target = self.patch_values(x)
            offset = (self.threshold_start - target) / self.steps

            def gradient(delta, step):
                self._reset()
                threshold = self.threshold_start - offset * (step + 1)
                mask = torch.where(torch.rand_like(x) > threshold, 0.0, 1.0)
                return _input_grad(lambda d: _ce(self, self._logits(x + d * mask), y), delta)

            return _iterate(self, x, gradient, decay=self.decay)


@register_attack("TrigactVDC", category="GRADIENT_VIT")
class PortableVDC(_ViTAttack, VDC):
    """VDC: per step, a recording backward pass, then MI-FGSM's step on a second one where each block's MLP and
    attention gradients (scaled 0.5, 0.25) get the decayed gradients of all deeper blocks added (virtual dense
    connections), ViT-B's settings (torchattack, from the authors' code)."""

    attack_key = "vdc"
    record, decay_per_block = 0.1, 0.5  # grad_record = grad * 0.1 * 0.5 ** k (k: blocks from the top)
    scales: ClassVar[dict[str, float]] = {"mlp": 0.5, "attn": 0.25}

    def __init__(self, model, normalize=None, device=None, eps: float = 8 / 255, steps: int = 10,
                 alpha: float | None = None, decay: float = 1.0, clip_min: float = 0.0, clip_max: float = 1.0,
                 targeted: bool = False) -> None:
        Attack.__init__(self, model, normalize, device)  # upstream's sample_num_batches is unused there: dropped
        self.eps, self.steps, self.alpha, self.decay = eps, steps, alpha, decay
        self.clip_min, self.clip_max, self.targeted = clip_min, clip_max, targeted
        self.lossfn = nn.CrossEntropyLoss()
        self._init_vit()

    def _record_pass(self, z: torch.Tensor, y: torch.Tensor) -> tuple[list, list]:
        """Gradients at each block's ``norm2`` input and attention map, and at the final norm's input."""
        grads = {"mlp": [None] * self.depth, "attn": [None] * self.depth, "norm": None}

        def keep(key, i=None):
            def fn(g):
                if i is None:
                    grads[key] = g.detach()
                else:
                    grads[key][i] = g.detach()
                return g
            return fn

        with _Hooks() as hooks:
            hooks.map_input(self.vit.norm, keep("norm"))
            for i, block in enumerate(self.vit.blocks):
                hooks.map_input(block.norm2, keep("mlp", i))
                hooks.map_output(block.attn.attn_drop, keep("attn", i))
            leaf = z.detach().requires_grad_(True)
            torch.autograd.grad(_ce(self, self._logits(leaf), y), leaf)
        adds = {}
        for key in ("mlp", "attn"):
            added, total = [None] * self.depth, None
            for k, i in enumerate(reversed(range(self.depth))):  # k: 0 for the last block, as upstream counts
                rec = grads[key][i] * self.record * self.decay_per_block**k
                if k == 0:
                    first = torch.zeros_like(rec)
                    if key == "mlp":  # the class token's gradient at the final norm, decayed once
                        first[:, 0] = grads["norm"][:, 0] * self.record * self.decay_per_block
                    added[i], total = first, rec + first
                else:
                    added[i], total = total, total + rec
            adds[key] = added
        return adds["mlp"], adds["attn"]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def gradient(delta, step):
            mlp_add, attn_add = self._record_pass(x + delta, y)
            with _Hooks() as hooks:
                for i, block in enumerate(self.vit.blocks):
                    hooks.map_input(block.norm2, lambda g, i=i: g * self.scales["mlp"] + mlp_add[i])
                    hooks.map_output(block.attn.attn_drop, lambda g, i=i: g * self.scales["attn"] + attn_add[i])
                return _input_grad(lambda d: _ce(self, self._logits(x + d), y), delta)

        return _iterate(self, x, gradient, decay=self.decay)


# ----------------------------------------------------------------------------------------------------------------
# Generative attacks: user-supplied generator weights only
# ----------------------------------------------------------------------------------------------------------------


def load_generator_weights(attack: str, generator: nn.Module, path) -> None:
    """A state dict from ``path`` (``torch.load(weights_only=True)``) into ``generator``, errors on one line."""
    path = Path(path)
    if not path.is_file():
        raise TrigactError(f"attack {attack!r}: checkpoint_path={str(path)!r} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (unpickling, zip and I/O errors all mean: not a weights file)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise TrigactError(f"attack {attack!r}: {path} is not a readable weights file ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrigactError(f"attack {attack!r}: {path} holds no state dict of tensors")
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:240]
        raise TrigactError(f"attack {attack!r}: weights {path} do not match its generator ({detail})") from None


class _Generative:
    """A perturbation generator loaded from ``checkpoint_path`` (never downloaded), run once per batch."""

    attack_key = ""
    paper = ""
    generator_class: type = ResNetGenerator

    def _init_generator(self, device, eps, checkpoint_path, clip_min, clip_max, allow_random_init,
                        inception: bool = False) -> None:
        Attack.__init__(self, None, None, device)
        if not isinstance(allow_random_init, bool):
            raise TrigactError(f"attack {self.attack_key!r}: allow_random_init={allow_random_init!r} must be true or "
                               "false")
        self.eps, self.clip_min, self.clip_max = eps, clip_min, clip_max
        self.checkpoint_path, self.allow_random_init = checkpoint_path, allow_random_init
        self.generator = self.generator_class(inception=inception)
        if checkpoint_path in (None, ""):
            if not allow_random_init:
                raise TrigactError(
                    f"attack {self.attack_key!r} ({self.paper}) needs a trained generator: set "
                    f"attack_params.{self.attack_key}.checkpoint_path=<state dict .pth of torchattack's "
                    f"{self.generator_class.__module__.rsplit('.', 1)[-1]}.ResNetGenerator>; its release weights "
                    "are not downloaded here (allow_random_init=true builds an untrained generator, for tests only)"
                )
        else:
            load_generator_weights(self.attack_key, self.generator, checkpoint_path)
        self.generator.eval().to(self.device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise TrigactError(f"attack {self.attack_key!r}: its generator takes (B, 1 or 3, H, W) images with H "
                               f"and W multiples of 4, got {tuple(x.shape)}")
        with torch.no_grad():
            z = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            out = self.generator(z)
            if x.shape[1] == 1:
                out = out.mean(dim=1, keepdim=True)
        delta = (out - x).clamp(-self.eps, self.eps)
        return (x + delta).clamp(self.clip_min, self.clip_max).detach()


@register_attack("TrigactBIA", category="GENERATIVE")
class PortableBIA(_Generative, BIA):
    """BIA from a user-supplied generator state dict (torchattack's ResNetGenerator)."""

    attack_key, paper = "bia", "Zhang et al., ICLR 2022"

    def __init__(self, device=None, eps: float = 10 / 255, checkpoint_path: str | None = None,
                 clip_min: float = 0.0, clip_max: float = 1.0, allow_random_init: bool = False) -> None:
        self._init_generator(device, eps, checkpoint_path, clip_min, clip_max, allow_random_init)


@register_attack("TrigactCDA", category="GENERATIVE")
class PortableCDA(_Generative, CDA):
    """CDA from a user-supplied generator state dict (torchattack's ResNetGenerator)."""

    attack_key, paper = "cda", "Naseer et al., NeurIPS 2019"

    def __init__(self, device=None, eps: float = 10 / 255, checkpoint_path: str | None = None,
                 inception: bool = False, clip_min: float = 0.0, clip_max: float = 1.0,
                 allow_random_init: bool = False) -> None:
        self.inception = inception
        self._init_generator(device, eps, checkpoint_path, clip_min, clip_max, allow_random_init, inception)


@register_attack("TrigactGAMA", category="GENERATIVE")
class PortableGAMA(_Generative, GAMA):
    """GAMA from a user-supplied generator state dict (torchattack's leaky-ReLU ResNetGenerator)."""

    attack_key, paper = "gama", "Aich et al., NeurIPS 2022"
    generator_class = LeakyResNetGenerator

    def __init__(self, device=None, eps: float = 10 / 255, checkpoint_path: str | None = None,
                 clip_min: float = 0.0, clip_max: float = 1.0, allow_random_init: bool = False) -> None:
        self._init_generator(device, eps, checkpoint_path, clip_min, clip_max, allow_random_init)


@register_attack("TrigactLTP", category="GENERATIVE")
class PortableLTP(_Generative, LTP):
    """LTP from a user-supplied generator state dict (torchattack's ResNetGenerator)."""

    attack_key, paper = "ltp", "Nakka and Salzmann, NeurIPS 2021"

    def __init__(self, device=None, eps: float = 10 / 255, checkpoint_path: str | None = None,
                 inception: bool = False, clip_min: float = 0.0, clip_max: float = 1.0,
                 allow_random_init: bool = False) -> None:
        self.inception = inception
        self._init_generator(device, eps, checkpoint_path, clip_min, clip_max, allow_random_init, inception)


# ----------------------------------------------------------------------------------------------------------------
# Minimum-norm attacks: refused
# ----------------------------------------------------------------------------------------------------------------


def _refuse(name: str, what: str) -> TrigactError:
    return TrigactError(
        f"attack {name!r} ({what}) has no perturbation budget: it searches for the smallest perturbation that flips "
        "the label, so it cannot be run at trigact's L_inf eps (and projecting its output into the eps-ball would "
        "make it neither attack); compare minimum-norm attacks outside these tables, or use pgd / mifgsm"
    )


@register_attack("TrigactDeepFool", category="NON_EPS")
class RefusedDeepFool(DeepFool):
    """DeepFool: refused in one line (minimum L2 perturbation, no eps)."""

    def __init__(self, *args, **kwargs) -> None:  # DeepFool's arguments, pinned in the config
        raise _refuse("deepfool", "DeepFool, Moosavi-Dezfooli et al., CVPR 2016: minimum-L2 linearised steps")


@register_attack("TrigactGeoDA", category="NON_EPS")
class RefusedGeoDA(GeoDA):
    """GeoDA: refused in one line (decision-based, minimum-norm, query budget, no eps)."""

    def __init__(self, *args, **kwargs) -> None:  # GeoDA's arguments, pinned in the config
        raise _refuse("geoda", "GeoDA, Rahmati et al., CVPR 2020: decision-based, minimum norm under a query budget")


__all__ = [
    "PortableATT", "PortableBFA", "PortableBIA", "PortableBPA", "PortableCDA", "PortableDANAA", "PortableDR",
    "PortableFDA", "PortableGAMA", "PortableILPD", "PortableLTP", "PortablePNAPatchOut", "PortableSGM", "PortableSSP",
    "PortableTGR", "PortableVDC", "RefusedDeepFool", "RefusedGeoDA", "attention_extremes", "find_vit", "grad_map",
    "load_generator_weights", "residual_relus", "token_extremes",
]
