"""DINOv2 vision towers against transformers' ``Dinov2Model`` (torch, float32) on tiny random
models built and saved here: forward parity at the config's size and at other sizes (the
position table resized bicubically, as transformers does), SwiGLU (giant), save -> load both
ways, ``preprocessor_config.json``, the ``vision`` teacher, and the refusals.

Every torch parameter is perturbed away from its init (LayerScale 0.5 everywhere, zero biases,
unit LayerNorms), the position table by a unit-variance draw so that its interpolation weighs
in the outputs.
"""
import dataclasses
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


IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
# facebook/dinov2-base's preprocessor_config.json, scaled down (shortest edge 256 -> 24, crop 224 -> 21)
RELEASED_PP = {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 24},
               "resample": 3, "do_center_crop": True, "crop_size": {"height": 21, "width": 21}, "do_rescale": True,
               "rescale_factor": 0.00392156862745098, "do_normalize": True, **IMAGENET, "do_convert_rgb": True}


def _bit_pixels(folder, img):
    """transformers' BitImageProcessor, PIL backend (BitImageProcessorPil), on a uint8 HWC image -> HWC."""
    proc = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert type(proc).__name__ == "BitImageProcessorPil"
    return proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def test_preprocessor_config_sets_input_size_and_normalisation(hf_dirs, tmp_path):
    """A BitImageProcessor's crop_size and mean / std: the tower runs at the crop's side with the
    28-px table interpolated (as DINOv2 runs at 224 px with its 518-px table); save -> load keeps
    it, and the preprocessor_config.json we write makes transformers' processor do what
    ImageSpec does (transformers' PIL backend, BitImageProcessorPil)."""
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
    assert (cfg.resize_shortest_edge, cfg.resample) == (24, "bicubic")
    assert ours.embeddings.position_embedding.shape == (17, 32)     # 1 + 4*4: the table as saved
    _assert_matches(torch_model, ours, _pixels(21, 21))

    save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == 28
    assert load_pretrained(tmp_path / "out").config == cfg
    from mllm_jax.data.pipeline import ImageSpec
    written = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": 24} and written["crop_size"] == {"height": 21, "width": 21}
    assert written["do_center_crop"] is True and written["resample"] == 3
    for shape in [(21, 21, 3), (30, 40, 3), (41, 30, 3)]:
        img = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(ImageSpec.from_vision(cfg)(img), _bit_pixels(tmp_path / "out", img))
    # a stretch config (what folders saved before the fields hold) round-trips too
    stretch = dataclasses.replace(cfg, resize_shortest_edge=None, resample="bilinear")
    ours2 = load_pretrained(folder, config_overrides=dict(resize_shortest_edge=None, resample="bilinear"))
    save_pretrained(ours2, tmp_path / "out2")
    assert load_pretrained(tmp_path / "out2").config == stretch


@pytest.mark.parametrize("shape", [(30, 40, 3), (41, 30, 3)])
def test_vision_teacher_is_dinov2_pooled_output(hf_dirs, tmp_path, shape):
    """data.teacher_models.vision = a Dinov2Model folder with a released-like (scaled-down)
    preprocessor_config.json: the ``vision`` teacher prepares a non-square image exactly as
    transformers' BitImageProcessor does (shorter edge to 24, bicubic; central 21 crop; ImageNet's
    mean / std), and its row for the image is transformers' pooler_output on those pixels,
    L2-normalised; text segments get zeros. The old stretch to 21 px is far from it."""
    from mllm_jax.data import sources
    from mllm_jax.data.pipeline import ImageSpec
    from mllm_jax.data.schema import image_segment, text_segment
    torch_model, d = hf_dirs["mlp"]
    folder = tmp_path / "dino"
    shutil.copytree(d, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(RELEASED_PP))
    teacher = sources.make_teacher("vision", DataConfig(teacher_models={"vision": str(folder)}), MLLMConfig())
    assert teacher.dim == 32 and teacher.spec == ImageSpec(21, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                                           shortest_edge=24, resample="bicubic")
    img = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    want = _bit_pixels(folder, img)
    np.testing.assert_array_equal(teacher.spec(img), want)
    stretched = dataclasses.replace(teacher.spec, shortest_edge=None, resample="bilinear")(img)
    assert np.abs(stretched - want).max() > 0.5
    rows = teacher.embed([text_segment("a red circle"), image_segment(img)])
    with torch.no_grad():
        ref = torch_model(pixel_values=torch.from_numpy(want[None]).permute(0, 3, 1, 2)).pooler_output.numpy()[0]
    np.testing.assert_allclose(rows[1], ref / np.linalg.norm(ref), atol=2e-5, rtol=0)
    assert not rows[0].any()

    # the same folder without the file: the stretch to the model's 28 px, as before
    plain = sources.make_teacher("vision", DataConfig(teacher_models={"vision": str(d)}), MLLMConfig())
    assert plain.spec.size == 28 and plain.spec.shortest_edge is None and plain.spec.resample == "bilinear"
    assert plain.fingerprint() != teacher.fingerprint()


