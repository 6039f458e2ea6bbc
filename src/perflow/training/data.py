"""Training data: the built-in digits, an image folder with captions, tar shards; a resumable sampler.

Items are dicts: ``pixel_values`` ``(C, H, W)`` float32 in ``[-1, 1]``, and ``caption`` (str) or
``label`` (int); the image datasets add ``original_size`` ``(h, w)`` and ``crop_top_left``
``(top, left)`` (SDXL's size conditioning, from the real image). Images are read with the
teacher's channel count (``L`` for 1, ``RGB`` for 3, ``RGBA`` for 4).

An unreadable image or sample (``data.on_bad_image``): ``error`` raises :class:`BadImageError`
naming the file; ``skip`` (default) fills its slot with the next readable item (index ``i + 1``,
``i + 2``, ... so a resumed run sees the same batch) and reports the names in the item's
``bad_images``. :func:`collate` gives a caption-less item in a captioned batch the null caption
``""`` and marks it in ``caption_missing``: the loop treats it as a dropped caption and counts it.

- **image folder** (HF ``imagefolder`` convention): images plus a ``metadata.jsonl`` of
  ``{"file_name": ..., "text": ...}`` lines (or a ``metadata.csv`` with those columns); without
  metadata every image is used, caption-free. For a teacher conditioned on class labels
  (:class:`LabelRange`, from :func:`teacher_labels`) each row's ``label`` column
  (``data.label_column``) is read instead of the caption and checked against the teacher's classes.
- **tar shards** (WebDataset layout): samples are the members sharing a basename
  (``0001.jpg`` + ``0001.txt`` or ``0001.json``). The shards are indexed once (member offsets)
  and read by random access with the stdlib ``tarfile``, so they support the same seeded,
  exactly resumable sampler as a folder, without the ``webdataset`` package.

:class:`ResumableBatchSampler` draws a seeded permutation per epoch and gives rank ``r`` of
``R`` the ``r``-th slice of each global batch; its position is a single micro-step counter,
so ``(epoch, index)`` after a resume is exact.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
"""PIL mode for each channel count a teacher may take."""
MAX_SUBSTITUTES = 100
"""How many following items a skipped unreadable one may try before the run stops."""


class BadImageError(ValueError):
    """An image or sample that cannot be read (names the file)."""


@dataclass(frozen=True)
class LabelRange:
    """The class labels a teacher takes: integers ``0 .. num_labels - 1`` (no upper bound when
    ``num_labels`` is None) other than its ``null_label``; read from ``column``."""

    column: str = "label"
    num_labels: int | None = None
    null_label: int | None = None

    def check(self, value: Any, where: str) -> int:
        """``value`` as a label; a ``ValueError`` naming ``where`` (file and row) and the fix if it is not one."""
        text = str(value).strip()
        if isinstance(value, bool) or not (isinstance(value, int) or text.lstrip("-").isdigit()):
            raise ValueError(f"{where}: {self.column} {value!r} is not an integer class index; fix the row or set data.label_column")
        label = int(text)
        top = f"{self.num_labels - 1}" if self.num_labels is not None else ""
        if label < 0 or (self.num_labels is not None and label >= self.num_labels) or label == self.null_label:
            null = f", {self.null_label} is the null class" if self.null_label is not None else ""
            raise ValueError(
                f"{where}: {self.column} {label} is not one of the teacher's classes (0..{top}{null}); fix the row "
                "or give the teacher these labels were made for"
            )
        return label


def teacher_labels(teacher: Any, data_cfg: Any) -> LabelRange | None:
    """The :class:`LabelRange` a dataset must read for ``teacher`` (one with ``uses_labels``), None when it
    reads captions (or nothing: ``data.caption_free``)."""
    if not getattr(teacher, "uses_labels", False) or data_cfg.caption_free:
        return None
    return LabelRange(data_cfg.label_column, teacher.num_labels, teacher.null_label)


def read_metadata(root: Path) -> tuple[Path, list[tuple[int, dict]]] | None:
    """``(file, [(line number, row)])`` of an image folder's ``metadata.jsonl`` (or ``metadata.csv``), or None."""
    meta = root / "metadata.jsonl"
    if meta.is_file():
        rows = []
        for n, line in enumerate(_metadata_text(meta).splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{meta}:{n}: not a JSON object ({err.msg}); fix the line") from None
        return meta, rows
    meta = root / "metadata.csv"
    if meta.is_file():
        return meta, [(n, row) for n, row in enumerate(csv.DictReader(io.StringIO(_metadata_text(meta), newline="")), 2)]
    return None


def _metadata_text(path: Path) -> str:
    """A metadata file's text: UTF-8, with or without the byte-order mark spreadsheets write; other encodings
    are a one-line error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def image_mode(channels: int) -> str:
    """The PIL mode giving ``channels`` channels; a ``ValueError`` for counts no image format has."""
    if channels not in IMAGE_MODES:
        raise ValueError(
            f"the teacher takes {channels}-channel images; image datasets give 1 (L), 3 (RGB) or 4 (RGBA) "
            "channels: pass a dataset of matching tensors instead"
        )
    return IMAGE_MODES[channels]


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    import struct
    import zlib

    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def _aug_generator(seed: int, index: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, epoch])


def load_image(
    source: str | Path | bytes, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator,
    mode: str = "RGB",
) -> dict[str, Any]:
    """Open, convert to ``mode``, resize the short side to ``resolution`` (bicubic), crop a square, optionally flip.

    Returns ``pixel_values`` (C, R, R) in ``[-1, 1]``, ``original_size`` (h, w) of the file and
    ``crop_top_left`` (top, left) in resized coordinates.
    """
    from PIL import Image

    from PIL import ImageOps

    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    img = ImageOps.exif_transpose(img)  # a phone photo's orientation tag: trained the way it is shown
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # 16-bit / 32-bit greyscale: PIL's convert clips at 255
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    img = img.convert(mode)
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32)
    arr = torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr).permute(2, 0, 1) / 127.5 - 1.0  # (C, R, R)
    return {"pixel_values": arr, "original_size": (h, w), "crop_top_left": (top, left)}


class _ImageDataset(Dataset):
    """Keys ``(index, epoch)``; an unreadable item is skipped or raised (``on_bad_image``)."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool, seed: int, channels: int, on_bad_image: str):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"data.on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.mode, self.on_bad_image = image_mode(channels), on_bad_image

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    def _name(self, index: int) -> str:
        raise NotImplementedError

    def _image(self, source: str | Path | bytes, index: int, epoch: int) -> dict[str, Any]:
        rng = _aug_generator(self.seed, index, epoch)
        return load_image(source, self.resolution, self.center_crop, self.random_flip, rng, self.mode)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        bad: list[str] = []
        for i in (index + k for k in range(min(len(self), MAX_SUBSTITUTES))):
            i %= len(self)
            try:
                item = self._load(i, epoch)
            except _unreadable_errors() as err:
                reason = " ".join(str(err).split()) or type(err).__name__
                if self.on_bad_image == "error":
                    raise BadImageError(
                        f"data: cannot read {self._name(i)} ({reason}); fix or remove it, or set data.on_bad_image skip"
                    ) from None
                bad.append(f"{self._name(i)} ({reason})")
                continue
            if bad:
                item["bad_images"] = bad
            return item
        raise BadImageError(f"data: {len(bad)} unreadable items in a row from {self._name(index)}: {'; '.join(bad[:3])}")


class ImageFolderDataset(_ImageDataset):
    """Images of a folder with an optional ``metadata.jsonl``/``metadata.csv`` (``file_name`` + caption
    column, or the label column of ``labels``)."""

    def __init__(
        self, root: str | Path, resolution: int, center_crop: bool = True, random_flip: bool = False,
        caption_column: str = "text", seed: int = 0, channels: int = 3, on_bad_image: str = "skip",
        labels: LabelRange | None = None,
    ):
        super().__init__(resolution, center_crop, random_flip, seed, channels, on_bad_image)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        metadata = read_metadata(self.root)
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)  # every image under root
        self.items: list[tuple[str, str | int | None]] = []
        if metadata is not None:
            meta, rows = metadata
            for n, row in rows:
                if not isinstance(row, dict) or "file_name" not in row:
                    raise ValueError(f"{meta}:{n}: each line needs a 'file_name' (HF imagefolder convention)")
                if labels is not None:
                    if labels.column not in row:
                        raise ValueError(f"{meta}:{n}: no label column {labels.column!r} (the teacher is conditioned on "
                                         "class labels); set data.label_column, or data.caption_free true")
                    value: str | int = labels.check(row[labels.column], f"{meta}:{n}")
                elif caption_column not in row:
                    raise ValueError(f"{meta}:{n}: no caption column {caption_column!r}; set data.caption_column")
                else:
                    value = None if row[caption_column] is None else str(row[caption_column])  # null: no caption
                if not (self.root / row["file_name"]).is_file():
                    raise FileNotFoundError(f"{meta}:{n}: {row['file_name']} not found in {self.root}")
                self.items.append((row["file_name"], value))
            if len(files) > len(self.items):
                print(f"data: {meta.name} lists {len(self.items)} of the {len(files)} images in {self.root}; the others are not used")
        else:
            self.items = [(str(p.relative_to(self.root)), None) for p in files]
            if labels is not None and files:
                self.items = self._folder_labels(files, labels)
        if not self.items:
            raise ValueError(f"no images found in {self.root} (extensions {IMAGE_EXTS})")

    def _folder_labels(self, files: list[Path], labels: LabelRange) -> list[tuple[str, int]]:
        """Labels from class subfolders (HF ``imagefolder``'s convention when there is no metadata): every image
        one folder down; folders named by integers are those classes, other names are numbered in sorted order."""
        rel = [p.relative_to(self.root) for p in files]
        if any(len(r.parts) != 2 for r in rel):
            raise ValueError(f"{self.root}: the teacher is conditioned on class labels, but there is no metadata.jsonl "
                             "(file_name + label columns) and the images are not all in class subfolders (ROOT/CLASS/x.png); "
                             "add one of them, or set data.caption_free true to train unconditionally")
        names = sorted({r.parts[0] for r in rel})
        numeric = all(n.isdigit() for n in names)
        ids = {n: (int(n) if numeric else i) for i, n in enumerate(names)}
        shown = ", ".join(f"{n} -> {ids[n]}" for n in names[:10]) + (" ..." if len(names) > 10 else "")
        print(f"data: class labels from the subfolders of {self.root}: {shown}")
        return [(str(r), labels.check(ids[r.parts[0]], str(self.root / r.parts[0]))) for r in rel]

    def __len__(self) -> int:
        return len(self.items)

    def _name(self, index: int) -> str:
        return str(self.root / self.items[index][0])

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        name, value = self.items[index]
        item = self._image(self.root / name, index, epoch)
        if isinstance(value, int):
            item["label"] = value
        elif value is not None:
            item["caption"] = value
        return item


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a folder (all ``*.tar``), a glob, or a brace range ``a-{000..009}.tar``."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
        if m:
            lo, hi = m.group(1), m.group(2)
            paths = [spec[: m.start()] + str(i).zfill(len(lo)) + spec[m.end():] for i in range(int(lo), int(hi) + 1)]
        else:
            paths = sorted(glob.glob(spec))
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise FileNotFoundError(f"no tar shards for {spec!r}" + (f" (missing {missing[:3]})" if missing else ""))
    return paths


