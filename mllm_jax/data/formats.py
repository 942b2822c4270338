"""Readers for real dataset formats; each is a random-access source of ``Sample``s.

* ``LlavaSource``: LLaVA conversation JSON (a list of ``{"id", "image": path | [paths],
  "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}``) plus an
  image folder. ``<image>`` marks where each image goes, in order.
* ``InterleavedSource``: JSONL, one document per line, OBELICS/MMC4-style: ``{"texts": [...],
  "images": [...]}`` where ``texts`` has ``null`` where an image goes and ``images`` lists the
  image paths, either aligned with ``texts`` (OBELICS: ``null`` where a text goes) or compact
  (one path per ``null`` text).
* ``PairsSource``: image-text pairs, JSONL (``{"image": path, "caption": str}``, ``"text"``
  also accepted) or TSV (``path<TAB>caption``, optional header line).
* ``FashionMNISTSource``: the Debian package ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist/``) with templated captions.

Records are parsed lazily in ``__getitem__`` (JSONL files are indexed by line offset once), so
a bad record raises a ``DataError`` naming file, line/record and field, and the pipeline's
``bad_input`` policy decides between error and skip-and-count. Image paths are decoded later,
in validation. Pair-like sources format each record as a task: ``pair`` (document
[image, caption]), ``caption`` (chat: image + prompt -> caption) or ``vladva`` (two views).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Optional

import numpy as np

from mllm_jax.data.schema import DataError, Sample, decode_text, image_segment, text_segment

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TOKEN = "<image>"
PAIR_TASKS = ("pair", "caption", "vladva")


def pair_task(sid: str, source: str, image, caption: str, task: str, meta: Optional[dict] = None):
    """An (image, caption) record as a training sample for ``task`` (see ``PAIR_TASKS``)."""
    from mllm_jax.data.synthetic_sets import PROMPT_IMAGE_SUMMARY, PROMPT_SHORT, PROMPT_TEXT_SUMMARY
    meta = dict(meta or {}, caption=caption)
    if task == "pair":
        return Sample(sid, (image_segment(image), text_segment(caption)), source, meta=meta)
    if task == "caption":
        return Sample(sid, (image_segment(image, "user"), text_segment(PROMPT_SHORT, "user"),
                            text_segment(caption, "assistant")), source, meta=meta)
    if task == "vladva":
        return {"image": Sample(sid + "/image", (image_segment(image, "user"), text_segment(PROMPT_IMAGE_SUMMARY, "user")), source, meta=meta),
                "text": Sample(sid + "/text", (text_segment(caption, "user"), text_segment(PROMPT_TEXT_SUMMARY, "user")), source, meta=meta)}
    raise ValueError(f"pair task {task!r}: expected one of {PAIR_TASKS}")


class _PairTaskMixin:
    task: str

    @property
    def views(self) -> Optional[tuple[str, ...]]:
        return ("image", "text") if self.task == "vladva" else None


def _repeated(keys) -> set:
    """The keys (record ids) that occur more than once (None: no id)."""
    seen, repeated = set(), set()
    for key in keys:
        if key is not None:
            (repeated if key in seen else seen).add(key)
    return repeated


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


class _Lines:
    """Byte offsets of the non-empty lines of a text file, for random access."""

    def __init__(self, file: Path):
        self.file = file
        if not file.exists():
            raise FileNotFoundError(f"{file}: not found")
        data = file.read_bytes()
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0     # a UTF-8 byte-order mark (Notepad, Excel) is not line 1's
        starts = np.concatenate([[bom], np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1])
        ends = np.append(starts[1:], len(data))
        keep = [(int(s), int(e), n + 1) for n, (s, e) in enumerate(zip(starts, ends)) if data[s:e].strip()]
        self.spans = keep

    def __len__(self) -> int:
        return len(self.spans)

    def raw(self, i: int) -> bytes:
        s, e, _ = self.spans[i]
        with open(self.file, "rb") as f:
            f.seek(s)
            return f.read(e - s).rstrip(b"\r\n")

    def record(self, i: int) -> str:
        return f"{self.file.name}:{self.spans[i][2]}"

    def ids(self) -> list[Optional[str]]:
        """``str(obj.get("id", i))`` of the JSON object on line record ``i``, as the JSONL readers
        name their samples; None where the line is no JSON object (``json`` raises its
        ``DataError`` when that record is read)."""
        data, out = self.file.read_bytes(), []
        for i, (s, e, _) in enumerate(self.spans):
            try:
                obj = json.loads(data[s:e].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                obj = None
            out.append(str(obj.get("id", i)) if isinstance(obj, dict) else None)
        return out

    def json(self, i: int) -> dict:
        rec = self.record(i)
        text = decode_text(self.raw(i), rec, "line")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError("bad_record", rec, "line", f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DataError("bad_record", rec, "line", f"expected a JSON object, got {type(obj).__name__}")
        return obj


class LlavaSource:
    views = None

    def __init__(self, path: str | Path, image_root: Optional[str | Path] = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: LLaVA JSON not found")
        try:
            self.records = json.loads(self.path.read_bytes().decode("utf-8-sig"))   # with or without a BOM
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: not a UTF-8 JSON file: {e}") from None
        if not isinstance(self.records, list):
            raise ValueError(f"{self.path}: expected a JSON list of conversation records")
        self.root = Path(image_root) if image_root else self.path.parent
        # LLaVA-format files reuse ids (the image's id for several conversations about it); sample
        # ids key the teacher caches, so a repeated id gets the record index: "llava:<id>#<index>"
        self._repeated = _repeated(str(r.get("id", i)) if isinstance(r, dict) else None
                                   for i, r in enumerate(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        st = self.path.stat()
        return f"llava:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.root}"

    def __getitem__(self, i: int) -> Sample:
        r = self.records[i]
        rid = f"{self.path.name}[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
            raise DataError("bad_record", rid, "conversations", "record needs a 'conversations' list")
        key = str(r.get("id", i))
        sid = f"llava:{key}#{i}" if key in self._repeated else f"llava:{key}"
        images = r.get("image") or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError("bad_record", f"{rid} (id {r.get('id')})", "image",
                            f"expected a path or a list of paths, got {r.get('image')!r}")
        slots = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in r["conversations"] if isinstance(t, dict))
        if slots != len(images):
            raise DataError("image_count_mismatch", f"{rid} (id {r.get('id')})", "conversations",
                            f"{slots} {IMAGE_TOKEN} slots but {len(images)} images in 'image'")
        segs, k = [], 0
        for t, turn in enumerate(r["conversations"]):
            field = f"conversations[{t}]"
            if (not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in ROLE_MAP
                    or not isinstance(turn.get("value"), str)):     # (a list/dict 'from' is unhashable)
                raise DataError("bad_record", rid, field, f"expected {{'from': one of {sorted(ROLE_MAP)}, 'value': str}}")
            role = ROLE_MAP[turn["from"]]
            parts = turn["value"].split(IMAGE_TOKEN)
            for j, part in enumerate(parts):
                if j:
                    segs.append(image_segment(_resolve(images[k], self.root), role))
                    k += 1
                if part.strip():
                    segs.append(text_segment(part.strip(), role))
            if not turn["value"].replace(IMAGE_TOKEN, "").strip() and turn["value"].count(IMAGE_TOKEN) == 0:
                raise DataError("empty_text", rid, f"{field}.value", "empty turn")
        return Sample(sid, tuple(segs), "llava", meta={"record": rid})


class InterleavedSource:
    views = None

    def __init__(self, path: str | Path, image_root: Optional[str | Path] = None):
        self.path = Path(path)
        self.lines = _Lines(self.path)
        self.root = Path(image_root) if image_root else self.path.parent
        self._repeated = _repeated(self.lines.ids())     # as LlavaSource: ids key the teacher caches

    def __len__(self) -> int:
        return len(self.lines)

    def fingerprint(self) -> str:
        st = self.path.stat()
        return f"interleaved:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.root}"

    def __getitem__(self, i: int) -> Sample:
        rec = self.lines.record(i)
        obj = self.lines.json(i)
        texts, images = obj.get("texts"), obj.get("images")
        if not isinstance(texts, list) or not isinstance(images, list):
            raise DataError("bad_record", rec, "texts/images", "a document needs 'texts' and 'images' lists")
        holes = [j for j, t in enumerate(texts) if t is None]
        aligned = len(images) == len(texts) and all((t is None) == (im is not None) for t, im in zip(texts, images))
        paths = [im for im in images if im is not None] if aligned else images
        if len(paths) != len(holes):
            raise DataError("image_count_mismatch", rec, "images",
                            f"{len(holes)} null entries in 'texts' (image slots) but {len(paths)} images")
        segs, k = [], 0
        for j, t in enumerate(texts):
            if t is None:
                if not isinstance(paths[k], str):    # named by its index in 'images' (aligned: j, compact: k)
                    raise DataError("bad_record", rec, f"images[{j if aligned else k}]",
                                    f"expected a path string, got {paths[k]!r}")
                segs.append(image_segment(_resolve(paths[k], self.root)))
                k += 1
            elif isinstance(t, str):
                segs.append(text_segment(t))
            else:
                raise DataError("bad_record", rec, f"texts[{j}]", f"expected a string or null, got {type(t).__name__}")
        key = str(obj.get("id", i))
        sid = f"interleaved:{key}#{i}" if key in self._repeated else f"interleaved:{key}"
        return Sample(sid, tuple(segs), "interleaved", meta={"record": rec})


class PairsSource(_PairTaskMixin):
    def __init__(self, path: str | Path, image_root: Optional[str | Path] = None, task: str = "pair"):
        if task not in PAIR_TASKS:
            raise ValueError(f"pairs task {task!r}: expected one of {PAIR_TASKS}")
        self.path, self.task = Path(path), task
        self.lines = _Lines(self.path)
        self.root = Path(image_root) if image_root else self.path.parent
        self.tsv = self.path.suffix.lower() in (".tsv", ".txt")
        self.header = self.tsv and len(self.lines) and self.lines.raw(0).lower().startswith(b"image\t")
        # a caption file often gives every caption of an image the image's id (COCO: five each); ids
        # key the teacher caches, so a repeated id gets the record index, as in LlavaSource
        self._repeated = set() if self.tsv else _repeated(self.lines.ids())

    def __len__(self) -> int:
        return len(self.lines) - int(bool(self.header))

    def fingerprint(self) -> str:
        st = self.path.stat()
        return f"pairs:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.root}:{self.task}"

    def __getitem__(self, i: int):
        j = i + int(bool(self.header))
        rec = self.lines.record(j)
        if self.tsv:
            line = decode_text(self.lines.raw(j), rec, "line")
            cols = line.split("\t")
            if len(cols) < 2:
                raise DataError("bad_record", rec, "line", "expected 'image_path<TAB>caption'")
            rid, path, caption = str(i), cols[0], "\t".join(cols[1:])
        else:
            obj = self.lines.json(j)
            path, caption = obj.get("image"), obj.get("caption", obj.get("text"))
            rid = str(obj.get("id", i))
            rid = f"{rid}#{i}" if rid in self._repeated else rid
            if not isinstance(path, str) or not isinstance(caption, str):
                raise DataError("bad_record", rec, "image/caption", "a pair needs string 'image' and 'caption' fields")
        return pair_task(f"pairs:{rid}", "pairs", _resolve(path, self.root), caption, self.task, {"record": rec})


# ---- Fashion-MNIST ----------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
FASHION_TEMPLATES = ("a photo of {a} {c}", "a black and white photo of {a} {c}", "a small picture of {a} {c}",
                     "a grayscale image of {a} {c}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not) as a ``uint8`` array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file has {body.size}")
    return body.reshape(dims)


class FashionMNISTSource(_PairTaskMixin):
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k) images (``uint8[28, 28, 1]``) with
    captions from ``FASHION_TEMPLATES`` (template ``i % 4`` for record ``i``)."""

    def __init__(self, root: str | Path = FASHION_MNIST_DIR, split: str = "train", task: str = "pair"):
        self.root, self.split, self.task = Path(root), split, task
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"fashion_mnist split {split!r}: expected 'train' or 'test'")
        self.files = [self._find(f"{prefix}-images-idx3-ubyte"), self._find(f"{prefix}-labels-idx1-ubyte")]
        self._images = self._labels = None

    def _find(self, stem: str) -> Path:
        for p in (self.root / f"{stem}.gz", self.root / stem):
            if p.exists():
                return p
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {self.root}/{stem}[.gz] is missing. Install it with "
            "`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; files land in "
            f"{FASHION_MNIST_DIR}) or point data.path at a folder with the IDX files")

    def _load(self):
        self._images, self._labels = read_idx(self.files[0]), read_idx(self.files[1])
        if self._images.ndim != 3 or len(self._images) != len(self._labels):
            raise ValueError(f"{self.files}: images {self._images.shape} and labels {self._labels.shape} do not match")

    def __len__(self) -> int:
        if self._labels is None:
            self._load()
        return len(self._labels)

    def fingerprint(self) -> str:
        return f"fashion_mnist:{self.root.resolve()}:{self.split}:{self.task}:" + ":".join(
            str(f.stat().st_size) for f in self.files)

    def label(self, i: int) -> int:
        if self._labels is None:
            self._load()
        return int(self._labels[i])

    def __getitem__(self, i: int):
        if self._images is None:
            self._load()
        c = FASHION_CLASSES[self.label(i)]
        caption = FASHION_TEMPLATES[i % len(FASHION_TEMPLATES)].format(a="an" if c[0] in "aeiou" else "a", c=c)
        return pair_task(f"fashion_mnist:{self.split}:{i}", "fashion_mnist", self._images[i][..., None], caption,
                         self.task, {"label": self.label(i), "class": c})

    def __getstate__(self):
        return {**self.__dict__, "_images": None, "_labels": None}


__all__ = [
    "PAIR_TASKS", "pair_task", "LlavaSource", "InterleavedSource", "PairsSource", "FASHION_MNIST_DIR",
    "FASHION_CLASSES", "FASHION_TEMPLATES", "read_idx", "FashionMNISTSource",
]
