"""A vision tower's ``preprocessor_config.json`` (transformers' ``CLIPImageProcessor`` /
``BitImageProcessor``) <-> the ``VisionConfig`` fields ``ImageSpec`` reads: ``image_size``,
``resize_shortest_edge``, ``resample``, ``image_mean`` / ``image_std``.

Keys a file leaves out take the processor's class defaults in transformers 5.x (``defaults``):
``CLIP_DEFAULTS`` (CLIPImageProcessor and BitImageProcessor have the same ones): ``do_resize``
true, ``size {"shortest_edge": 224}``, ``resample`` 3 (bicubic), ``do_center_crop`` true,
``crop_size`` 224, ``do_rescale`` true with 1/255, ``do_normalize`` true with OpenAI CLIP's
mean / std; ``SIGLIP_DEFAULTS`` (SiglipImageProcessor): ``size {"height": 224, "width": 224}``,
bicubic, no centre crop, mean / std 0.5. An int ``size`` is a shortest edge
(``default_to_square=False``), an int ``crop_size`` a square.

What ``ImageSpec`` can reproduce exactly is read:

* ``size {"shortest_edge": n}`` + ``do_center_crop`` -> ``resize_shortest_edge=n``,
  ``image_size`` = the crop's side;
* ``size {"height": s, "width": s}`` without centre crop (or with a crop of the same side) ->
  the stretch to ``image_size=s`` (``resize_shortest_edge=None``);
* ``resample`` 2 (bilinear) or 3 (bicubic).

The rest is refused naming the file and the key: non-square sizes or crops, a shortest edge
without a crop (non-square inputs), ``longest_edge``, a stretch followed by a smaller crop,
``do_resize: false``, other filters, ``do_rescale: false`` or another ``rescale_factor``.
``do_normalize: false`` gives a zero mean and unit std (the processor then feeds ``x / 255``).

``vision_to_hf`` writes the file that describes a config's ``ImageSpec`` (save -> load keeps
the config, and transformers' processor then prepares images as ``ImageSpec`` does).
"""
from __future__ import annotations

import dataclasses
import math

