"""TAE bank: transferable adversarial examples crafted once per request, then reused by every victim.

A request is everything that makes the bank's images (:func:`bank_key`): the dataset and the
image-defining keys of its data config, the split (``test`` or ``val``), ``n_eval``, the surrogate's
run (its registry name and its bundle's sha256), the attack's full config after overrides, and the
crafting seed. A bank is a folder
``<root>/advbank/<dataset>/<surrogate>/<attack>-eps<E>-s<steps>-<hash>/`` (``E`` = eps in 255ths,
``8/255`` -> ``eps8``; ``<hash>`` = the first 10 hex digits of the request's sha256), so changing
any of it (e.g. the seed) gives a new bank instead of reusing an old one. The folder holds:

- ``bank.safetensors`` (format 3): tensors ``x_adv`` uint8 (N, C, H, W), ``x_clean`` uint8
  (N, C, H, W) and ``y`` int64 (N,), quantized like real images so that every victim sees exactly
  what a saved image file would give. Read with ``safetensors.torch.load_file`` anywhere; here it is
  memory-mapped, not read into memory (:func:`load_bank`).
- ``meta.json``: the full request (``key``, whose hash names the folder), the attack's resolved
  settings, the surrogate's clean accuracy and white-box success rate on the stored images, timing,
  versions, ``format_version``, and under ``file`` the data file's ``name``, ``sha256`` and byte
  size (``bytes``), hashed from the bytes written, not re-read.
- ``.lock``: the file an exclusive ``flock`` is held on while the bank is checked and crafted.

Banks of format 2 hold ``bank.pt`` instead (``torch.save`` of the same three tensors; loadable with
``torch.load(weights_only=True)``) and a ``meta.json`` whose ``file`` names it. They load as they
are, memory-mapped as well, and are never crafted again because of the format: the request, its hash
and the folder name are the same in both formats. New banks are written in format 3.

Both data files are written atomically, the data file first and ``meta.json`` last: a ``meta.json``
whose sha256 and size match the data file it names marks a complete bank. :func:`ensure_bank` reuses
a complete bank and never redoes it; anything else in the folder (a truncated data file, a missing or
mismatched ``meta.json``) is stale and is crafted again, by the lock holder only. A second process
asking for the same bank waits for the lock and then reuses what the first wrote. (flock works
across nodes on NFSv4 and Lustre with ``flock`` mounts; see :mod:`trigact.runs.status`.)

A loaded :class:`Bank` keeps the images uint8 (``q_adv``, ``q_clean``), mapped from the file: a bank
of 3 GB of pixels costs no host memory until its pages are read, and 4x less than float32 then.
:meth:`Bank.batches` (and :func:`trigact.evaluation.matrix.bank_batches` for the scorers) moves each
uint8 batch to the device and dequantizes it there; ``x_adv`` / ``x_clean`` are full float copies,
made on each access, for callers that want the whole tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trigact.threats.levels import level_meta, transfer_level
from trigact.common.validate import parse_eps
from trigact.common.errors import TrigactError
from trigact.common.validate import check_name
from trigact.common.io import atomic_write_bytes, atomic_write_json, folder_lock
from trigact.common.devices import model_device

BANK_FILE = "bank.safetensors"  # the data file new banks are written to (format 3)
LEGACY_BANK_FILE = "bank.pt"  # the data file of format-2 banks, still read
DATA_FILES = (BANK_FILE, LEGACY_BANK_FILE)
META_FILE = "meta.json"
LOCK_FILE = ".lock"
# 2: the folder name ends in the request's hash and meta.json holds the request as "key".
# 3: the data file is bank.safetensors (named in meta["file"]["name"]); the key is unchanged.
FORMAT_VERSION = 3
KEY_HASH_CHARS = 10
# Leftover temp files of a killed writer (``.bank.safetensors.<random>.tmp``) older than this are
# deleted when a bank is crafted again; younger ones may belong to a writer that is still running.
STALE_TEMP_SECONDS = 3600.0
HASH_CHUNK_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------- naming


def eps_tag(eps) -> str:
    """Eps in 255ths as a folder-name token: ``8/255`` -> ``'8'``, ``0.5/255`` -> ``'0.5'``."""
    return f"{round(parse_eps(eps) * 255, 4):g}"


def bank_key(
    dataset: str,
    surrogate: str,
    attack: str,
    attack_config: Mapping,
    eps,
    steps: int,
    *,
    data: Mapping | None = None,
    split: str = "test",
    n_eval: int | None = None,
    seed: int | None = None,
    surrogate_sha256: str | None = None,
    surrogate_ensemble: Mapping | None = None,
) -> dict:
    """Everything that makes a bank, as stored in ``meta.json["key"]``; its hash names the folder.

    ``data``: the image-defining keys of the data config; ``n_eval`` as asked for (None: all);
    ``seed``: the RNG seed set before crafting; ``surrogate_sha256``: the bundle file's hash, so a
    retrained run under the same name does not reuse the old run's bank (for an ensemble, its identity);
    ``surrogate_ensemble``: an ensemble surrogate's fusion and members (``{fusion, members: [{run,
    weights_sha256}]}``), recorded as ``key["surrogate"]["ensemble"]`` (absent for a single run).
    """
    config = _jsonable(dict(attack_config))
    if "eps" in config:  # "8/255" and 0.0313... are one budget
        config["eps"] = parse_eps(config["eps"], "attack.eps")
    surrogate_entry = dict(name=str(surrogate), sha256=surrogate_sha256)
    if surrogate_ensemble is not None:
        surrogate_entry["ensemble"] = dict(surrogate_ensemble)
    return _jsonable(
        dict(
            dataset=str(dataset),
            data=None if data is None else dict(data),
            split=str(split),
            n_eval=n_eval,
            surrogate=surrogate_entry,
            attack=str(attack),
            attack_config=config,
            eps=parse_eps(eps, "attack.eps"),
            steps=steps,
            seed=seed,
        )
    )


def key_hash(key: Mapping) -> str:
    """A short, stable hash of a request (canonical JSON)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_HASH_CHARS]


