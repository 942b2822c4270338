"""The CLIP teacher (images and texts in CLIP's one space) and the sentence pooling of the BERT
teacher, against transformers (torch, float32) on tiny random models saved here."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.config import ConfigError, DataConfig, MLLMConfig  # noqa: E402
from tests.tiny_hf import perturb  # noqa: E402
from mllm_jax.convert.hf import load_pretrained  # noqa: E402
from mllm_jax.data import sources  # noqa: E402
from mllm_jax.data import teachers as TC  # noqa: E402
from mllm_jax.data.schema import Sample, image_segment, text_segment, validate_sample  # noqa: E402

WORDS = "a the red blue green circle square cross is left of above small large".split()


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- CLIP ---------------------------------------------------------------------------------------

def _clip_tokenizer(d):
    """A CLIP BPE tokenizer over a tiny vocabulary: the special tokens first (so the end token,
    1, is not the highest id: pooling at the argmax would pick another position), every letter
    alone and word-final, and the words above as merges."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    merges = []
    for w in WORDS:                      # merge each word left to right into one token
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    tok.save_pretrained(str(d))
    return tok, len(vocab)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    tok, vocab_size = _clip_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=20)
    model = perturb(transformers.CLIPModel(cfg), seed=1)
    model.save_pretrained(str(d))
    return model, tok, d


def test_clip_teacher_embeds_images_and_texts_in_clips_space(clip_dir, tmp_path):
    """data.teachers=['clip'] with data.teacher_models.clip = a CLIPModel folder: an image segment
    gets CLIP's normalised get_image_features (on the teacher's preprocessed image), a text
    segment the normalised get_text_features of the folder's tokenizer's ids (a text longer than
    the 12 positions truncated with its end token kept); through the cache as well."""
    model, tok, d = clip_dir
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)                      # resized to 16
    texts = ["a red circle", "the small blue square is left of a large green cross above"]
    sample = Sample("s0", (image_segment(img), text_segment(texts[0]), text_segment(texts[1])))
    cfg = DataConfig(teachers=("clip",), teacher_models={"clip": str(d)}, teacher_cache=str(tmp_path / "cache"))
    teacher = sources.make_teacher("clip", cfg, MLLMConfig())
    assert isinstance(teacher, TC.ClipTeacher) and teacher.dim == 20 and teacher.max_length == 12
    assert teacher.spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))       # CLIP's mean

    enc = tok(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 12 and enc["input_ids"][1, -1].item() == 1      # truncated, end kept
    with torch.no_grad():
        ref_txt = model.get_text_features(**enc).pooler_output.numpy()
        px = torch.from_numpy(teacher.spec(img)[None]).permute(0, 3, 1, 2)
        ref_img = model.get_image_features(pixel_values=px).pooler_output.numpy()
    want = _l2(np.concatenate([ref_img, ref_txt]))

    rows = teacher.embed(sample.segments)
    assert rows.shape == (3, 20)
    np.testing.assert_allclose(rows, want, atol=2e-5, rtol=0)
    (cache,) = sources.open_teachers(cfg, MLLMConfig(), [sample])
    np.testing.assert_allclose(cache.features(validate_sample(sample)), want, atol=2e-5, rtol=0)

    # one modality alone; the memo gives the same vectors
    only_text = teacher.embed([text_segment(texts[0])])
    np.testing.assert_allclose(only_text, want[1:2], atol=2e-5, rtol=0)
    assert teacher.embed([]).shape == (0, 20)

    # the vision teacher takes the same folder: the vision tower's pooled output, unprojected
    vision = sources.make_teacher("vision", DataConfig(teacher_models={"vision": str(d)}), MLLMConfig())
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=px).pooler_output.numpy()
    np.testing.assert_allclose(vision.embed([image_segment(img)]), _l2(pooled), atol=2e-5, rtol=0)

    fp = teacher.fingerprint()
    assert fp.startswith(f"clip:{d.name}:") and ":len=12:" in fp
    assert TC.ClipTeacher(load_pretrained(d), tok, d.name, max_length=8).fingerprint() != fp


