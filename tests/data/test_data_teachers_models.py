"""The sentence pooling of the BERT teacher, against transformers (torch, float32) on tiny random
models saved here."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.config import DataConfig, MLLMConfig  # noqa: E402
from mllm_jax.data import sources  # noqa: E402
from mllm_jax.data import teachers as TC  # noqa: E402

WORDS = "a the red blue green circle square cross is left of above small large".split()


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---- sentence pooling (MiniLM: mean, BGE: CLS) ----------------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    transformers.BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    model = _perturb(transformers.BertModel(transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False))
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
