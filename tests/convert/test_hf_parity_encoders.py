"""Vision towers and the BERT encoder against transformers (torch, float32) on tiny random
models built here and saved with ``save_pretrained``; our loader reads those directories.

Every torch parameter is perturbed away from its init (LayerNorm weight 1 / bias 0, zero
linear biases) so that a swapped or mis-transposed tensor cannot hide.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.tiny_hf import perturb  # noqa: E402
from mllm_jax.convert.hf import (  # noqa: E402
    CheckpointMismatchError, family_of_model, flat_params, load_pretrained, read_safetensors_dir,
    save_pretrained, write_safetensors)
from mllm_jax.models.text_encoder import mean_pool  # noqa: E402

TOL = 1e-4
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           image_size=32, patch_size=8)


def _build(kind):
    torch.manual_seed(0)
    if kind == "clip":
        return perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VIT)), seed=0)
    if kind in ("siglip_head", "siglip"):
        cfg = transformers.SiglipVisionConfig(**VIT, vision_use_head=kind == "siglip_head")
        return perturb(transformers.SiglipVisionModel(cfg), seed=0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=40, type_vocab_size=2)
    return perturb(transformers.BertModel(cfg, add_pooling_layer=kind == "bert_pooler"), seed=0)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{kind: (torch model, saved dir)} built once for the module."""
    out = {}
    for kind in ("clip", "siglip_head", "siglip", "bert_pooler", "bert"):
        model = _build(kind)
        d = tmp_path_factory.mktemp(kind)
        model.save_pretrained(d)
        out[kind] = (model, d)
    return out


def _pixels(b=2, size=32, seed=1):
    return np.random.default_rng(seed).standard_normal((b, size, size, 3)).astype(np.float32)  # NHWC


def _text_batch():
    ids = np.array([[2, 17, 33, 5, 41, 9, 3], [2, 8, 59, 3, 0, 0, 0]], np.int64)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int64)
    types = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], np.int64)
    return ids, mask, types


def _run_vision(torch_model, ours, pixels):
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    got = ours(jnp.asarray(pixels), output_hidden_states=True)
    return ref, got


def _run_bert(torch_model, ours):
    ids, mask, types = _text_batch()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          token_type_ids=torch.from_numpy(types), output_hidden_states=True)
    got = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(types, jnp.int32),
               output_hidden_states=True)
    return ref, got


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - b.detach().numpy())))


def _assert_outputs_match(ref, got, kind):
    assert got.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
    assert _maxdiff(got.last_hidden_state, ref.last_hidden_state) < TOL
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(got.hidden_states, ref.hidden_states)):
        assert _maxdiff(a, b) < TOL, f"hidden_states[{i}]"
    if kind == "siglip":  # HF has no pooled output without the head; ours is the patch mean
        assert ref.pooler_output is None
        assert _maxdiff(got.pooled, ref.last_hidden_state.mean(1)) < TOL
    elif kind == "bert":
        assert ref.pooler_output is None and got.pooled is None
    else:
        assert _maxdiff(got.pooled, ref.pooler_output) < TOL


def _run(kind, torch_model, ours):
    if kind.startswith("bert"):
        return _run_bert(torch_model, ours)
    return _run_vision(torch_model, ours, _pixels())