# openai/clip-vit-*'s preprocessor_config.json for the 16-px tower (shortest edge 224 -> 16, crop 224 -> 16)
CLIP_PP = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 16},
           "resample": 3, "do_center_crop": True, "crop_size": {"height": 16, "width": 16}, "do_rescale": True,
           "rescale_factor": 0.00392156862745098, "do_normalize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "do_convert_rgb": True}


@pytest.mark.parametrize("shape", [(30, 40, 3), (41, 30, 3)])
def test_clip_teachers_prepare_images_as_clips_processor(clip_dir, tmp_path, shape):
    """A CLIPModel folder with a released-like preprocessor_config.json: the ``clip`` and ``vision``
    teachers prepare a non-square image exactly as transformers' CLIPImageProcessor (PIL backend)
    does (shorter edge to 16, bicubic, central 16 crop), and their rows are CLIP's on those
    pixels; save -> load keeps the preprocessing (the file is written back)."""
    import shutil

    from mllm_jax.convert.hf import save_pretrained
    from mllm_jax.data.pipeline import ImageSpec
    model, _, d = clip_dir
    folder = tmp_path / "clip"
    shutil.copytree(d, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PP))
    img = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    proc = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert type(proc).__name__ == "CLIPImageProcessorPil"
    want = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    px = torch.from_numpy(want[None]).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=px).pooler_output.numpy()
        pooled = model.vision_model(pixel_values=px).pooler_output.numpy()

    teacher = sources.make_teacher("clip", DataConfig(teacher_models={"clip": str(folder)}), MLLMConfig())
    assert teacher.spec == ImageSpec(16, 3, tuple(CLIP_PP["image_mean"]), tuple(CLIP_PP["image_std"]),
                                     shortest_edge=16, resample="bicubic")
    np.testing.assert_array_equal(teacher.spec(img), want)
    assert np.abs(ImageSpec.from_vision(load_pretrained(d).config.vision)(img) - want).max() > 0.5   # the stretch
    np.testing.assert_allclose(teacher.embed([image_segment(img)]), _l2(ref_img), atol=2e-5, rtol=0)
    vision = sources.make_teacher("vision", DataConfig(teacher_models={"vision": str(folder)}), MLLMConfig())
    assert vision.spec == teacher.spec
    np.testing.assert_allclose(vision.embed([image_segment(img)]), _l2(pooled), atol=2e-5, rtol=0)
    plain = sources.make_teacher("clip", DataConfig(teacher_models={"clip": str(d)}), MLLMConfig())
    assert plain.spec.shortest_edge is None and plain.fingerprint() != teacher.fingerprint()

    ours = load_pretrained(folder)
    save_pretrained(ours, tmp_path / "out")
    assert load_pretrained(tmp_path / "out").config == ours.config
    again = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out", backend="pil")
    np.testing.assert_array_equal(again(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0), want)

    # a CLIPVisionModel folder (the clip_vision family) reads and writes the file as well
    vis = tmp_path / "vision"
    model.vision_model.config.architectures = ["CLIPVisionModel"]
    transformers.CLIPVisionModel._from_config(model.vision_model.config).save_pretrained(vis)
    (vis / "preprocessor_config.json").write_text(json.dumps({**CLIP_PP, "size": {"shortest_edge": 20}}))
    tower = load_pretrained(vis)
    assert (tower.config.image_size, tower.config.resize_shortest_edge, tower.config.resample) == (16, 20, "bicubic")
    save_pretrained(tower, tmp_path / "vision_out")
    assert load_pretrained(tmp_path / "vision_out").config == tower.config
    bad = dict(CLIP_PP, crop_size=12)
    (vis / "preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"preprocessor_config.json: an input side of 12 px differs"):
        load_pretrained(vis)


def test_clip_teacher_needs_a_clip_folder(clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs data.teacher_models.clip"):
        sources.make_teacher("clip", DataConfig(teachers=("clip",)), MLLMConfig())
    _, _, d = clip_dir
    vis = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4))
    vis.save_pretrained(str(tmp_path / "vision"))
    with pytest.raises(ConfigError, match="holds a VisionTower, not a CLIPModel"):
        sources.make_teacher("clip", DataConfig(teacher_models={"clip": str(tmp_path / "vision")}), MLLMConfig())
    with pytest.raises(ConfigError, match="data.teacher_models: 'dino'"):
        DataConfig(teacher_models={"dino": str(d)})


