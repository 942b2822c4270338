"""From a ``DataConfig`` to a data source and its teacher feature providers."""
from __future__ import annotations

from pathlib import Path

from mllm_jax.config import ConfigError, DataConfig, MLLMConfig

SOURCES = ("scene", "llava", "interleaved", "pairs", "fashion_mnist")
TEACHERS = ("scene_graph", "pixel", "minilm", "vision", "clip")


def open_source(cfg: DataConfig):
    """The random-access source ``cfg.source`` names (see ``mllm_jax/data/formats.py``)."""
    from mllm_jax.data import formats
    if cfg.source == "scene":
        from mllm_jax.data.synthetic_sets import SceneSource
        return SceneSource(cfg.scene, cfg.split, cfg.task_weights(), soft_prompts=cfg.soft_prompts,
                           paired_views=cfg.paired_views)
    if cfg.source == "fashion_mnist":
        task = _pair_task(cfg)
        return formats.FashionMNISTSource(cfg.path or formats.FASHION_MNIST_DIR,
                                          "test" if cfg.split.startswith("test") else "train", task)
    if cfg.path is None:
        raise ConfigError(f"data.path is required for data.source={cfg.source!r}")
    if cfg.source == "llava":
        return formats.LlavaSource(cfg.path, cfg.image_root)
    if cfg.source == "interleaved":
        return formats.InterleavedSource(cfg.path, cfg.image_root)
    if cfg.source == "pairs":
        return formats.PairsSource(cfg.path, cfg.image_root, _pair_task(cfg))
    raise ConfigError(f"data.source: {cfg.source!r}; expected one of {SOURCES}")


def _pair_task(cfg: DataConfig) -> str:
    from mllm_jax.data.formats import PAIR_TASKS
    tasks = list(cfg.task_weights())
    task = tasks[0] if len(tasks) == 1 and tasks[0] in PAIR_TASKS else "pair"
    return task


def _teacher_folder(cfg: DataConfig, name: str, what: str, build: str) -> str:
    """``data.teacher_models[name]``, or a ConfigError saying what folder it needs."""
    path = cfg.teacher_models.get(name)
    if path is None:
        raise ConfigError(f"data.teachers: {name!r} needs data.teacher_models.{name}, a local Hugging Face {what}, "
                          f"or build teachers.{build} and pass it to make_iterator(teachers=[...])")
    return path


def make_teacher(name: str, cfg: DataConfig, model: MLLMConfig):
    from mllm_jax.data import teachers as T
    if name == "scene_graph":
        return T.SceneGraphTeacher()
    if name == "pixel":
        return T.PixelTeacher()
    if name == "minilm":
        import os
        d = cfg.teacher_models.get("minilm") or Path(os.environ.get("MLLM_JAX_ASSETS", "assets")) / "all-MiniLM-L6-v2"
        return T.MiniLMTeacher.from_pretrained(d)
    if name == "vision":
        path = _teacher_folder(cfg, "vision", "vision tower folder (CLIPVisionModel / SiglipVisionModel / "
                                              "Dinov2Model: config.json + safetensors)", "VisionTeacher(tower)")
        from mllm_jax.convert.hf import load_pretrained
        from mllm_jax.models.vision import VisionTower
        tower = load_pretrained(path)
        from mllm_jax.models.clip import ClipModel
        if isinstance(tower, ClipModel):      # a whole CLIPModel folder: its vision tower (pooled, unprojected)
            tower = tower.vision_model
        if not isinstance(tower, VisionTower):
            raise ConfigError(f"data.teacher_models.vision: {path} holds a {type(tower).__name__}, "
                              "not a vision tower (CLIPVisionModel / SiglipVisionModel / Dinov2Model)")
        return T.VisionTeacher(tower, Path(path).name)
    if name == "clip":
        path = _teacher_folder(cfg, "clip", "CLIPModel folder (config.json with vision_config + text_config + "
                                            "projection_dim, safetensors, tokenizer files)",
                               "ClipTeacher(model, tokenizer)")
        return T.ClipTeacher.from_pretrained(path)
    raise ConfigError(f"data.teachers: {name!r}; expected one of {TEACHERS}")


def open_teachers(cfg: DataConfig, model: MLLMConfig, source) -> list:
    """Feature providers for ``cfg.teachers``: the cheap ones (scene_graph, pixel) computed
    online; the others cached in ``cache_dir(cfg.teacher_cache, teacher, source)`` (built, or
    rebuilt when stale)."""
    from mllm_jax.data import teachers as T
    out = []
    for name in cfg.teachers:
        if name == "scene_graph" and cfg.source != "scene":
            raise ConfigError(f"data.teachers: 'scene_graph' needs scene graphs, which only data.source='scene' "
                              f"has (source is {cfg.source!r}); use 'pixel', 'minilm', 'vision' or 'clip'")
        teacher = make_teacher(name, cfg, model)
        if name in ("scene_graph", "pixel"):  # microseconds per sample: computed online, never cached
            out.append(T.OnlineFeatures(teacher))
        elif cfg.teacher_cache:
            out.append(_shared_cache(teacher, source, cache_dir(cfg.teacher_cache, teacher, source)))
        else:
            raise ConfigError(f"data.teachers: {name!r} needs data.teacher_cache (it is too slow to run per batch)")
    return out


def cache_dir(root, teacher, source) -> Path:
    """``root/<teacher name>/<digest of the source's and the teacher's fingerprints>``: one folder
    per source and teacher model, so that the eval pipeline (the same data config on split
    ``val``), another stream, or a run with another teacher model (``data.teacher_models``) never
    rebuilds the folder a training pipeline is reading (its index then pointed at the other
    rows: wrong features, or a missing sample in a worker)."""
    import hashlib
    fp = source.fingerprint() if hasattr(source, "fingerprint") else None
    if fp is None:
        return Path(root) / teacher.name / "no_fingerprint"
    key = f"{fp}|{teacher.fingerprint()}"
    return Path(root) / teacher.name / hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _shared_cache(teacher, source, path: Path):
    """Process 0 builds (or checks) the cache; the others wait for it, then open it read-only.
    If the build fails, every process raises (process 0 its error) instead of the others waiting
    for a cache that never comes."""
    import jax
    from mllm_jax.data import teachers as T
    from mllm_jax.train.distributed import any_process
    if jax.process_count() == 1:
        return T.ensure_cache(teacher, source, path)
    error = None
    if jax.process_index() == 0:
        try:
            T.ensure_cache(teacher, source, path)
        except Exception as e:  # re-raised below, once the others know
            error = e
    if any_process(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"{path}: process 0 failed to build the {getattr(teacher, 'name', '')} teacher cache "
                           "(its log has the error)")
    fp = source.fingerprint() if hasattr(source, "fingerprint") else None
    return T.TeacherCache(path, fingerprint=teacher.fingerprint(), source=fp)


__all__ = ["SOURCES", "TEACHERS", "open_source", "make_teacher", "open_teachers", "cache_dir"]