class TarShardDataset(_ImageDataset):
    """WebDataset-layout tar shards read by random access (an index of member offsets, built once)."""

    def __init__(
        self, shards: str | list[str], resolution: int, center_crop: bool = True, random_flip: bool = False,
        caption_column: str = "text", seed: int = 0, channels: int = 3, on_bad_image: str = "skip",
        labels: LabelRange | None = None,
    ):
        super().__init__(resolution, center_crop, random_flip, seed, channels, on_bad_image)
        self.paths = expand_shards(shards) if isinstance(shards, str) else list(shards)
        self.caption_column, self.labels = caption_column, labels
        self.keys: list[str] = []
        # sample: (shard, {ext: (offset_data, size)})
        self.samples: list[tuple[int, dict[str, tuple[int, int]]]] = []
        for s, path in enumerate(self.paths):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base, _, ext = os.path.basename(member.name).partition(".")
                    key = os.path.join(os.path.dirname(member.name), base)
                    groups.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
            for key in sorted(groups):
                parts = groups[key]
                if any(e in parts for e in ("jpg", "jpeg", "png", "webp")):
                    self.samples.append((s, parts))
                    self.keys.append(key)
        if not self.samples:
            raise ValueError(f"no image samples in tar shards {self.paths[:3]}")

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        with open(self.paths[shard], "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def _name(self, index: int) -> str:
        return f"{self.paths[self.samples[index][0]]}:{self.keys[index]}"

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        shard, parts = self.samples[index]
        ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in parts)
        item = self._image(self._read(shard, parts[ext]), index, epoch)
        if self.labels is not None:  # the label from the sample's .cls, or its .json's label column
            meta = json.loads(self._read(shard, parts["json"])) if "json" in parts else {}
            raw = self._read(shard, parts["cls"]).decode("utf-8").strip() if "cls" in parts else meta.get(self.labels.column)
            if raw is None:
                raise ValueError(f"{self._name(index)}: no class label (.cls, or {self.labels.column!r} in its .json); "
                                 "set data.label_column, or data.caption_free true")
            item["label"] = self.labels.check(raw, self._name(index))
        elif "txt" in parts:
            item["caption"] = self._read(shard, parts["txt"]).decode("utf-8").strip()
        elif "json" in parts:
            meta = json.loads(self._read(shard, parts["json"]))
            if meta.get(self.caption_column) is not None:  # a null caption is a missing one, not the text "None"
                item["caption"] = str(meta[self.caption_column])
        return item