# ---- sentence pooling (MiniLM: mean, BGE: CLS) ----------------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    transformers.BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    model = perturb(transformers.BertModel(transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False), seed=1)
    model.save_pretrained(str(d))
    return model, d


TEXTS = ["a red circle", "the blue square is left of a small green cross", "large"]


def _hf_tokens(model, d):
    tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state.numpy()
    return h, enc["attention_mask"].numpy()[..., None].astype(np.float32)


def _write_pooling(d, mode, modules=True, extra_modules=()):
    (d / "1_Pooling").mkdir(exist_ok=True)
    flags = {k: False for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                                "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                "pooling_mode_lasttoken")}
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags,
                                                             f"pooling_mode_{mode}": True}))
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            *extra_modules,
            {"idx": 9, "name": "9", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    if modules:
        (d / "modules.json").write_text(json.dumps(mods))
    elif (d / "modules.json").exists():
        (d / "modules.json").unlink()


def test_bert_teacher_pools_as_the_sentence_transformers_files_say(bert_dir, tmp_path):
    """BGE's 1_Pooling/config.json says CLS: the teacher gives the normalised [CLS] hidden state;
    MiniLM's says mean: the normalised masked mean (also the default without the files); max:
    the masked max. The pooling is part of the fingerprint, so caches never mix."""
    import shutil
    model, src = bert_dir
    d = tmp_path / "bge-tiny"
    shutil.copytree(src, d)
    h, m = _hf_tokens(model, d)
    cls, mean = _l2(h[:, 0]), _l2((h * m).sum(1) / m.sum(1))
    mx = _l2(np.where(m > 0, h, -1e9).max(1))
    assert np.abs(cls - mean).max() > 0.1 and np.abs(mx - mean).max() > 0.1       # the rules differ here

    assert TC.sentence_pooling(d) == "mean"                                  # a plain BERT folder
    fps = {}
    for mode, want, modules in (("cls_token", cls, True), ("mean_tokens", mean, True), ("max_tokens", mx, False)):
        _write_pooling(d, mode, modules=modules)
        cfg = DataConfig(teachers=("minilm",), teacher_models={"minilm": str(d)})
        teacher = sources.make_teacher("minilm", cfg, MLLMConfig())
        assert teacher.pooling == mode.split("_")[0]
        np.testing.assert_allclose(teacher.embed_texts(TEXTS), want, atol=2e-5, rtol=0)
        fps[mode] = teacher.fingerprint()
    assert len(set(fps.values())) == 3 and all(f":pool={m.split('_')[0]}:" in f for m, f in fps.items())

    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8, "do_lower_case": False}))
    assert TC.MiniLMTeacher.from_pretrained(d).max_length == 8