KINDS = ["clip", "siglip_head", "siglip", "bert_pooler", "bert"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_transformers(hf_dirs, kind):
    torch_model, d = hf_dirs[kind]
    ours = load_pretrained(d)
    assert ours.hf_family == {"clip": "clip_vision", "siglip_head": "siglip_vision",
                              "siglip": "siglip_vision"}.get(kind, "bert")
    ref, got = _run(kind, torch_model, ours)
    _assert_outputs_match(ref, got, kind)


def test_bert_mean_pool_matches_sentence_transformers_formula(hf_dirs):
    torch_model, d = hf_dirs["bert"]
    ref, got = _run_bert(torch_model, load_pretrained(d))
    mask = torch.from_numpy(_text_batch()[1]).unsqueeze(-1).float()
    want = (ref.last_hidden_state * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
    assert _maxdiff(mean_pool(got.last_hidden_state, jnp.asarray(_text_batch()[1])), want) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip_and_transformers_reads_it(hf_dirs, tmp_path, kind):
    torch_model, d = hf_dirs[kind]
    ours = load_pretrained(d)
    save_pretrained(ours, tmp_path)
    # bit-identical through our own save -> load
    again = load_pretrained(tmp_path)
    a, b = flat_params(ours), flat_params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    # the tensors we write are exactly the ones transformers wrote
    theirs = {k: v for k, v in read_safetensors_dir(d).items() if not k.endswith("position_ids")}
    mine = read_safetensors_dir(tmp_path)
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    # and transformers loads our directory with nothing missing, giving the same outputs
    cls = type(torch_model)
    kwargs = {"add_pooling_layer": kind == "bert_pooler"} if kind.startswith("bert") else {}
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(reloaded.config) is type(torch_model.config)
    ref, got = _run(kind, reloaded.eval(), ours)
    _assert_outputs_match(ref, got, kind)


def test_config_round_trip(hf_dirs):
    for kind in KINDS:
        _, d = hf_dirs[kind]
        hf = json.loads((d / "config.json").read_text())
        ours = load_pretrained(d)
        back = family_of_model(ours).config_to_hf(ours.config)
        for key, value in back.items():
            if key in hf:
                assert hf[key] == value, (kind, key)


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    _, d = hf_dirs["clip"]
    tensors = read_safetensors_dir(d)
    dropped = "encoder.layers.1.mlp.fc2.weight"
    del tensors[dropped]
    write_safetensors(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError, match=r"missing:\s+encoder\.layers\.1\.mlp\.fc2\.weight"):
        load_pretrained(tmp_path)


def test_legacy_prefixed_checkpoints_load(hf_dirs, tmp_path):
    """Older CLIP towers store ``vision_model.*`` plus a position_ids buffer; BERT heads ``bert.*``."""
    torch_model, d = hf_dirs["clip"]
    tensors = {f"vision_model.{k}": v for k, v in read_safetensors_dir(d).items()}
    tensors["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    (tmp_path / "clip").mkdir()
    write_safetensors(tensors, tmp_path / "clip" / "model.safetensors")
    (tmp_path / "clip" / "config.json").write_text((d / "config.json").read_text())
    ref, got = _run_vision(torch_model, load_pretrained(tmp_path / "clip"), _pixels())
    _assert_outputs_match(ref, got, "clip")

    torch_model, d = hf_dirs["bert_pooler"]
    tensors = {f"bert.{k}": v for k, v in read_safetensors_dir(d).items()}
    tensors["cls.predictions.bias"] = np.zeros(60, np.float32)
    (tmp_path / "bert").mkdir()
    write_safetensors(tensors, tmp_path / "bert" / "model.safetensors")
    (tmp_path / "bert" / "config.json").write_text((d / "config.json").read_text())
    ref, got = _run_bert(torch_model, load_pretrained(tmp_path / "bert"))
    _assert_outputs_match(ref, got, "bert_pooler")


@pytest.mark.parametrize("kind", ["clip", "siglip_head"])
def test_real_photo(hf_dirs, kind):
    """A real photo (scikit-image's astronaut), resized and normalised as the processors do."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image
    torch_model, d = hf_dirs[kind]
    ours = load_pretrained(d)
    img = Image.fromarray(skdata.astronaut()).resize((32, 32), Image.BICUBIC)
    x = np.asarray(img, np.float32) / 255.0
    mean, std = np.asarray(ours.config.image_mean), np.asarray(ours.config.image_std)
    x = ((x - mean) / std).astype(np.float32)[None]
    ref, got = _run_vision(torch_model, ours, x)
    _assert_outputs_match(ref, got, kind)


def test_bert_with_tf_era_layernorm_names_loads_as_transformers_loads_it(hf_dirs, tmp_path):
    """Checkpoints converted from the original TensorFlow BERT name LayerNorms ``LayerNorm.gamma``
    / ``LayerNorm.beta``; transformers renames them to ``weight`` / ``bias`` on load, ours refused
    them (every LayerNorm missing and unexpected)."""
    torch_model, d = hf_dirs["bert_pooler"]
    tensors = {f"bert.{k}".replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in read_safetensors_dir(d).items()}
    assert sum(k.endswith("LayerNorm.gamma") for k in tensors) == 5   # embeddings + 2 per layer
    write_safetensors(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    theirs, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref, got = _run_bert(theirs.eval(), load_pretrained(tmp_path))
    _assert_outputs_match(ref, got, "bert_pooler")
    ref, _ = _run_bert(torch_model, load_pretrained(tmp_path))    # the original weights, too
    _assert_outputs_match(ref, got, "bert_pooler")


@pytest.mark.parametrize("pp", [
    {"size": {"height": 32, "width": 32}},                       # as the released files: class defaults
    {"size": {"height": 32, "width": 32}, "resample": 2, "image_mean": [0.4, 0.5, 0.6]},
    {"size": {"height": 32, "width": 32}, "do_normalize": False},
])
def test_siglip_folder_prepares_images_as_siglips_processor(hf_dirs, tmp_path, pp):
    """A SigLIP folder's preprocessor_config.json (SiglipImageProcessor: a stretch, bicubic by
    default, mean / std 0.5 by default) sets the tower's ImageSpec; it was not read (images were
    stretched bilinear). save_pretrained writes a file transformers loads into the same processor."""
    import shutil

    from mllm_jax.data.pipeline import ImageSpec
    _, d = hf_dirs["siglip"]
    folder = tmp_path / "siglip"
    shutil.copytree(d, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor", **pp}))
    proc = transformers.SiglipImageProcessorPil(**pp)
    ours = load_pretrained(folder)
    assert ours.config.resample == ("bilinear" if pp.get("resample") == 2 else "bicubic")
    spec = ImageSpec.from_vision(ours.config)
    saved = tmp_path / "saved"
    save_pretrained(ours, saved)
    again = transformers.AutoImageProcessor.from_pretrained(saved, local_files_only=True, backend="pil")
    rng = np.random.default_rng(7)
    for shape in [(30, 47, 3), (64, 20, 3), (32, 32, 3), (9, 9, 1)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        rgb = img if shape[-1] == 3 else np.repeat(img, 3, -1)
        want = proc(rgb, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(spec(img), want, atol=5e-7, rtol=0, err_msg=str(shape))
        np.testing.assert_allclose(again(rgb, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0), want,
                                   atol=5e-7, rtol=0, err_msg=str(shape))
    if len(pp) == 1:      # what the file changed: the stretch was bilinear without it
        img = rng.integers(0, 256, (30, 47, 3), dtype=np.uint8)
        assert np.abs(ImageSpec.from_vision(load_pretrained(d).config)(img)
                      - proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)).max() > 0.05
