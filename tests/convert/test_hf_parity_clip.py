"""The CLIP two-tower model (``models/clip.py``, converter ``families/clip.py``) against
transformers' ``CLIPModel`` (torch, float32): a tiny random one built here, every parameter
perturbed away from its init, saved with ``save_pretrained`` and loaded by our loader."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.convert.hf import flat_params, load_pretrained, read_safetensors_dir, save_pretrained  # noqa: E402
from mllm_jax.models.clip import ClipModel, eos_positions  # noqa: E402

TOL = 2e-5
EOS, PAD = 3, 0           # the end token is not the highest id: the legacy argmax rule would pool elsewhere
TEXT = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=12, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=20)
    model = transformers.CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp("clip")
    model.save_pretrained(d)
    return model, d


def _texts():
    """Right-padded rows, a left-padded row and a row with an end token before its last token;
    padding holds real (non-end) token ids, so only the mask keeps it out."""
    ids = np.array([[1, 7, 30, 12, EOS, 9, 9, 9],
                    [1, 22, EOS, 5, 5, 5, 5, 5],
                    [6, 6, 1, 39, 14, 8, 25, EOS],
                    [1, 11, 36, 2, 17, EOS, 38, 4]], np.int64)
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0, 0, 0],
                     [0, 0, 1, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 1, 1, 1]], np.int64)
    return ids, mask


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hf_text(model, ids, mask):
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def _hf_image(model, pixels):
    with torch.no_grad():
        return model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()


def test_clip_features_match_transformers(clip_dir):
    model, d = clip_dir
    ours = load_pretrained(d)
    assert isinstance(ours, ClipModel) and ours.hf_family == "clip"
    assert ours.config.projection_dim == 20 and ours.config.text.eos_token_id == EOS
    pixels = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
    ref_img = _hf_image(model, pixels)
    got_img = np.asarray(ours.get_image_features(pixels))
    np.testing.assert_allclose(got_img, ref_img, atol=TOL, rtol=0)
    np.testing.assert_allclose(_l2(got_img), _l2(ref_img), atol=TOL, rtol=0)

    ids, mask = _texts()
    ref_txt, ref_hidden = _hf_text(model, ids, mask)
    got_txt = np.asarray(ours.get_text_features(ids, mask))
    np.testing.assert_allclose(got_txt, ref_txt, atol=TOL, rtol=0)
    np.testing.assert_allclose(_l2(got_txt), _l2(ref_txt), atol=TOL, rtol=0)
    hidden = np.asarray(ours.text_model(ids, mask).last_hidden_state)
    valid = mask.astype(bool)                                   # padded query rows differ (HF's sdpa fix-up)
    np.testing.assert_allclose(hidden[valid], ref_hidden[valid], atol=TOL, rtol=0)
    assert np.asarray(eos_positions(ids, EOS)).tolist() == [4, 2, 7, 5]
    # the mask matters: the left-padded row without it is another embedding
    unmasked = np.asarray(ours.get_text_features(ids, np.ones_like(mask)))
    assert np.abs(unmasked[2] - ref_txt[2]).max() > 1e-3

    out = ours(ids, pixels, mask)                                # CLIPModel.forward: logits per text
    with torch.no_grad():
        hf_out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(out.logits_per_text), hf_out.logits_per_text.numpy(), atol=1e-4, rtol=0)


def test_legacy_eos_token_id_2_pools_at_the_largest_id(clip_dir):
    """transformers keeps the pre-#24773 rule for configs with eos_token_id == 2 (old OpenAI
    checkpoints): the pooled position is the argmax of the ids, wherever the 2s are."""
    model, d = clip_dir
    base = load_pretrained(d)
    ours = load_pretrained(d, config_overrides={"text": dataclasses.replace(base.config.text, eos_token_id=2)})
    ids, mask = _texts()
    model.text_model.eos_token_id = 2
    try:
        ref, _ = _hf_text(model, ids, mask)
    finally:
        model.text_model.eos_token_id = EOS
    assert np.asarray(eos_positions(ids, 2)).tolist() == [2, 1, 3, 6]
    np.testing.assert_allclose(np.asarray(ours.get_text_features(ids, mask)), ref, atol=TOL, rtol=0)
    assert np.abs(np.asarray(base.get_text_features(ids, mask)) - ref).max() > 1e-3   # a different rule


def test_clip_save_roundtrip_and_transformers_reads_it(clip_dir, tmp_path):
    model, d = clip_dir
    ours = load_pretrained(d)
    save_pretrained(ours, tmp_path)
    theirs, mine = read_safetensors_dir(d), read_safetensors_dir(tmp_path)
    assert mine.keys() == theirs.keys() - {"text_model.embeddings.position_ids",
                                           "vision_model.embeddings.position_ids"}
    for k in mine:
        assert mine[k].shape == theirs[k].shape, k
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    again = load_pretrained(tmp_path)
    for k, v in flat_params(ours).items():
        np.testing.assert_array_equal(np.asarray(flat_params(again)[k]), np.asarray(v))
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    ids, mask = _texts()
    np.testing.assert_array_equal(_hf_text(reloaded, ids, mask)[0], _hf_text(model, ids, mask)[0])