class ConditionsDataset(Dataset):
    """Training items without images, for data-free PeRFlow (every window starting at the student's own sampler
    state, ``perflow.student_starts 1``, which reads no ``x0``): ``pixel_values`` zeros ``(C, H, W)`` and the
    conditions cycled over ``size`` items: ``label`` from ``labels``, ``caption`` from ``captions``, or neither
    (an unconditional teacher), and ``control_image`` from ``controls`` ``(M, C, H, W)`` (a ControlNet target;
    item ``i`` takes row ``i mod M``, as the evaluation cycles them)."""

    def __init__(self, size: int, channels: int, resolution: int, labels: list[int] | None = None,
                 captions: list[str] | None = None, controls: torch.Tensor | None = None):
        if labels is not None and captions is not None:
            raise ValueError("give class labels or captions, not both")
        if size < 1 or (labels is not None and not labels) or (captions is not None and not captions):
            raise ValueError("a conditions dataset needs at least one item and one label or caption to cycle")
        self.size, self.shape = int(size), (int(channels), int(resolution), int(resolution))
        self.labels, self.captions, self.controls = labels, captions, controls

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"pixel_values": torch.zeros(self.shape)}
        if self.labels is not None:
            item["label"] = int(self.labels[index % len(self.labels)])
        if self.captions is not None:
            item["caption"] = str(self.captions[index % len(self.captions)])
        if self.controls is not None:
            item["control_image"] = self.controls[index % self.controls.shape[0]]
        return item