def test_bert_teacher_refuses_poolings_it_cannot_reproduce(bert_dir, tmp_path):
    import shutil
    _, src = bert_dir
    d = tmp_path / "odd"
    shutil.copytree(src, d)
    _write_pooling(d, "weightedmean_tokens")
    with pytest.raises(ValueError, match=r"1_Pooling/config\.json: pooling modes \['pooling_mode_weightedmean_tokens'\]"):
        TC.MiniLMTeacher.from_pretrained(d)
    _write_pooling(d, "cls_token", modules=False)
    cfg = json.loads((d / "1_Pooling" / "config.json").read_text())
    (d / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "pooling_mode_mean_tokens": True}))
    with pytest.raises(ValueError, match=r"1_Pooling/config\.json: pooling modes \['pooling_mode_cls_token', "
                                         r"'pooling_mode_mean_tokens'\] are not supported"):
        TC.sentence_pooling(d)
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    _write_pooling(d, "cls_token", extra_modules=[dense])
    with pytest.raises(ValueError, match=r"modules\.json: modules '2_Dense' \(sentence_transformers\.models\.Dense\)"):
        TC.sentence_pooling(d)


# ---- the paper's triple kernel from three model folders -----------------------------------------

def test_the_papers_triple_kernel_from_dinov2_bge_and_clip_folders(clip_dir, bert_dir, tmp_path):
    """Sugar's target kernel as the paper defines it, from local folders: image features DINOv2 +
    CLIP image (concatenated), text features BGE (CLS pooling) + CLIP text, image-text pairs on
    CLIP's one space. Teachers opened as a run opens them (config -> caches); one slice per
    sample, so each target entry is the GAK local kernel of the pair, computed here from
    transformers' own outputs."""
    import math
    import shutil

    import jax.numpy as jnp
    from mllm_jax.config import StructureConfig
    from mllm_jax.objectives.structure import target_similarity

    clip, clip_tok, clip_d = clip_dir
    bert, bert_src = bert_dir
    bge = tmp_path / "bge"
    shutil.copytree(bert_src, bge)
    _write_pooling(bge, "cls_token")
    torch.manual_seed(0)
    dino = perturb(transformers.Dinov2Model(transformers.Dinov2Config(
        image_size=14, patch_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, layerscale_value=0.5)), seed=1)
    dino.save_pretrained(str(tmp_path / "dino"))

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(2)]
    texts = ["a red circle", "the blue square is left"]
    samples = [Sample(f"i{k}", (image_segment(im),)) for k, im in enumerate(images)] + \
              [Sample(f"t{k}", (text_segment(t),)) for k, t in enumerate(texts)]
    cfg = DataConfig(teachers=("vision", "minilm", "clip"), teacher_cache=str(tmp_path / "cache"),
                     teacher_models={"vision": str(tmp_path / "dino"), "minilm": str(bge), "clip": str(clip_d)})
    caches = sources.open_teachers(cfg, MLLMConfig(), samples)
    batch = {f"teacher_{c.name}": jnp.asarray(np.stack([c.features(validate_sample(s)) for s in samples]))
             for c in caches}
    batch["slice_mask"] = jnp.ones((4, 1), bool)
    batch["slice_is_image"] = jnp.asarray([[True], [True], [False], [False]])
    sigma = 0.9
    st = StructureConfig(target_sigma=sigma, image_teacher=["vision", "clip"], text_teacher=["minilm", "clip"],
                         shared_teacher="clip")
    t = np.asarray(target_similarity(batch, st))

    # the references: transformers' outputs on the teachers' own preprocessed pixels / tokens
    dino_spec = sources.make_teacher("vision", cfg, MLLMConfig()).spec
    clip_spec = sources.make_teacher("clip", cfg, MLLMConfig()).spec
    nchw = lambda spec: torch.from_numpy(np.stack([spec(im) for im in images])).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        f_dino = _l2(dino(pixel_values=nchw(dino_spec)).pooler_output.numpy())
        f_clip_img = _l2(clip.get_image_features(pixel_values=nchw(clip_spec)).pooler_output.numpy())
        enc = clip_tok(texts, padding=True, return_tensors="pt")
        f_clip_txt = _l2(clip.get_text_features(**enc).pooler_output.numpy())
        tok = transformers.AutoTokenizer.from_pretrained(str(bge), local_files_only=True)
        f_bge = _l2(bert(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0].numpy())

    def k(d2):   # tslearn's GAK local kernel at squared distance d2
        z = d2 / (2 * sigma ** 2)
        return math.exp(-(z + math.log(2 - math.exp(-z))))

    def d2(a, b):
        return float(np.sum((a - b) ** 2))
    np.testing.assert_allclose(t[0, 1], k((d2(*f_dino) + d2(*f_clip_img)) / 2), rtol=1e-4)   # image-image
    np.testing.assert_allclose(t[2, 3], k((d2(*f_bge) + d2(*f_clip_txt)) / 2), rtol=1e-4)    # text-text
    for i in range(2):                                                                        # image-text
        for j in range(2):
            np.testing.assert_allclose(t[i, 2 + j], k(d2(f_clip_img[i], f_clip_txt[j])), rtol=1e-4)


