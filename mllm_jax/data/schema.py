"""Samples: ordered text/image segments with targets and metadata, and their validation.

A ``Sample`` is what every source produces (the scene world, the file readers) and what the
tokeniser consumes:

    Sample(id="scene/train/vqa/17", source="scene",
           segments=(Segment("image", image=uint8[32, 32, 3], role="user"),
                     Segment("text", text="What color is the circle?", role="user"),
                     Segment("text", text="red", role="assistant")))

* Segments are in reading order; each one is one *slice* in Sugar's sense (an image, or a span
  of text), so per-slice teacher features line up with ``sample.segments``.
* ``role`` is ``None`` for a plain document (captions, interleaved web pages: rendered as is)
  or ``"system" | "user" | "assistant"`` for a conversation (rendered with the chat template).
  The *targets* of a conversation are its assistant segments: the loss covers only them.
* ``scene`` (optional) is the structure a segment shows or describes (a scene graph for the
  synthetic world), used by the scene-graph teacher and by evaluation oracles.

Bad input is reported with ``DataError``, which carries a machine-readable ``reason`` (one of
``REASONS``) so that the pipeline can skip and count by reason, and a message that names the
record and field and says what to do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

# Why a record was rejected. The pipeline counts skips per reason (in this order).
REASONS = (
    "corrupt_image",        # an image file that cannot be decoded
    "missing_image",        # an image path that does not exist
    "image_count_mismatch", # more or fewer images than <image> slots / null texts
    "empty_text",           # a text segment that is empty or only whitespace
    "too_long",             # more tokens than the largest sequence bucket
    "too_many_images",      # more images than DataConfig.max_images
    "too_many_slices",      # more segments than DataConfig.max_slices
    "invalid_utf8",         # text bytes that are not UTF-8
    "bad_pixels",           # NaN/inf or out-of-range pixel values, wrong shape
    "bad_record",           # malformed record (missing field, wrong type)
)

ROLES = (None, "system", "user", "assistant")
ImageLike = Union[np.ndarray, str, Path]


class DataError(ValueError):
    """A record cannot be used. ``reason`` is one of ``REASONS``; ``record`` names it."""

    def __init__(self, reason: str, record: str, field: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}; expected one of {REASONS}")
        self.reason, self.record, self.field, self.detail = reason, record, field, message
        super().__init__(f"[{reason}] record {record}, {field}: {message}")

    def __reduce__(self):          # picklable, so grain worker processes can pass it back
        return DataError, (self.reason, self.record, self.field, self.detail)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One slice of a sample: ``kind="text"`` with ``text``, or ``kind="image"`` with ``image``
    (``uint8[H, W, C]`` / ``float[H, W, C]`` in [0, 1], or a path decoded lazily)."""
    kind: str
    text: Optional[str] = None
    image: Optional[ImageLike] = None
    role: Optional[str] = None
    scene: Any = None                      # structure shown/described (synthetic.Scene or None)

    @property
    def is_image(self) -> bool:
        return self.kind == "image"


@dataclasses.dataclass(frozen=True)
class Sample:
    """An ordered list of segments plus metadata. ``meta`` holds task fields (e.g. the short
    answer of a VQA question, a POPE label) that evaluation reads."""
    id: str
    segments: tuple[Segment, ...]
    source: str = ""
    scene: Any = None                      # scene graph of the whole sample when known
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return any(s.role is not None for s in self.segments)

    @property
    def targets(self) -> list[str]:
        """Texts the loss is on: assistant turns of a conversation (empty for documents)."""
        return [s.text for s in self.segments if s.role == "assistant" and s.kind == "text"]

    @property
    def num_images(self) -> int:
        return sum(s.is_image for s in self.segments)

    def prompt_only(self) -> "Sample":
        """The sample without its trailing assistant turn (the prompt used for generation)."""
        segs = list(self.segments)
        while segs and segs[-1].role == "assistant":
            segs.pop()
        return dataclasses.replace(self, segments=tuple(segs))


def text_segment(text: str, role: Optional[str] = None, scene: Any = None) -> Segment:
    return Segment("text", text=text, role=role, scene=scene)


def image_segment(image: ImageLike, role: Optional[str] = None, scene: Any = None) -> Segment:
    return Segment("image", image=image, role=role, scene=scene)


# ---- validation --------------------------------------------------------------------------------

def decode_text(raw: bytes | str, record: str, field: str) -> str:
    """UTF-8 text from bytes; ``DataError('invalid_utf8')`` naming the byte offset otherwise."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("invalid_utf8", record, field,
                        f"bytes {e.start}..{e.end} are not valid UTF-8 ({e.reason}); "
                        "re-encode the file as UTF-8") from None


def load_image(image: ImageLike, record: str, field: str) -> np.ndarray:
    """Decodes a path (PNG/JPEG/... via PIL, or ``.npy``) or checks an array; returns
    ``uint8[H, W, C]`` (C = 1 or 3; float input in [0, 1] is scaled to 0..255)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise DataError("missing_image", record, field,
                            f"image file {path} does not exist; check the image root/folder")
        try:
            if path.suffix == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                from PIL import Image
                with Image.open(path) as im:
                    im.load()
                    arr = _pil_pixels(im)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for truncated/corrupt files
            raise DataError("corrupt_image", record, field,
                            f"cannot decode {path}: {type(e).__name__}: {e}; "
                            "the file is truncated or not an image") from None
        return check_pixels(arr, record, f"{field} ({path.name})")
    if isinstance(image, (bytes, bytearray)):
        try:
            from PIL import Image
            with Image.open(io.BytesIO(image)) as im:
                arr = _pil_pixels(im)
        except Exception as e:
            raise DataError("corrupt_image", record, field, f"cannot decode image bytes: {e}") from None
        return check_pixels(arr, record, field)
    return check_pixels(np.asarray(image), record, field)