class _DropEpoch(Dataset):
    """Adapts a plain map-style dataset to the ``(index, epoch)`` keys of the sampler."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.base[key[0]]


def resolve_source(source: str, path: str | None) -> str:
    """``data.source`` with ``auto`` resolved: ``webdataset`` when ``path`` names tar shards (a ``.tar``
    file, a brace list or glob of them, or a folder holding ``*.tar`` files), ``imagefolder`` for any
    other path, ``digits`` (the built-in) without one."""
    if source != "auto":
        return source
    if not path:
        return "digits"
    spec = str(path)
    if os.path.isdir(spec):
        return "webdataset" if glob.glob(os.path.join(spec, "*.tar")) and not _has_images(spec) else "imagefolder"
    return "webdataset" if spec.endswith(".tar") or re.search(r"\{\d+\.\.\d+\}", spec) or glob.has_magic(spec) else "imagefolder"


def _has_images(folder: str) -> bool:
    return any(os.path.splitext(f)[1].lower() in IMAGE_EXTS for f in os.listdir(folder))


def build_dataset(data_cfg, seed: int = 0, channels: int = 3, labels: LabelRange | None = None) -> Dataset:
    """The dataset named by a :class:`~perflow.training.config.DataConfig` (whose ``source`` and
    ``resolution`` are resolved: :func:`perflow.training.loop.with_data`); images are read with
    ``channels`` channels (the teacher's), and class labels instead of captions when ``labels`` is
    given (:func:`teacher_labels`)."""
    if data_cfg.resolution is None:
        raise ValueError("data.resolution is unset: resolve it with the teacher first (perflow.training.loop.with_data)")
    source = resolve_source(data_cfg.source, data_cfg.path)
    if source == "digits":
        from perflow.builtin.digits import load_digits_dataset

        return load_digits_dataset("train", image_size=data_cfg.resolution)
    kw = dict(
        resolution=data_cfg.resolution, center_crop=data_cfg.center_crop, random_flip=data_cfg.random_flip,
        caption_column=data_cfg.caption_column, seed=seed, channels=channels,
        on_bad_image=getattr(data_cfg, "on_bad_image", "skip"), labels=labels,
    )
    if source == "imagefolder":
        return ImageFolderDataset(data_cfg.path, **kw)
    if source == "webdataset":
        return TarShardDataset(data_cfg.path, **kw)
    raise ValueError(f"unknown data.source {data_cfg.source!r}; expected auto, imagefolder, webdataset or digits")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items into a batch (captions stay a list of str).

    When some items have a caption, those without get ``""`` and ``caption_missing`` (B,) bool marks
    them; ``bad_images`` lists the unreadable files the items skipped.
    """
    if not items or "pixel_values" not in items[0]:
        raise ValueError("dataset items must be dicts with a 'pixel_values' tensor (C, H, W) in [-1, 1]")
    batch: dict[str, Any] = {"pixel_values": torch.stack([torch.as_tensor(i["pixel_values"]) for i in items]).float()}
    if any("caption" in i for i in items):
        batch["caption"] = [str(i.get("caption", "")) for i in items]
        if not all("caption" in i for i in items):
            batch["caption_missing"] = torch.tensor(["caption" not in i for i in items])  # (B,)
    bad = [name for i in items for name in i.get("bad_images", ())]
    if bad:
        batch["bad_images"] = bad
    if all("label" in i for i in items):
        batch["label"] = torch.as_tensor([int(i["label"]) for i in items], dtype=torch.long)
    if all("control_image" in i for i in items):  # a ControlNet target's conditioning images (C, H, W)
        batch["control_image"] = torch.stack([torch.as_tensor(i["control_image"]) for i in items]).float()
    for key in ("original_size", "crop_top_left"):
        if all(key in i for i in items):
            batch[key] = torch.as_tensor([tuple(i[key]) for i in items], dtype=torch.long)  # (B, 2)
    return batch


def check_channels(ds: Dataset, channels: int) -> None:
    """Refuse early a dataset whose images have another channel count than the teacher's."""
    if isinstance(ds, _ImageDataset) or len(ds) == 0:
        return  # the image datasets read images with the teacher's channel count
    item = ds[0]
    if isinstance(item, dict) and "pixel_values" in item:
        c = torch.as_tensor(item["pixel_values"]).shape[0]
        if c != channels:
            raise ValueError(
                f"the dataset's images have {c} channels but the teacher takes {channels}; use a dataset "
                f"with {channels}-channel images (image folders and shards are converted to the teacher's channels)"
            )


def check_dataset_size(num_items: int, batch_size: int, num_replicas: int = 1) -> None:
    """Refuse a data set smaller than one global batch (``batch_size x num_replicas``): the epoch would be empty."""
    global_batch = batch_size * num_replicas
    if num_items < global_batch:
        raise ValueError(
            f"the dataset has {num_items} items, fewer than one global batch of {global_batch} "
            f"(batch_size {batch_size} x {num_replicas} processes); lower training.batch_size"
        )


class ResumableBatchSampler:
    """Infinite, seeded batches for one rank, starting at micro-step ``start``.

    Epoch ``e`` uses ``randperm(N, seed + e)``; micro-step ``m`` is batch ``m mod E`` of epoch
    ``m // E`` with ``E = N // (batch_size R)`` (the ragged tail is dropped); rank ``r`` takes
    the ``r``-th ``batch_size`` slice of the global batch. Yields lists of ``(index, epoch)``.
    """

    def __init__(self, num_items: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, start: int = 0):
        check_dataset_size(num_items, batch_size, num_replicas)
        self.batches_per_epoch = num_items // (batch_size * num_replicas)
        self.batch_size, self.num_replicas, self.rank, self.seed, self.start = batch_size, num_replicas, rank, seed, start
        self.num_items = num_items

    def position(self, micro_step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of a micro-step."""
        return divmod(micro_step, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm_epoch, perm = -1, None
        for m in count(self.start):
            epoch, b = self.position(m)
            if epoch != perm_epoch:
                perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
                perm_epoch = epoch
            lo = b * self.batch_size * self.num_replicas + self.rank * self.batch_size
            yield [(int(i), epoch) for i in perm[lo: lo + self.batch_size]]


def make_loader(dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int, start: int, num_workers: int = 0):
    """A ``DataLoader`` over :class:`ResumableBatchSampler` (the dataset is wrapped to accept ``(index, epoch)``)."""
    from torch.utils.data import DataLoader

    keyed = dataset if isinstance(dataset, _ImageDataset) else _DropEpoch(dataset)
    sampler = ResumableBatchSampler(len(dataset), batch_size, num_replicas, rank, seed, start)  # type: ignore[arg-type]
    loader = DataLoader(keyed, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        persistent_workers=num_workers > 0, worker_init_fn=_ignore_stop_signals if num_workers else None)
    return loader, sampler


def close_loader(loader) -> None:
    """Shut the loader's worker processes down now (they ignore SIGTERM, see below, so they must not be
    left to multiprocessing's exit handler, which would wait for them after a terminate)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM (sent to the whole process group by Ctrl-C and by many schedulers) to
    the main process, which stops at a step boundary and shuts them down with :func:`close_loader`
    (a worker killed by the signal would fail the main process with a DataLoader error)."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
