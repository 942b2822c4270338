"""DINOv2 vision towers against transformers' ``Dinov2Model`` (torch, float32) on tiny random
models built and saved here: forward parity at the config's size and at other sizes (the
position table resized bicubically, as transformers does), SwiGLU (giant), save -> load both
ways, ``preprocessor_config.json``, the ``vision`` teacher, and the refusals.

Every torch parameter is perturbed away from its init (LayerScale 0.5 everywhere, zero biases,
unit LayerNorms), the position table by a unit-variance draw so that its interpolation weighs
in the outputs.
"""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.config import ConfigError, DataConfig, MLLMConfig, VisionConfig  # noqa: E402
from mllm_jax.convert.hf import flat_params, load_pretrained, read_safetensors_dir, save_pretrained  # noqa: E402
from mllm_jax.models.vision import bicubic_matrix  # noqa: E402

TOL = 1e-4
TINY = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            layerscale_value=0.5)
SIZES = [(28, 28), (21, 21), (42, 35), (23, 30)]   # the table's 4x4 grid; 3x3; 6x5; 3x4 (+ a remainder)


def _dinov2(cls=None, seed=0, **kw):
    cls = cls or transformers.Dinov2Model
    torch.manual_seed(seed)
    model = cls(transformers.Dinov2Config(**{**TINY, **kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((1.0 if "position_embeddings" in name else 0.1) * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{kind: (torch Dinov2Model, its save_pretrained folder)}."""
    out = {}
    for kind, kw in (("mlp", {}), ("swiglu", {"use_swiglu_ffn": True})):
        model = _dinov2(**kw)
        d = tmp_path_factory.mktemp(kind)
        model.save_pretrained(d)
        out[kind] = (model, d)
    return out


def _pixels(h, w, b=2, seed=1):
    return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)  # NHWC


@nnx.jit
def _forward(model, pixels):   # one program per input shape (op-by-op dispatch compiles many more)
    return model(pixels, output_hidden_states=True)


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - b.detach().numpy())))


def _assert_matches(torch_model, ours, pixels):
    with torch.no_grad():
        ref = torch_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    got = _forward(ours, jnp.asarray(pixels))
    assert got.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
    assert _maxdiff(got.last_hidden_state, ref.last_hidden_state) < TOL
    assert _maxdiff(got.pooled, ref.pooler_output) < TOL
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(got.hidden_states, ref.hidden_states)):
        assert _maxdiff(a, b) < TOL, f"hidden_states[{i}]"


@pytest.mark.parametrize("n_in,n_out", [(4, 3), (4, 6), (5, 5), (3, 1), (37, 16), (16, 37)])
def test_bicubic_matrix_is_torch_interpolate(n_in, n_out):
    """37 -> 16: DINOv2's 518-px table at 224 px. The separable matrices reproduce torch's
    ``interpolate(mode="bicubic", align_corners=False)``, which a bicubic of another kernel
    (jax.image.resize: Keys A = -0.5, antialiased when shrinking) does not."""
    import jax
    x = np.random.default_rng(0).standard_normal((1, 3, n_in, n_in + 1)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, n_out + 2), mode="bicubic",
                                           align_corners=False).numpy()
    got = np.einsum("hs,cst,wt->chw", bicubic_matrix(n_in, n_out), x[0], bicubic_matrix(n_in + 1, n_out + 2))
    np.testing.assert_allclose(got, want[0], atol=1e-5, rtol=0)
    if n_in != n_out and n_out > 1:
        other = np.asarray(jax.image.resize(x[0], (3, n_out, n_out + 2), "bicubic"))
        assert np.abs(other - want[0]).max() > 1e-3


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_forward_matches_transformers(hf_dirs, kind):
    """At the config's 28 px and at other sizes (interpolated position table), SwiGLU too."""
    torch_model, d = hf_dirs[kind]
    ours = load_pretrained(d)
    assert ours.hf_family == "dinov2_vision" and ours.config.variant == "dinov2"
    assert ours.config.use_swiglu_ffn == (kind == "swiglu") and ours.config.layerscale_value == 0.5
    lam = np.asarray(ours.layers[1].layer_scale2.lambda1[...])
    np.testing.assert_array_equal(lam, torch_model.encoder.layer[1].layer_scale2.lambda1.detach().numpy())
    assert np.abs(lam - 0.5).max() > 0.05                     # perturbed: LayerScale is exercised
    for h, w in SIZES:
        _assert_matches(torch_model, ours, _pixels(h, w))


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_save_load_roundtrip_and_transformers_reads_it(hf_dirs, tmp_path, kind):
    torch_model, d = hf_dirs[kind]
    ours = load_pretrained(d)
    save_pretrained(ours, tmp_path)
    again = load_pretrained(tmp_path)
    assert again.config == ours.config
    a, b = flat_params(ours), flat_params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    # the tensors we write are transformers' own, less the mask token (pretraining only)
    theirs = read_safetensors_dir(d)
    assert "embeddings.mask_token" in theirs
    del theirs["embeddings.mask_token"]
    mine = read_safetensors_dir(tmp_path)
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    reloaded, info = transformers.Dinov2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reloaded.config.use_mask_token is False and reloaded.config.layerscale_value == 0.5
    _assert_matches(reloaded.eval(), ours, _pixels(21, 28))


def test_preprocessor_config_sets_input_size_and_normalisation(hf_dirs, tmp_path):
    """A BitImageProcessor's crop_size and mean / std: the tower runs at the crop's side with the
    28-px table interpolated (as DINOv2 runs at 224 px with its 518-px table); save -> load keeps
    it, and the preprocessor_config.json we write makes transformers' processor do what
    ImageSpec does."""
    torch_model, d = hf_dirs["mlp"]
    folder = tmp_path / "dino"
    shutil.copytree(d, folder)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "crop_size": {"height": 21, "width": 21},
        "size": {"shortest_edge": 24}, "image_mean": mean, "image_std": std, "resample": 3}))
    ours = load_pretrained(folder)
    cfg = ours.config
    assert (cfg.image_size, cfg.position_image_size, cfg.grid_size, cfg.position_grid_size) == (21, 28, 3, 4)
    assert cfg.image_mean == tuple(mean) and cfg.image_std == tuple(std)
    assert ours.embeddings.position_embedding.shape == (17, 32)     # 1 + 4*4: the table as saved
    _assert_matches(torch_model, ours, _pixels(21, 21))

    save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == 28
    assert load_pretrained(tmp_path / "out").config == cfg
    from mllm_jax.data.pipeline import ImageSpec
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    img = np.random.default_rng(2).integers(0, 256, (21, 21, 3), dtype=np.uint8)
    want = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ImageSpec.from_vision(cfg)(img), want, atol=1e-5, rtol=0)