from mllm_jax.config import ConfigError, VisionConfig
from mllm_jax.config.model import RESAMPLE_CODES

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
CLIP_DEFAULTS = {"size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True, "crop_size": 224,
                 "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
SIGLIP_DEFAULTS = {"size": {"height": 224, "width": 224}, "resample": 3, "do_center_crop": False, "crop_size": None,
                   "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD}
# a ViT variant's image processor in transformers: (its class defaults, its class name)
PROCESSORS = {"clip": (CLIP_DEFAULTS, "CLIPImageProcessor"), "siglip": (SIGLIP_DEFAULTS, "SiglipImageProcessor")}
_FILTERS = {code: name for name, code in RESAMPLE_CODES.items()}
_PIL_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _square(value, where: str) -> int:
    """A crop size (or a ``{"height", "width"}`` resize size): an int, or equal sides."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, dict) and value.get("height") is not None and value.get("width") is not None:
        if value["height"] != value["width"]:
            raise ConfigError(f"{where}={value} is not square; only square inputs are supported")
        return int(value["height"])
    raise ConfigError(f"{where}={value}: expected an int or {{'height': n, 'width': n}} (a square)")


def _resize_size(value, where: str) -> tuple[str, int]:
    """``size`` -> ("shortest", n) or ("stretch", s)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "shortest", int(value)          # transformers: default_to_square=False
    if isinstance(value, dict):
        if value.get("longest_edge") is not None:
            raise ConfigError(f"{where}={value}: 'longest_edge' is not supported (only a shortest edge, "
                              "or a square {'height': n, 'width': n})")
        if value.get("shortest_edge") is not None:
            return "shortest", int(value["shortest_edge"])
        return "stretch", _square(value, where)
    raise ConfigError(f"{where}={value}: expected {{'shortest_edge': n}}, {{'height': n, 'width': n}} or an int")


def vision_from_hf(cfg: VisionConfig, pp: dict, source: str, *, resizable_table: bool,
                   defaults: dict = CLIP_DEFAULTS) -> VisionConfig:
    """``cfg`` with the preprocessing of a ``preprocessor_config.json`` (keys it leaves out from
    ``defaults``, the processor class's). ``resizable_table`` (DINOv2): the input side may differ
    from the position table's (then ``position_image_size`` keeps the table's); otherwise (CLIP,
    SigLIP) it must be ``cfg.image_size``."""
    pp = {**defaults, **{k: v for k, v in pp.items() if v is not None}}
    if not pp.get("do_resize", True):
        raise ConfigError(f"{source}: do_resize=false is not supported (images of any size are resized "
                          "to the tower's input)")
    kind, n = _resize_size(pp["size"], f"{source}: size")
    if pp["do_center_crop"]:
        side = _square(pp["crop_size"], f"{source}: crop_size")
        if kind == "stretch" and side != n:
            raise ConfigError(f"{source}: size={pp.get('size')} (a stretch to {n} px) followed by a "
                              f"{side}-px centre crop is not supported (a shortest_edge resize is, or a stretch "
                              "without crop)")
    elif kind == "shortest":
        raise ConfigError(f"{source}: size={pp.get('size')} with do_center_crop=false gives non-square inputs, "
                          "which are not supported")
    else:
        side = n
    code = pp["resample"]
    if code not in _FILTERS:
        raise ConfigError(f"{source}: resample={code!r} ({_PIL_NAMES.get(code, 'unknown')}) is not supported; "
                          f"expected one of {sorted(_FILTERS)} ({', '.join(_FILTERS[c] for c in sorted(_FILTERS))})")
    if side % cfg.patch_size:
        raise ConfigError(f"{source}: an input side of {side} px is not a multiple of patch_size={cfg.patch_size}")
    table = cfg.position_image_size or cfg.image_size
    if not resizable_table and side != table:
        raise ConfigError(f"{source}: an input side of {side} px differs from the tower's image_size={table} "
                          "(its position table is not interpolated)")
    # ImageSpec always scales by 1/255 (do_rescale with transformers' default factor); another
    # scaling would feed the tower other values than transformers' processor does
    factor = pp.get("rescale_factor", 1 / 255)
    if not pp.get("do_rescale", True) or not math.isclose(float(factor), 1 / 255, rel_tol=1e-6):
        raise ConfigError(f"{source}: do_rescale={pp.get('do_rescale', True)}, rescale_factor={factor} is not "
                          "supported; images are always scaled by 1/255 (do_rescale: true, rescale_factor: 1/255)")
    kw = dict(image_size=side, resize_shortest_edge=n if kind == "shortest" else None, resample=_FILTERS[code])
    if resizable_table:
        kw["position_image_size"] = None if side == table else table
    c = cfg.num_channels
    if not pp.get("do_normalize", True):      # transformers' processor then leaves x / 255 as it is
        return dataclasses.replace(cfg, **kw, image_mean=(0.0,) * c, image_std=(1.0,) * c)
    for key in ("image_mean", "image_std"):
        v = pp[key]
        v = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * c))
        if len(v) != c:
            raise ConfigError(f"{source}: {key}={list(v)} has {len(v)} values for {c} channels")
        kw[key] = v
    return dataclasses.replace(cfg, **kw)


def vision_to_hf(cfg: VisionConfig, processor: str) -> dict:
    """The ``preprocessor_config.json`` (``processor``: "CLIPImageProcessor" or
    "BitImageProcessor") that prepares images as ``ImageSpec`` does for ``cfg``."""
    s = cfg.image_size
    square = {"height": s, "width": s}
    if cfg.resize_shortest_edge is None:
        size, crop = square, False
    else:
        size, crop = {"shortest_edge": cfg.resize_shortest_edge}, True
    return {"image_processor_type": processor, "do_resize": True, "size": size,
            "resample": RESAMPLE_CODES[cfg.resample], "do_center_crop": crop, "crop_size": square,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std), "do_convert_rgb": True}
