"""Hugging Face safetensors directories <-> our Flax NNX models.

    model = load_pretrained("path/to/hf_dir")              # config.json + *.safetensors
    model = load_pretrained("dir", gguf_file="x.gguf")     # GGUF, dequantised by transformers
    model = load_pretrained("dir", mesh=mesh)              # each tensor placed in its shard
    save_pretrained(model, "out_dir")                      # config.json + model.safetensors

Each model family registers a ``Family`` (in ``mllm_jax/convert/families/…``): how to build
our config from HF's, how to build the model, and a table of ``Entry`` rows mapping each of
our parameter paths to an HF tensor name with a layout transform. Loading never guesses: any
missing, unexpected or mis-shaped tensor is collected and reported in one error that names
every one of them. Save -> load is bit-identical (float32 in, float32 out; transposes are exact).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx


class CheckpointMismatchError(ValueError):
    """The checkpoint does not match the model: lists every missing/unexpected/mis-shaped tensor."""


# ---- layout transforms (HF/torch layout <-> ours) ----------------------------------------------

def _copy(x):
    return x


def _t(x):
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def _conv_to_ours(x):  # torch OIHW -> HWIO
    return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))


def _conv_to_hf(x):  # HWIO -> OIHW
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    # kind: (hf -> ours, ours -> hf)
    "copy": (_copy, _copy),
    "linear": (_t, _t),        # torch Linear weight [out, in] <-> our kernel [in, out]
    "conv": (_conv_to_ours, _conv_to_hf),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: our dotted param path <-> HF name, with a layout ``kind`` (see TRANSFORMS),
    or explicit ``to_ours``/``to_hf`` callables (e.g. reshapes)."""
    ours: str
    hf: str
    kind: str = "copy"
    to_ours: Optional[Callable] = None
    to_hf: Optional[Callable] = None

    def load(self, x):
        return (self.to_ours or TRANSFORMS[self.kind][0])(x)

    def save(self, x):
        return (self.to_hf or TRANSFORMS[self.kind][1])(x)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF architecture maps onto one of our models."""
    name: str
    architectures: tuple[str, ...]          # HF "architectures" values it accepts
    model_types: tuple[str, ...]            # HF "model_type" values it accepts
    config_from_hf: Callable[[dict, set], Any]   # (hf config dict, tensor names) -> our config
    config_to_hf: Callable[[Any], dict]
    build: Callable[[Any, nnx.Rngs], nnx.Module]  # (our config, rngs) -> model
    entries: Callable[[Any], list[Entry]]         # our config -> table
    ignore: tuple[str, ...] = ()            # regexes of HF tensors that are fine to skip
    hf_prefixes: tuple[str, ...] = ()       # optional prefixes some checkpoints carry (e.g. "bert.")
    hf_rename: Optional[Callable[[str], str]] = None  # other naming schemes -> the table's names
    local_params: tuple[str, ...] = ()      # regexes of our params with no HF counterpart: not
                                            # exported, left at their init on load (e.g. soft prompts)
    # optional: our config updated from the folder's preprocessor_config.json, (cfg, dict, file) -> cfg,
    # and the preprocessor_config.json save_pretrained writes for a config (vision towers that use one)
    preprocessor_from_hf: Optional[Callable[[Any, dict, str], Any]] = None
    preprocessor_to_hf: Optional[Callable[[Any], dict]] = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def _ensure_registered():
    # importing the family modules registers them
    from mllm_jax.convert import families  # noqa: F401


def find_family(hf_config: dict) -> Family:
    _ensure_registered()
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    mt = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    known = sorted({a for f in FAMILIES.values() for a in f.architectures})
    raise ValueError(f"no converter for architectures={archs} model_type={mt!r}; supported: {known}")


def family_of_model(model: nnx.Module) -> Family:
    """The family named by the model's ``hf_family`` class attribute (e.g. ``"llama"``)."""
    _ensure_registered()
    name = getattr(model, "hf_family", None)
    if name in FAMILIES:
        return FAMILIES[name]
    raise ValueError(f"{type(model).__name__}.hf_family={name!r} names no registered converter "
                     f"({sorted(FAMILIES)})")


# ---- safetensors IO ----------------------------------------------------------------------------

def read_json(file: Path) -> dict:
    """A JSON file of a checkpoint folder; unparseable JSON is a ``ConfigError`` naming the file."""
    from mllm_jax.config import ConfigError
    try:
        return json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None