def bank_dir(root, dataset: str, surrogate: str, attack: str, eps, steps: int, key: Mapping | None = None) -> Path:
    """``<root>/advbank/<dataset>/<surrogate>/<attack>-eps<E>-s<steps>-<hash of key>`` (no hash without a key)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TrigactError(f"attack.steps={steps!r} must be an integer >= 1")
    leaf = f"{check_name(attack, 'attack')}-eps{eps_tag(eps)}-s{steps}"
    if key is not None:
        leaf += f"-{key_hash(key)}"
    return Path(root) / "advbank" / check_name(dataset, "dataset") / check_name(surrogate, "surrogate") / leaf


def bank_path(root, key: Mapping) -> Path:
    """The folder of the bank that :func:`bank_key` describes."""
    return bank_dir(root, key["dataset"], key["surrogate"]["name"], key["attack"], key["eps"], key["steps"], key)


# ---------------------------------------------------------------------------------- quantization


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> uint8, as saving an image file would."""
    return (x.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    """uint8 -> float pixels in [0, 1]."""
    return q.float() / 255


def to_device_pixels(x: torch.Tensor, device=None) -> torch.Tensor:
    """A batch of stored images on ``device`` (default: where it is) as pixels: a uint8 batch is moved
    first and dequantized there (4x fewer bytes to move, and no float copy on the host); a float batch
    is moved as it is (its dtype kept).

    From the CPU to a CUDA device the batch goes through pinned memory, asynchronously: the copy is
    queued on the current stream, ahead of the kernels that use it.
    """
    device = x.device if device is None else torch.device(device)
    if x.device != device:
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(device, non_blocking=True)
        else:
            x = x.to(device)
    return dequantize(x) if x.dtype == torch.uint8 else x


def stored_images(bank, clean: bool = False) -> torch.Tensor:
    """The images a bank holds, as held: a :class:`Bank`'s uint8 ``q_adv`` / ``q_clean``, or ``x_adv`` /
    ``x_clean`` (float in [0, 1], or uint8) of a bank built by hand or any object carrying those.
    Slice it and pass the slices to :func:`to_device_pixels`: the whole bank is never dequantized."""
    q = getattr(bank, "q_clean" if clean else "q_adv", None)
    return q if q is not None else getattr(bank, "x_clean" if clean else "x_adv")


# ------------------------------------------------------------------------------------------ bank


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrigactError(f"batch_size={batch_size!r} must be an integer >= 1")


class Bank:
    """A bank's images, labels, ``meta.json`` and folder.

    ``q_adv`` / ``q_clean``: uint8 (N, C, H, W), as stored; a loaded bank's are memory-mapped from its
    data file (copy-on-write: writing to them never changes the file). ``y``: int64 (N,).

    A bank built by hand from float images (``Bank(x_adv=..., x_clean=..., y=..., meta=..., path=...)``,
    e.g. in tests) keeps those floats as they are, and its ``q_adv`` / ``q_clean`` are None.

    ``x_adv`` / ``x_clean`` give the float pixels of the whole bank: for a uint8 bank a **full float32
    copy, made anew on each access** (4x the stored bytes). Scoring goes through :meth:`batches` (or
    :func:`stored_images` and :func:`to_device_pixels`), which dequantizes one batch at a time.
    """

    def __init__(self, q_adv: torch.Tensor | None = None, q_clean: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, meta: dict | None = None, path: Path | None = None, *,
                 x_adv: torch.Tensor | None = None, x_clean: torch.Tensor | None = None):
        for q, x, name in ((q_adv, x_adv, "adv"), (q_clean, x_clean, "clean")):
            if (q is None) == (x is None):
                raise TrigactError(f"Bank: give exactly one of q_{name} (uint8) and x_{name} (float)")
            if q is not None and q.dtype != torch.uint8:
                raise TrigactError(f"Bank: q_{name} must be uint8, got {q.dtype}")
            if x is not None and not x.is_floating_point():
                raise TrigactError(
                    f"Bank: x_{name} must be float pixels in [0, 1], got {x.dtype} (uint8: pass q_{name})"
                )
        if y is None:
            raise TrigactError("Bank: y (the labels) is required")
        self.q_adv, self.q_clean, self.y = q_adv, q_clean, y
        self._x_adv, self._x_clean = x_adv, x_clean
        self.meta = {} if meta is None else meta
        self.path = path

    @property
    def x_adv(self) -> torch.Tensor:
        """All adversarial images as float pixels: a full float32 copy of a uint8 bank, on each access."""
        return self._x_adv if self.q_adv is None else dequantize(self.q_adv)

    @property
    def x_clean(self) -> torch.Tensor:
        """All clean images as float pixels: a full float32 copy of a uint8 bank, on each access."""
        return self._x_clean if self.q_clean is None else dequantize(self.q_clean)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        images = stored_images(self)
        return f"Bank(path={str(self.path)!r}, n={len(self)}, images={tuple(images.shape[1:])} {images.dtype})"

    def batches(self, batch_size: int = 256, device=None, clean: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches in stored order on ``device`` (default: the CPU): ``x`` the adversarial
        images (the clean ones with ``clean=True``) as float pixels in [0, 1], each uint8 batch moved to
        the device and dequantized there, exactly :func:`dequantize` of the stored values."""
        _check_batch_size(batch_size)
        device = torch.device("cpu") if device is None else torch.device(device)
        images = stored_images(self, clean)

        def generate():
            for start in range(0, len(self), batch_size):
                stop = start + batch_size
                yield to_device_pixels(images[start:stop], device), self.y[start:stop].to(device, non_blocking=True)

        return generate()

    def loader(self, batch_size: int = 256, clean: bool = False) -> DataLoader:
        """A DataLoader of ``(x_adv, y)`` float batches in stored order (``(x_clean, y)`` with
        ``clean=True``), dequantized image by image; :meth:`batches` is the faster path."""
        _check_batch_size(batch_size)
        return DataLoader(_PixelDataset(stored_images(self, clean), self.y), batch_size=batch_size, shuffle=False)


class _PixelDataset(Dataset):
    """``(pixels, label)`` pairs of stored (uint8 or float) images, dequantized on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return to_device_pixels(self.images[i]), self.labels[i]


def _bank_from_tensors(data: Mapping, meta: dict, path: Path) -> Bank:
    return Bank(q_adv=data["x_adv"], q_clean=data["x_clean"], y=data["y"], meta=meta, path=path)


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise TrigactError(f"no TAE bank at {path}: {META_FILE} is missing (bank absent or incomplete)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrigactError(f"corrupt TAE bank metadata {meta_path}: {type(err).__name__}") from None
    file_info = meta.get("file") if isinstance(meta, dict) else None
    if not isinstance(file_info, dict) or not {"sha256", "bytes"} <= set(file_info):
        raise TrigactError(f"corrupt TAE bank metadata {meta_path}: no sha256/bytes of its data file")
    if _data_file_name(meta) not in DATA_FILES:
        raise TrigactError(
            f"corrupt TAE bank metadata {meta_path}: file.name={file_info.get('name')!r} is not one of "
            f"{', '.join(DATA_FILES)}"
        )
    return meta


def _data_file_name(meta: Mapping) -> str:
    # Format 2 recorded file.name too ("bank.pt"); a meta without it predates format 3 as well.
    return meta["file"].get("name", LEGACY_BANK_FILE)


def _verify_file(data_path: Path, expected: Mapping) -> tuple[int, int]:
    """Check the file's size and sha256 against ``expected``, streaming it in chunks (never all of it
    in memory); return its ``(st_dev, st_ino)``, so the caller can tell whether it is still that file."""
    try:
        handle = open(data_path, "rb")
    except FileNotFoundError:
        raise TrigactError(f"incomplete TAE bank at {data_path.parent}: {data_path.name} is missing") from None
    except OSError as err:
        raise TrigactError(f"cannot read TAE bank {data_path}: {err.strerror or type(err).__name__}") from None
    with handle:
        stat = os.fstat(handle.fileno())
        if stat.st_size != expected["bytes"]:
            raise TrigactError(
                f"corrupt TAE bank {data_path}: {stat.st_size} bytes, metadata says {expected['bytes']} "
                "(truncated write?)"
            )
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(HASH_CHUNK_BYTES))
        try:
            while n := handle.readinto(buffer):
                digest.update(buffer[:n])
        except OSError as err:
            raise TrigactError(f"cannot read TAE bank {data_path}: {err.strerror or type(err).__name__}") from None
    if digest.hexdigest() != expected["sha256"]:
        raise TrigactError(f"corrupt TAE bank {data_path}: sha256 does not match {META_FILE}")
    return stat.st_dev, stat.st_ino


def _map_safetensors(data_path: Path) -> dict:
    """The tensors of a safetensors file, memory-mapped.

    ``safe_open(framework="pt")`` maps the file (``UntypedStorage.from_file``, a private copy-on-write
    mapping) and ``get_tensor`` returns views into that mapping, not copies: measured with safetensors
    0.8 (the tensors' ``data_ptr`` lies in a ``/proc/self/maps`` mapping of the file, and loading a
    129 MB bank grew RSS by 5 MB); ``test_bank.py`` checks it, so a version that copied would fail there.
    """
    with safetensors.safe_open(str(data_path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _map_torch(data_path: Path) -> dict:
    """The tensors of a format-2 ``bank.pt`` (a torch.save zip file), memory-mapped (``mmap=True``)."""
    return torch.load(data_path, map_location="cpu", weights_only=True, mmap=True)


def _read_data(path: Path, meta: dict) -> dict:
    """Check the data file ``meta`` names against its size and sha256, then map it (uint8 stays uint8).

    The file is hashed through one handle and mapped by its name; if the name no longer points to the
    file that was hashed (replaced in between), the mapping is refused: the meta vouches only for the
    bytes it hashed. Writers replace files atomically and never truncate one in place, so a mapped
    bank does not shrink under its reader.
    """
    name = _data_file_name(meta)
    data_path = path / name
    identity = _verify_file(data_path, meta["file"])
    try:
        data = _map_safetensors(data_path) if name == BANK_FILE else _map_torch(data_path)
    except Exception as err:  # safetensors and the unpickler raise many types; any of them means a bad file
        raise TrigactError(f"corrupt TAE bank {data_path}: cannot load ({type(err).__name__})") from None
    try:
        now = os.stat(data_path)
        same = (now.st_dev, now.st_ino) == identity
    except OSError:
        same = False
    if not same:
        raise TrigactError(f"TAE bank {data_path} was replaced while it was being read; load it again")
    _check_tensors(data, data_path)
    return data


def _check_tensors(data, data_path: Path) -> None:
    if not isinstance(data, dict) or not {"x_adv", "x_clean", "y"} <= set(data):
        raise TrigactError(f"corrupt TAE bank {data_path}: expected a dict with x_adv, x_clean, y")
    x_adv, x_clean, y = data["x_adv"], data["x_clean"], data["y"]
    if (
        not all(isinstance(t, torch.Tensor) for t in (x_adv, x_clean, y))
        or x_adv.dtype != torch.uint8
        or x_clean.dtype != torch.uint8
        or y.dtype != torch.int64
        or x_adv.ndim != 4
        or x_adv.shape != x_clean.shape
        or y.shape != x_adv.shape[:1]
    ):
        raise TrigactError(
            f"corrupt TAE bank {data_path}: expected uint8 x_adv/x_clean (N, C, H, W) and int64 y (N,)"
        )


def check_key(meta: Mapping, key: Mapping, path: Path) -> None:
    """A bank's ``meta.json`` must record exactly the request it is loaded for; never mix requests."""
    stored = meta.get("key")
    if stored == key:
        return
    stored = stored if isinstance(stored, dict) else {}
    diffs = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
    raise TrigactError(
        f"TAE bank {path} was made by a different request (differs in: {', '.join(diffs)}); "
        "delete it or use another root, it is never overwritten"
    )


def load_bank(path, key: Mapping | None = None) -> Bank:
    """Load a complete bank (either format) from its folder, its images uint8 and memory-mapped; a
    missing, incomplete or corrupt one fails in one line, and so does one whose recorded request is
    not ``key`` (when given). The data file is hashed in full (streamed) before it is mapped."""
    path = Path(path)
    if not path.is_dir():
        raise TrigactError(f"no TAE bank at {path}: folder does not exist")
    meta = _read_meta(path)
    if key is not None:
        check_key(meta, key, path)
    return _bank_from_tensors(_read_data(path, meta), meta, path)


# -------------------------------------------------------------------------------------- crafting


@torch.no_grad()
def surrogate_predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax predictions of ``model`` in eval mode (mode restored afterwards), on the CPU; ``x``: float
    pixels or uint8 (dequantized per batch, on the model's device)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        preds = [model(to_device_pixels(x[i : i + batch_size], device)).argmax(1).cpu()
                 for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _loader_size(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _progress(enabled: bool, description: str, total: int | None):
    """A rich progress bar (or a no-op) advanced by images."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )
    task = progress.add_task(description, total=total)
    return progress, task


def craft(
    attack_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: Iterable,
    eps: float,
    progress: bool = True,
    description: str = "attack",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``attack_fn`` batch by batch; return quantized ``(x_adv, x_clean, y)`` on the CPU.

    The clean images are quantized first and the attack runs on those, so the stored ``x_clean`` is
    exactly what the attack perturbed; quantizing ``x_adv`` then moves it at most 0.5/255 further.
    """
    advs, cleans, labels = [], [], []
    bar, task = _progress(progress, description, _loader_size(loader))
    with bar:
        for batch in loader:
            x, y = batch[0], batch[1]
            if x.ndim != 4:
                raise TrigactError(f"the bank loader must yield images (B, C, H, W), got {tuple(x.shape)}")
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise TrigactError(
                    f"the bank loader yielded pixels in [{x.min().item():.3g}, {x.max().item():.3g}]; expected [0, 1]"
                )
            q_clean = quantize(x.cpu())
            y = y.detach().cpu().long()
            x_adv = attack_fn(dequantize(q_clean).to(x.device), y.to(x.device))
            if x_adv.shape != x.shape:
                raise TrigactError(f"{description}: attack returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}")
            q_adv = quantize(x_adv.cpu())
            advs.append(q_adv)
            cleans.append(q_clean)
            labels.append(y)
            bar.advance(task, len(y))
    if not labels:
        raise TrigactError(f"{description}: the bank loader yielded no images")
    x_adv, x_clean, y = torch.cat(advs), torch.cat(cleans), torch.cat(labels)
    check_budget(x_adv, x_clean, eps, description)
    return x_adv, x_clean, y


def check_budget(q_adv: torch.Tensor, q_clean: torch.Tensor, eps: float, what: str = "bank") -> float:
    """L_inf distance of the quantized images, checked against ``eps`` plus the uint8 rounding allowance."""
    dist = (q_adv.int() - q_clean.int()).abs().max().item() / 255 if q_adv.numel() else 0.0
    if dist > eps + 1 / 255 + 1e-6:
        raise TrigactError(
            f"{what}: |x_adv - x_clean|_inf = {dist * 255:.4g}/255 exceeds eps + 1/255 = {eps * 255 + 1:.4g}/255"
        )
    return dist


def _jsonable(obj):
    """Round-trip through JSON, so configs compare as they are stored (tuples -> lists, ...)."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def file_sha256(path) -> str:
    """sha256 of a file, read in chunks (e.g. a surrogate's bundle, for its bank key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bank_lock(path: Path):
    """An exclusive flock on ``<bank>/.lock``: one crafter per bank, the others wait for it
    (:func:`trigact.common.io.folder_lock`)."""
    return folder_lock(path, LOCK_FILE, waiting=f"waiting for TAE bank {path}: another process is crafting it",
                       failing=f"cannot craft TAE bank {path}")


def _remove_stale(path: Path) -> None:
    """Delete what an interrupted or corrupt bank left (data files of either format): meta first, so
    no marker outlives its data. Only the holder of the bank's lock may call this: another process's
    fresh file is never deleted."""
    (path / META_FILE).unlink(missing_ok=True)
    for name in DATA_FILES:
        (path / name).unlink(missing_ok=True)
    now = time.time()
    for name in (*DATA_FILES, META_FILE):
        for tmp in path.glob(f".{name}.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
            except FileNotFoundError:
                pass


def _complete_bank(path: Path, key: Mapping, wanted: int | None, report: bool) -> Bank | None:
    """The complete bank of this request in ``path``, or None (stale or absent; said when ``report``)."""
    if not (path / META_FILE).exists():
        for name in DATA_FILES if report else ():
            if (path / name).exists():
                print(f"stale TAE bank, crafting again: {path / name} has no {META_FILE} (interrupted write)")
        return None
    try:
        bank = load_bank(path)
    except TrigactError as err:
        if report:
            print(f"stale TAE bank, crafting again: {err}")
        return None
    check_key(bank.meta, key, path)
    if wanted is not None and wanted != len(bank):
        raise TrigactError(
            f"TAE bank {path} holds {len(bank)} images but {wanted} were asked for (another n_eval, or the data "
            "changed since it was crafted); delete it or use another output root, a bank is never overwritten"
        )
    return bank


def ensure_bank(
    root,
    dataset: str,
    surrogate_name: str,
    surrogate_bundle,
    surrogate_model: nn.Module,
    attack_name: str,
    attack_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    attack_config: Mapping,
    eps,
    steps: int,
    loader: Iterable,
    progress: bool = True,
    *,
    key: Mapping | None = None,
) -> Bank:
    """Return the bank for this request, crafting it only if no complete bank exists.

    ``attack_fn(x, y) -> x_adv`` is called once per batch of ``loader`` (``(x, y)`` batches in
    [0, 1]). A complete bank (``meta.json`` whose sha256 and size match the data file it names:
    ``bank.safetensors``, or a format-2 bank's ``bank.pt``) is loaded and returned without calling
    ``attack_fn``; an incomplete or corrupt one is deleted and crafted again (in format 3).
    ``key`` (:func:`bank_key`; by default one from the arguments alone) names the folder and must
    equal the key in a complete bank's ``meta.json``. ``attack_config`` is recorded as the attack's
    resolved settings. While checking and crafting, the bank's lock is held; a second process asking
    for the same bank waits for it and then reuses the first one's bank.
    """
    eps = parse_eps(eps, "attack.eps")
    if key is None:
        key = bank_key(dataset, surrogate_name, attack_name, attack_config, eps, steps)
    elif (key["dataset"], key["surrogate"]["name"], key["attack"], key["steps"]) != (
        str(dataset), str(surrogate_name), str(attack_name), steps
    ) or not math.isclose(key["eps"], eps, abs_tol=1e-12):
        raise ValueError(
            f"bank key {key} does not describe {dataset}/{surrogate_name}/{attack_name} eps={eps} steps={steps}"
        )
    path = bank_path(root, key)
    wanted = _loader_size(loader)

    # A complete bank is read without the lock: nobody deletes a complete bank of its own request,
    # and a read-only output root can still serve it.
    bank = _complete_bank(path, key, wanted, report=False)
    if bank is None:
        with _bank_lock(path):
            # Another process may have finished it while this one waited for the lock.
            bank = _complete_bank(path, key, wanted, report=True)
            if bank is None:
                _remove_stale(path)
                return _craft_bank(path, key, dataset, surrogate_name, surrogate_bundle, surrogate_model,
                                   attack_name, attack_fn, attack_config, eps, steps, loader, progress)
    print(f"reusing TAE bank: {path} ({len(bank)} images)")
    return bank


def _craft_bank(path, key, dataset, surrogate_name, surrogate_bundle, surrogate_model, attack_name, attack_fn,
                attack_config, eps, steps, loader, progress) -> Bank:
    """Craft, measure and write a bank (the caller holds its lock)."""
    start = time.perf_counter()
    description = f"{attack_name} eps={eps_tag(eps)}/255 on {surrogate_name}"
    q_adv, q_clean, y = craft(attack_fn, loader, eps, progress=progress, description=description)
    wall_time = time.perf_counter() - start

    # Measured on the stored uint8 images (dequantized batch by batch): what every victim will see.
    pred_clean = surrogate_predictions(surrogate_model, q_clean)
    pred_adv = surrogate_predictions(surrogate_model, q_adv)
    n = len(y)
    clean_acc = (pred_clean == y).float().mean().item()
    whitebox_success = (pred_adv != y).float().mean().item()

    data = {"x_adv": q_adv.contiguous(), "x_clean": q_clean.contiguous(), "y": y.contiguous()}
    # Hash the bytes written, not the file afterwards: the meta then vouches for exactly this data.
    raw = safetensors.torch.save(data)
    atomic_write_bytes(raw, path / BANK_FILE)
    meta = dict(
        key=key,
        key_hash=key_hash(key),
        dataset=str(dataset),
        surrogate=dict(name=str(surrogate_name), bundle=None if surrogate_bundle is None else str(surrogate_bundle)),
        attack=str(attack_name),
        threat=level_meta(transfer_level(surrogate_model)),  # who the attacker is (DESIGN.md, Threat models)
        attack_config=_jsonable(dict(attack_config)),
        eps=eps,
        eps_255=eps_tag(eps),
        steps=steps,
        format_version=FORMAT_VERSION,
        n=n,
        image_shape=list(q_adv.shape[1:]),
        surrogate_clean_acc=clean_acc,
        surrogate_adv_acc=1.0 - whitebox_success,
        whitebox_success_rate=whitebox_success,
        linf_uint8=int((q_adv.int() - q_clean.int()).abs().max().item()),
        wall_time_s=wall_time,
        torch_version=torch.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        file=dict(name=BANK_FILE, sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw)),
    )
    atomic_write_json(meta, path / META_FILE)  # last: its presence marks the bank complete
    print(
        f"TAE bank written: {path} ({n} images, surrogate clean acc {clean_acc:.2%}, "
        f"white-box success {whitebox_success:.2%}, {wall_time:.1f}s)"
    )
    return _bank_from_tensors(data, meta, path)