def test_bert_teacher_without_sentence_bert_config_takes_sentence_transformers_length(bert_dir, tmp_path):
    """Without sentence_bert_config.json sentence-transformers truncates at
    min(max_position_embeddings, tokenizer.model_max_length); ours took 256 capped by the
    positions, so a 512-position BERT whose tokenizer says 512 was cut at 256 tokens."""
    import shutil
    _, d = bert_dir
    for limit, want in ((20, 20), (100, 64), (None, 64)):
        folder = tmp_path / f"limit{limit}"
        shutil.copytree(d, folder)
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc.pop("model_max_length", None)
        if limit is not None:
            tc["model_max_length"] = limit
        (folder / "tokenizer_config.json").write_text(json.dumps(tc))
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        assert min(64, tok.model_max_length) == want          # sentence-transformers' rule, from transformers
        assert TC.MiniLMTeacher.from_pretrained(folder, pooling="mean").max_length == want


def test_bert_teacher_truncates_at_the_models_positions(bert_dir):
    """A folder without sentence_bert_config.json whose BERT has 64 positions: a text of more than 64 tokens is truncated to 64, as transformers' tokenizer with
    max_length=64 does, and gets that text's mean-pooled embedding (the encoder raised on a
    128-token bucket and the cache build died)."""
    model, d = bert_dir
    teacher = TC.MiniLMTeacher.from_pretrained(d, pooling="mean")
    assert teacher.max_length == 64
    long = " ".join(WORDS * 6)                                      # 84 words, 86 tokens
    tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    enc = tok([long], truncation=True, max_length=64, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 64
    with torch.no_grad():
        h = model(**enc).last_hidden_state.numpy()
    np.testing.assert_allclose(teacher.embed_texts([long]), _l2(h.mean(1)), atol=2e-5, rtol=0)


def test_bert_teacher_lowercases_when_sentence_bert_config_says_so(bert_dir, tmp_path):
    """sentence_bert_config.json's do_lower_case: sentence-transformers lowercases each text
    before its tokenizer sees it. With a cased tokenizer, 'A Red Circle' is then encoded as
    'a red circle' (the cased words are [UNK] otherwise); the setting is in the fingerprint."""
    import shutil
    model, src = bert_dir
    d = tmp_path / "cased"
    shutil.copytree(src, d)
    (d / "tokenizer.json").unlink()
    tok = transformers.BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=False)
    tok.save_pretrained(str(d))
    text = "A Red Circle is Left of the Blue Square"
    assert tok(text)["input_ids"] != tok(text.lower())["input_ids"]           # cased: [UNK]s
    enc = tok([text.lower()], return_tensors="pt")
    with torch.no_grad():
        want = _l2(model(**enc).last_hidden_state.numpy().mean(1))
    fps = []
    for lower in (True, False):
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": lower}))
        teacher = TC.MiniLMTeacher.from_pretrained(d, pooling="mean")
        fps.append(teacher.fingerprint())
        got = teacher.embed_texts([text])
        assert (np.abs(got - want).max() < 2e-5) == lower
    assert fps[0] != fps[1]
