"""The real all-MiniLM-L6-v2 in our BERT against transformers' BertModel, both followed by
the sentence-transformers pipeline this checkpoint declares in ``modules.json``
(Transformer -> mean Pooling -> Normalize)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.convert.hf import load_pretrained  # noqa: E402
from mllm_jax.models.text_encoder import TextEncoder, mean_pool  # noqa: E402

pytestmark = pytest.mark.real

SENTENCES = [
    "A red circle sits to the left of a blue square.",
    "The cat sleeps on the warm windowsill.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "How many green triangles are there in the picture?",
    "I'd like two coffees, please — one with oat milk.",
    "ok",
    "Le chat est sur la table.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "The stock market fell sharply after the announcement of new tariffs on imported steel.",
    "She sells sea shells by the sea shore.",
    "def f(x): return x ** 2",
    "Is there a yellow star in the top-right corner of the image?",
    "An astronaut floats above the Earth, tethered to the station.",
    "Not every question has an answer; some have several.",
    "BREAKING: local team wins championship!!!",
    "The mitochondria is the powerhouse of the cell.",
    "Two dogs chase a frisbee across a sunny park while children watch from a bench nearby.",
    "e = mc^2",
    "Please summarise the following document in three sentences, keeping the key figures.",
    "Der schnelle braune Fuchs springt über den faulen Hund. " * 12,  # long: truncated to 256
]


@pytest.fixture(scope="module")
def minilm(assets_dir):
    d = assets_dir / "all-MiniLM-L6-v2"
    if not (d / "config.json").exists():
        pytest.fail(f"{d}: all-MiniLM-L6-v2 is missing; run `make assets`")
    return d


def test_sentence_embeddings_match_transformers(minilm):
    modules = [m["type"] for m in json.loads((minilm / "modules.json").read_text())]
    assert modules == ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                       "sentence_transformers.models.Normalize"]
    pooling = json.loads((minilm / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    max_len = json.loads((minilm / "sentence_bert_config.json").read_text())["max_seq_length"]

    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=max_len, return_tensors="np")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert mask.sum(1).min() < mask.shape[1]  # the batch really is padded

    ref_model = transformers.BertModel.from_pretrained(minilm, dtype=torch.float32).eval()
    with torch.no_grad():
        h = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      token_type_ids=torch.from_numpy(types)).last_hidden_state
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    ref = (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    ref = torch.nn.functional.normalize(ref, p=2, dim=1).numpy()

    ours = load_pretrained(minilm)
    assert isinstance(ours, TextEncoder) and ours.config.num_layers == 6 and ours.config.hidden_size == 384
    out = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(types, jnp.int32))
    emb = np.asarray(mean_pool(out.last_hidden_state, jnp.asarray(mask)))
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    cos = np.sum(emb * ref, axis=1)  # both unit-norm
    assert cos.shape == (len(SENTENCES),)
    assert cos.min() >= 0.99999, cos
    # and the embeddings mean something: paraphrase-free pairs are not all alike
    sims = emb @ emb.T
    assert sims[0, 11] > sims[0, 15]  # shapes-in-image questions are closer than biology