def read_safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' (tensor name -> file) object")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            out.update(load_file(str(path / f)))
        except Exception as e:
            raise ValueError(f"{path / f}: cannot read safetensors file: {e}") from e
    return out


def write_safetensors(tensors: dict[str, np.ndarray], file: Path, metadata: dict | None = None) -> None:
    """Writes atomically (temp file + rename)."""
    from safetensors.numpy import save_file
    tmp = file.with_suffix(file.suffix + ".tmp")
    # np.ascontiguousarray makes a 0-d array 1-d; the reshape keeps scalars (CLIP's logit_scale) 0-d
    save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, str(tmp),
              metadata=metadata or {"format": "pt"})
    tmp.replace(file)


# ---- state <-> flat dict -----------------------------------------------------------------------

def _path_str(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def flat_params(model_or_state) -> dict[str, Any]:
    """``{dotted_path: value}`` of every Variable (arrays or ShapeDtypeStructs)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[".".join(str(p) for p in path)] = var.get_value() if isinstance(var, nnx.Variable) else var
    return out


def load_tensors_into(abstract_model: nnx.Module, family: Family, cfg, tensors: dict[str, np.ndarray],
                      *, source: str, mesh=None, rules=None) -> nnx.Module:
    """Fills an abstract model from HF tensors. Raises ``CheckpointMismatchError`` listing all problems."""
    graphdef, state = nnx.split(abstract_model)
    ours = flat_params(state)
    entries = family.entries(cfg)
    by_hf = {}
    for name in tensors:
        n = name
        for pre in family.hf_prefixes:
            if n.startswith(pre):
                n = n[len(pre):]
                break
        if family.hf_rename is not None:
            n = family.hf_rename(n)
        by_hf[n] = name
    missing, misshaped, unknown_ours = [], [], []
    values: dict[str, np.ndarray] = {}
    used = set()
    for e in entries:
        if e.ours not in ours:
            unknown_ours.append(e.ours)
            continue
        if e.hf not in by_hf:
            missing.append(f"{e.hf} (for {e.ours}, shape {tuple(ours[e.ours].shape)})")
            continue
        used.add(e.hf)
        want = tuple(ours[e.ours].shape)
        try:
            x = e.load(np.asarray(tensors[by_hf[e.hf]]))
        except (ValueError, IndexError) as err:   # e.g. a 1-D tensor where a transpose needs 2 axes
            misshaped.append(f"{e.hf}: shape {tuple(tensors[by_hf[e.hf]].shape)} cannot be laid out as "
                             f"{e.ours} ({want}): {err}")
            continue
        if tuple(x.shape) != want:
            misshaped.append(f"{e.hf}: shape {tuple(tensors[by_hf[e.hf]].shape)} -> {tuple(x.shape)} "
                             f"but {e.ours} needs {want}")
            continue
        values[e.ours] = x
    mapped = {e.ours for e in entries}
    local = [re.compile(r) for r in family.local_params]
    uncovered = [p for p in ours if p not in mapped and not any(r.search(p) for r in local)]
    ignore = [re.compile(r) for r in family.ignore]
    unexpected = [n for n in by_hf if n not in used and not any(r.search(n) for r in ignore)]
    if unknown_ours:
        raise RuntimeError(f"converter {family.name}: table names params the model lacks: {unknown_ours}")
    if uncovered:
        raise RuntimeError(f"converter {family.name}: model params without a table entry: {uncovered}")
    if missing or misshaped or unexpected:
        lines = [f"{source}: checkpoint does not match {family.name} "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped)"]
        lines += [f"  missing:     {m}" for m in missing]
        lines += [f"  unexpected:  {u} {tuple(tensors[by_hf[u]].shape)}" for u in sorted(unexpected)]
        lines += [f"  mis-shaped:  {m}" for m in misshaped]
        raise CheckpointMismatchError("\n".join(lines))

    shardings = None
    if mesh is not None:
        from mllm_jax import sharding as S
        shardings = flat_params(S.state_shardings(state, mesh, *(rules,) if rules else ()))

    def fill(path, var):
        key = _path_str(path)
        if key not in values:
            return var
        want_dtype = var.get_value().dtype if isinstance(var, nnx.Variable) else np.float32
        arr = values[key].astype(want_dtype, copy=False)
        arr = jax.device_put(arr, shardings[key]) if shardings else jax.numpy.asarray(arr)
        return var.replace(arr) if isinstance(var, nnx.Variable) else arr

    state = jax.tree.map_with_path(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def build_abstract(family: Family, cfg) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0)))


def load_pretrained(path: str | Path, *, gguf_file: Optional[str] = None, mesh=None, rules=None,
                    config_overrides: Optional[dict] = None) -> nnx.Module:
    """Loads an HF model dir (config.json + safetensors) or a GGUF file into our model.

    Families that read one (DINOv2, CLIP vision towers, CLIPModel) also take the image
    preprocessing (input size, shortest-edge resize + centre crop, resample, mean / std) from
    the folder's ``preprocessor_config.json`` (``convert/families/_preprocess.py``). ``config_overrides`` replace fields of our config (e.g.
    ``{"dtype": "bfloat16"}``).
    """
    path = Path(path)
    if gguf_file is not None:
        hf_cfg, tensors = read_gguf(path / gguf_file if not Path(gguf_file).is_absolute() else Path(gguf_file))
        source = str(path / gguf_file)
    else:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file}: not found (expected a Hugging Face model directory)")
        hf_cfg = read_json(cfg_file)
        tensors = read_safetensors_dir(path)
        source = str(path)
    from mllm_jax.config import ConfigError
    named = path / "config.json" if gguf_file is None else source   # what config errors name
    try:
        family = find_family(hf_cfg)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    try:
        cfg = family.config_from_hf(hf_cfg, set(tensors))
    except ConfigError as e:   # name the file: the message names the field
        raise ConfigError(f"{named}: {e}") from None
    except KeyError as e:      # a key the config cannot do without (e.g. a LLaVA's vision_config)
        raise ConfigError(f"{named}: required key {e} "
                          "is missing") from None
    pre = path / "preprocessor_config.json"
    if gguf_file is None and family.preprocessor_from_hf is not None and pre.exists():
        cfg = family.preprocessor_from_hf(cfg, read_json(pre), str(pre))
    if config_overrides:
        cfg = dataclasses.replace(cfg, **config_overrides)
    try:
        model = build_abstract(family, cfg)
    except ValueError as e:    # a value the config passed but the model cannot build (an unknown hidden_act)
        raise ConfigError(f"{named}: {e}") from None
    return load_tensors_into(model, family, cfg, tensors, source=source, mesh=mesh, rules=rules)


def export_tensors(model: nnx.Module) -> tuple[Family, dict, dict[str, np.ndarray]]:
    """(family, HF config dict, HF tensors) for a model; LoRA adapters must be merged first."""
    fam = family_of_model(model)
    cfg = model.config
    flat = flat_params(model)
    lora = [k for k in flat if ".lora." in k]
    if lora:
        raise ValueError(f"model has LoRA adapters ({lora[:3]}...): call merge_lora(model, remove=True) "
                         "before save_pretrained")
    tensors = {e.hf: e.save(np.asarray(jax.device_get(flat[e.ours]))) for e in fam.entries(cfg)}
    dropped = [k for k in flat if any(re.search(r, k) for r in fam.local_params)]
    if dropped:
        import logging
        logging.getLogger(__name__).warning("save_pretrained: %d params have no %s counterpart and are not "
                                            "exported: %s", len(dropped), fam.name, dropped[:6])
    return fam, fam.config_to_hf(cfg), tensors


def save_pretrained(model: nnx.Module, path: str | Path) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` (float32, atomic) that transformers loads,
    and ``preprocessor_config.json`` for families that read one (DINOv2, CLIP)."""
    path = Path(path)
    fam, hf_cfg, tensors = export_tensors(model)     # first: a model it refuses leaves no empty folder
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg = {**hf_cfg, "torch_dtype": "float32"}
    write_safetensors(tensors, path / "model.safetensors")
    files = {"config.json": hf_cfg}
    if fam.preprocessor_to_hf is not None:
        files["preprocessor_config.json"] = fam.preprocessor_to_hf(model.config)
    for name, content in files.items():
        tmp = path / f"{name}.tmp"
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
        tmp.replace(path / name)
    return path


def read_gguf(file: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, HF-named float32 tensors) from a GGUF file, dequantised by transformers'
    loader (which also undoes the Meta RoPE permutation of q/k). Implemented by the llama family."""
    from mllm_jax.convert.gguf import read_gguf as _read
    return _read(file)


__all__ = [
    "CheckpointMismatchError", "Entry", "Family", "register", "find_family", "load_pretrained",
    "save_pretrained", "export_tensors", "read_json", "read_safetensors_dir", "write_safetensors",
    "flat_params", "load_tensors_into", "build_abstract", "read_gguf", "TRANSFORMS",
]