def _pil_pixels(im) -> np.ndarray:
    """8-bit L or RGB pixels of a PIL image (float mode F: the float values, which
    ``check_pixels`` wants in [0, 1]; convert("RGB") clipped them). 16-bit grayscale (modes I;16*, or I holding 16-bit
    values, as PIL opens 16-bit PNGs) keeps its high byte: PIL's convert("RGB") clips those values
    at 255, which turned almost every pixel white."""
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode.startswith("I"):
        arr = np.asarray(im).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"{im.mode} pixel values outside 0..65535")
        return (arr >> 8).astype(np.uint8) if im.mode.startswith("I;16") or arr.max() > 255 else arr.astype(np.uint8)
    if im.mode == "F":      # 32-bit float (e.g. TIFF): checked as float arrays are, in [0, 1]
        return np.asarray(im, np.float32)
    return np.asarray(im.convert("RGB"))


def check_pixels(arr: np.ndarray, record: str, field: str) -> np.ndarray:
    """``uint8[H, W, C]`` from an array: ``uint8`` as is, floats must be finite and in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise DataError("bad_pixels", record, field,
                        f"image array has shape {arr.shape}; expected [H, W, C] with C in (1, 3)")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError("bad_pixels", record, field,
                            f"image has {int((~np.isfinite(arr)).sum())} NaN/inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError("bad_pixels", record, field,
                            f"float image values span [{lo:.3g}, {hi:.3g}]; expected [0, 1]")
        return np.round(arr * 255.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError("bad_pixels", record, field,
                            f"integer image values span [{lo}, {hi}]; expected [0, 255]")
        return arr.astype(np.uint8)
    raise DataError("bad_pixels", record, field, f"image dtype {arr.dtype} is not numeric")


def validate_sample(sample: Sample) -> Sample:
    """Checks structure and decodes every image; returns the sample with ``uint8`` images.
    Raises ``DataError`` naming the sample id and segment."""
    if not isinstance(sample.id, str) or not sample.id:
        raise DataError("bad_record", repr(sample.id), "id", "sample id must be a non-empty string")
    if not sample.segments:
        raise DataError("bad_record", sample.id, "segments", "sample has no segments")
    chat = sample.is_chat
    out = []
    for k, seg in enumerate(sample.segments):
        field = f"segments[{k}]"
        if seg.role not in ROLES:
            raise DataError("bad_record", sample.id, f"{field}.role",
                            f"role {seg.role!r}; expected one of {ROLES}")
        if chat and seg.role is None:
            raise DataError("bad_record", sample.id, f"{field}.role",
                            "a conversation needs a role on every segment (system/user/assistant)")
        if seg.kind == "text":
            text = seg.text
            if isinstance(text, (bytes, bytearray)):
                text = decode_text(bytes(text), sample.id, f"{field}.text")
                seg = dataclasses.replace(seg, text=text)
            if not isinstance(text, str):
                raise DataError("bad_record", sample.id, f"{field}.text", f"expected a string, got {type(text).__name__}")
            try:                # lone surrogates (JSON "\ud800" escapes) decode but cannot be encoded/tokenised
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError("invalid_utf8", sample.id, f"{field}.text",
                                f"characters {e.start}..{e.end} are lone UTF-16 surrogates (e.g. a JSON "
                                "\\ud800 escape), not text; fix or remove them in the source") from None
            if not text.strip():
                raise DataError("empty_text", sample.id, f"{field}.text",
                                "text segment is empty; drop the segment or fix the source")
        elif seg.kind == "image":
            if seg.image is None:
                raise DataError("missing_image", sample.id, f"{field}.image", "image segment has no image")
            seg = dataclasses.replace(seg, image=load_image(seg.image, sample.id, f"{field}.image"))
        else:
            raise DataError("bad_record", sample.id, f"{field}.kind", f"kind {seg.kind!r}; expected 'text' or 'image'")
        out.append(seg)
    if chat and not any(s.role == "user" for s in out):
        raise DataError("bad_record", sample.id, "segments", "a conversation needs at least one user segment")
    return dataclasses.replace(sample, segments=tuple(out))


def content_hash(sample: Sample) -> str:
    """Hash of what a teacher sees (segment kinds, texts, decoded pixels): 16 hex chars."""
    h = hashlib.blake2b(digest_size=8)
    for seg in sample.segments:
        h.update(seg.kind.encode())
        if seg.kind == "text":
            h.update(seg.text.encode("utf-8", "surrogatepass"))
        else:
            img = np.ascontiguousarray(seg.image)
            h.update(str(img.shape).encode())
            h.update(img.tobytes())
        h.update(b"\x00")
    return h.hexdigest()


__all__ = [
    "REASONS", "ROLES", "DataError", "Segment", "Sample", "text_segment", "image_segment",
    "decode_text", "load_image", "check_pixels", "validate_sample", "content_hash",
]