def test_vision_teacher_is_dinov2_pooled_output(hf_dirs, tmp_path):
    """data.teacher_models.vision = a Dinov2Model folder: the ``vision`` teacher's row for an
    image segment is transformers' pooler_output (the final LayerNorm's CLS token),
    L2-normalised, on the teacher's preprocessed image (here 30 px -> the processor's 21 px);
    text segments get zeros."""
    from mllm_jax.data import sources
    from mllm_jax.data.schema import image_segment, text_segment
    torch_model, d = hf_dirs["mlp"]
    folder = tmp_path / "dino"
    shutil.copytree(d, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 21, "width": 21}}))
    teacher = sources.make_teacher("vision", DataConfig(teacher_models={"vision": str(folder)}), MLLMConfig())
    assert teacher.dim == 32 and teacher.spec.size == 21
    assert teacher.spec.mean == (0.485, 0.456, 0.406) and teacher.spec.std == (0.229, 0.224, 0.225)  # ImageNet
    img = np.random.default_rng(3).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    rows = teacher.embed([text_segment("a red circle"), image_segment(img)])
    x = teacher.spec(img)[None]
    with torch.no_grad():
        ref = torch_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.numpy()[0]
    np.testing.assert_allclose(rows[1], ref / np.linalg.norm(ref), atol=2e-5, rtol=0)
    assert not rows[0].any()


def test_image_classification_checkpoint_loads(tmp_path):
    """Dinov2ForImageClassification folders: ``dinov2.`` prefix stripped, classifier skipped."""
    torch_model = _dinov2(transformers.Dinov2ForImageClassification, num_labels=3)
    torch_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.hf_family == "dinov2_vision"
    _assert_matches(torch_model.dinov2, ours, _pixels(28, 28))


def test_unsupported_variants_name_the_folder_and_field(hf_dirs, tmp_path):
    torch.manual_seed(0)
    reg = tmp_path / "registers"
    transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **TINY, num_register_tokens=2)).save_pretrained(reg)
    with pytest.raises(ConfigError, match=rf"{reg}/config.json: .*'dinov2_with_registers'.*num_register_tokens=2"):
        load_pretrained(reg)

    _, d = hf_dirs["mlp"]
    nobias = tmp_path / "nobias"
    shutil.copytree(d, nobias)
    hf = json.loads((nobias / "config.json").read_text())
    (nobias / "config.json").write_text(json.dumps({**hf, "qkv_bias": False}))
    with pytest.raises(ConfigError, match=rf"{nobias}/config.json: .*qkv_bias=false"):
        load_pretrained(nobias)

    oblong = tmp_path / "oblong"
    shutil.copytree(d, oblong)
    (oblong / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 21, "width": 28}}))
    with pytest.raises(ConfigError, match=rf"{oblong}/preprocessor_config.json: crop_size=.* not square"):
        load_pretrained(oblong)

    dino = VisionConfig(variant="dinov2", image_size=28, patch_size=7, hidden_size=32, num_heads=4)
    with pytest.raises(ConfigError, match="teacher"):
        MLLMConfig(vision=dino)
    with pytest.raises(ConfigError, match="DINOv2 options"):
        VisionConfig(use_swiglu_ffn=True)


def test_preprocessor_normalize_and_rescale_flags(hf_dirs, tmp_path):
    """``do_normalize: false`` feeds ``x / 255`` as transformers' processor does (the mean / std
    were applied all the same); ``do_rescale: false`` or another ``rescale_factor``, which
    ImageSpec cannot do, is refused naming the file (it was silently scaled by 1/255)."""
    from mllm_jax.data.pipeline import ImageSpec
    _, d = hf_dirs["mlp"]
    folder = tmp_path / "dino"
    shutil.copytree(d, folder)
    base = {"image_processor_type": "BitImageProcessor", "do_center_crop": False, "size": {"height": 21, "width": 21},
            "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    pre = folder / "preprocessor_config.json"
    pre.write_text(json.dumps({**base, "do_normalize": False}))
    spec = ImageSpec.from_vision(load_pretrained(folder).config)
    proc = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    img = np.random.default_rng(4).integers(0, 256, (21, 21, 3), dtype=np.uint8)
    want = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(spec(img), want, atol=1e-6, rtol=0)
    for bad in ({"do_rescale": False}, {"rescale_factor": 1 / 127.5}):
        pre.write_text(json.dumps({**base, **bad}))
        with pytest.raises(ConfigError, match=rf"{pre}: do_rescale=.*rescale_factor=.* not supported"):
            load_pretrained(folder)