@pytest.mark.parametrize("processor", ["CLIPImageProcessorPil", "BitImageProcessorPil"])
@pytest.mark.parametrize("pp", [
    {"size": {"shortest_edge": 24}, "crop_size": {"height": 21, "width": 21}, "resample": 3},  # released, scaled
    {"size": 24, "crop_size": 21},                      # ints; class defaults (bicubic, CLIP's mean / std)
    {"size": {"shortest_edge": 21}, "crop_size": 21, "resample": 2, **IMAGENET},   # as CLIP's: edge == crop
    {"size": {"shortest_edge": 17}, "crop_size": 21, "resample": 3},   # resized smaller than the crop: padded
    {"size": {"height": 21, "width": 21}, "do_center_crop": False, "resample": 3},      # a (bicubic) stretch
    {"size": {"height": 21, "width": 21}, "do_center_crop": False, "do_normalize": False},
])
def test_image_spec_is_transformers_pil_processor(processor, pp):
    """ImageSpec from a config read from a preprocessor_config.json gives transformers'
    CLIPImageProcessor / BitImageProcessor (PIL backend) pixel_values on non-square, square,
    small and grey images: bit for bit with a shortest-edge resize, to float32 rounding for
    the stretch (ImageSpec scales by 1/255 in float32 there, as it always did)."""
    from mllm_jax.convert.families._preprocess import vision_from_hf
    from mllm_jax.data.pipeline import ImageSpec
    cfg = vision_from_hf(VisionConfig(variant="dinov2", image_size=28, patch_size=7), pp, "pp", resizable_table=True)
    assert cfg.image_size == 21 and cfg.position_image_size == 28
    spec, proc = ImageSpec.from_vision(cfg), getattr(transformers, processor)(**pp)
    rng = np.random.default_rng(5)
    for shape in [(30, 40, 3), (41, 30, 3), (21, 21, 3), (10, 50, 3), (33, 27, 1)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        want = proc(img if shape[-1] == 3 else np.repeat(img, 3, -1),
                    return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = spec(img)
        assert got.shape == want.shape == (21, 21, 3), shape
        if cfg.resize_shortest_edge is None:
            np.testing.assert_allclose(got, want, atol=5e-7, rtol=0, err_msg=str(shape))
        else:
            np.testing.assert_array_equal(got, want, err_msg=str(shape))


def test_configs_without_the_fields_stretch_as_before():
    """A VisionConfig that sets neither field: the whole image stretched to image_size (PIL
    bilinear), x * float32(1/255), normalised: the code ImageSpec had before the fields."""
    from PIL import Image
    from mllm_jax.data.pipeline import ImageSpec
    cfg = VisionConfig()
    assert (cfg.resize_shortest_edge, cfg.resample) == (None, "bilinear")
    spec = ImageSpec.from_vision(cfg)
    for shape in [(30, 40, 3), (41, 30, 3), (32, 32, 3)]:
        img = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
        x = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR)) if shape[:2] != (32, 32) else img
        want = (x.astype(np.float32) * np.float32(1 / 255) - np.asarray(cfg.image_mean, np.float32)) \
            / np.asarray(cfg.image_std, np.float32)
        np.testing.assert_array_equal(spec(img), want)


def test_preprocessor_fields_are_validated_and_refusals_name_the_key():
    from mllm_jax.convert.families._preprocess import vision_from_hf
    with pytest.raises(ConfigError, match="vision.resample: 'lanczos'"):
        VisionConfig(resample="lanczos")
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="vision.resize_shortest_edge"):
            VisionConfig(resize_shortest_edge=bad)
    cfg = VisionConfig(variant="dinov2", image_size=28, patch_size=7)
    for pp, msg in [({"do_resize": False}, "do_resize=false"),
                    ({"size": {"shortest_edge": 24, "longest_edge": 40}}, "longest_edge"),
                    ({"size": {"height": 28, "width": 28}, "crop_size": 21}, "stretch to 28 px.*21-px centre crop"),
                    ({"size": {"shortest_edge": 24}, "do_center_crop": False}, "non-square"),
                    ({"size": 24, "crop_size": 21, "resample": 1}, r"resample=1 \(lanczos\)"),
                    ({"size": 24, "crop_size": 20}, "multiple of patch_size")]:
        with pytest.raises(ConfigError, match=rf"^pp: .*{msg}"):
            vision_from_hf(cfg, pp, "pp", resizable_table=True)
    with pytest.raises(ConfigError, match="differs from the tower's image_size=28"):
        vision_from_hf(VisionConfig(image_size=28, patch_size=7), {"size": 24, "crop_size": 21}, "pp",
                       resizable_table=False)


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
