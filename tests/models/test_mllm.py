"""The MLLM against transformers' LlavaForConditionalGeneration (two images in one sequence,
padding), image-slot errors, soft prompts, pooling, conversion round trip and generation."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mllm_jax.config import LoRAConfig, MLLMConfig, ProjectorConfig
from mllm_jax.convert.hf import CheckpointMismatchError, flat_params, load_pretrained, save_pretrained
from mllm_jax.models.mllm import MLLM, ImageSlotError, slice_embeddings
from mllm_jax.models.pooling import last_token_pool, mean_pool, slice_pool

IMG = 99          # image token id
K = 16            # tokens per image: (16 px / 4 px)^2 patches, CLS dropped


def _hf_llava(seed=0, tie=False):
    torch.manual_seed(seed)
    vis = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=16, patch_size=4)
    txt = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tie, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vis.to_dict(), text_config=txt.to_dict(), image_token_index=IMG,
                                   image_seq_length=K, vision_feature_layer=-2, tie_word_embeddings=tie)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # move every tensor off its init so a swapped mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "class_embedding" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
    return model


def _batch(seed=0):
    """Row 0: text <img> text <img> text (2 images); row 1: <img> text then right padding (1 image)."""
    rng = np.random.default_rng(seed)
    t = 3 + K + 4 + K + 3
    ids = rng.integers(5, 90, (2, t)).astype(np.int32)
    ids[0, 3:3 + K] = IMG
    ids[0, 7 + K:7 + 2 * K] = IMG
    ids[1, :K] = IMG
    mask = np.ones((2, t), np.int32)
    mask[1, K + 6:] = 0
    ids[1, K + 6:] = 0
    pix = rng.normal(size=(2, 2, 16, 16, 3)).astype(np.float32)
    image_mask = np.array([[True, True], [True, False]])
    return ids, mask, pix, image_mask


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = _hf_llava()
    d = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(d)
    return hf, load_pretrained(d), d


def test_llava_parity_two_images_in_one_sequence(pair):
    hf, ours, _ = pair
    ids, mask, pix, image_mask = _batch()
    hf_pix = torch.tensor(np.concatenate([pix[0], pix[1, :1]]).transpose(0, 3, 1, 2))  # images in order, NCHW
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 pixel_values=hf_pix, output_hidden_states=True)
    out = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix),
               image_mask=jnp.asarray(image_mask), output_hidden_states=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy()[real], atol=1e-4, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(a)[real], b.numpy()[real], atol=1e-4, rtol=0)
    # the padding image row is ignored: changing it changes nothing
    pix2 = pix.copy()
    pix2[1, 1] = 100.0
    out2 = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix2),
                image_mask=jnp.asarray(image_mask))
    np.testing.assert_array_equal(np.asarray(out2.logits), np.asarray(out.logits))


def test_image_slot_errors(pair):
    _, ours, _ = pair
    ids, mask, pix, image_mask = _batch()
    with pytest.raises(ImageSlotError, match="sample 1: 1 <image> slots but only 0 images"):
        ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix),
             image_mask=np.array([[True, True], [False, False]]))
    with pytest.raises(ImageSlotError, match="sample 1: 2 images given but only 1 <image> slots"):
        ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix))
    bad = ids.copy()
    bad[0, 3] = 7
    with pytest.raises(ImageSlotError, match="sample 0: 31 image tokens is not a multiple of tokens_per_image=16"):
        ours(jnp.asarray(bad), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix),
             image_mask=jnp.asarray(image_mask))


def test_generate_without_images_for_a_prompt_with_image_slots_is_refused(pair):
    """As the forward pass does: the slots would otherwise be decoded from token 0's embedding."""
    _, ours, _ = pair
    ids, mask, _, _ = _batch()
    with pytest.raises(ImageSlotError, match="sample 0: 2 <image> slots but only 0 images given"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, stop_tokens=())


def test_save_load_roundtrip_and_transformers_reads_ours(pair, tmp_path):
    hf, ours, src = pair
    save_pretrained(ours, tmp_path / "out")
    again = load_pretrained(tmp_path / "out")
    a, b = flat_params(ours), flat_params(again)
    assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    sd_ref, sd_back = hf.state_dict(), back.state_dict()
    assert sd_ref.keys() == sd_back.keys()
    for k in sd_ref:
        assert torch.equal(sd_ref[k], sd_back[k]), k
    # a missing tensor is named
    from safetensors.numpy import load_file, save_file
    t = load_file(str(src / "model.safetensors"))
    gone = "multi_modal_projector.linear_2.bias"
    del t[gone]
    (tmp_path / "bad").mkdir()
    save_file(t, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError, match=r"missing: +multi_modal_projector\.linear_2\.bias"):
        load_pretrained(tmp_path / "bad")


def test_generation_matches_transformers(pair):
    hf, ours, _ = pair
    ids, mask, pix, image_mask = _batch(1)
    # one prompt per row, left-padded for transformers: row 1 without its right padding
    n1 = int(mask[1].sum())
    left_ids = np.zeros_like(ids)
    left_mask = np.zeros_like(mask)
    left_ids[0], left_mask[0] = ids[0], 1
    left_ids[1, -n1:], left_mask[1, -n1:] = ids[1, :n1], 1
    hf_pix = torch.tensor(np.concatenate([pix[0], pix[1, :1]]).transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(left_ids, dtype=torch.long), attention_mask=torch.tensor(left_mask),
                          pixel_values=hf_pix, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_new = ref[:, left_ids.shape[1]:].numpy()
    for p_ids, p_mask in ((left_ids, left_mask), (ids, mask)):  # left- and right-padded prompts
        out = ours.generate(p_ids, attention_mask=p_mask, pixel_values=pix, image_mask=image_mask,
                            max_new_tokens=8, stop_tokens=())
        np.testing.assert_array_equal(np.asarray(out.tokens), ref_new)


def test_soft_prompts_lora_and_pool_adapter_build():
    cfg = MLLMConfig(projector=ProjectorConfig(kind="pool", pool_size=2), num_soft_prompts=3,
                     lora=LoRAConfig(rank=2, target=r"decoder\..*(q_proj|v_proj)$"))
    m = MLLM(cfg, rngs=nnx.Rngs(0))
    assert cfg.tokens_per_image == 4
    sp = cfg.soft_prompt_token_id
    ids = np.array([[5, sp, sp, sp, 9, 10], [5, 7, sp, sp, sp, 9]], np.int32)
    emb = np.asarray(m.embed_inputs(jnp.asarray(ids)))
    table = np.asarray(m.soft_prompt.embedding[...])
    np.testing.assert_array_equal(emb[0, 1:4], table)
    np.testing.assert_array_equal(emb[1, 2:5], table)
    np.testing.assert_array_equal(emb[0, 0], np.asarray(m.decoder.embed_tokens.embedding[...])[5])
    # soft prompts receive gradients
    def loss(model):
        return jnp.sum(model(jnp.asarray(ids)).logits ** 2)
    g = nnx.jit(nnx.grad(loss))(m)   # one compile, not op by op
    assert float(jnp.abs(g.soft_prompt.embedding[...]).sum()) > 0
    assert m.decoder.layers[0].self_attn.q_proj.lora is not None


def test_an_export_transformers_has_no_class_for_leaves_no_folder(tmp_path):
    """save_pretrained of a pool-adapter MLLM (HF has none) is refused; it made the output
    folder first and left it empty."""
    from mllm_jax.config import ConfigError
    from mllm_jax.convert.hf import save_pretrained
    m = MLLM(MLLMConfig(projector=ProjectorConfig(kind="pool", pool_size=2)), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="pool-adapter"):
        save_pretrained(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pooling_hand_computed():
    h = jnp.arange(2 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 2)
    mask = jnp.array([[1, 1, 0, 0], [0, 1, 1, 1]])
    np.testing.assert_allclose(np.asarray(mean_pool(h, mask)), [[1, 2], [12, 13]])
    np.testing.assert_allclose(np.asarray(last_token_pool(h, mask)), [[2, 3], [14, 15]])
    # slices: row 0 = image slice {0,1} and text slice {2,3}; row 1 = one text slice {1,2}
    sid = jnp.array([[1, 1, 2, 2], [0, 1, 1, 0]])
    is_img = jnp.array([[True, False, False], [False, False, False]])
    out = np.asarray(slice_pool(h, sid, is_img, 3))
    np.testing.assert_allclose(out[0], [[1, 2], [6, 7], [0, 0]])
    np.testing.assert_allclose(out[1], [[12, 13], [0, 0], [0, 0]])


def test_slice_embeddings_from_forward(pair):
    _, ours, _ = pair
    ids, mask, pix, image_mask = _batch()
    out = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix),
               image_mask=jnp.asarray(image_mask))
    sid = np.zeros_like(ids)
    sid[0, 3:3 + K] = 1
    sid[0, 3 + K:7 + K] = 2
    e = slice_embeddings(out, jnp.asarray(sid), jnp.array([[True, False], [False, False]]), 2)
    h = np.asarray(out.last_hidden_state)
    np.testing.assert_allclose(np.asarray(e[0, 0]), h[0, 3:3 + K].mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(e[0, 1]), h[0, 6 + K], atol=1e-6)


def test_llava_tied_only_at_the_top_level_loads_tied(tmp_path):
    """transformers ties the LM head when the top-level LlavaConfig says so, whatever text_config
    says, and then saves no lm_head: ours loads it tied (it failed, lm_head missing) with the same
    logits."""
    model = _hf_llava(seed=2)
    cfg = model.config
    cfg.tie_word_embeddings, cfg.text_config.tie_word_embeddings = True, False
    tied = transformers.LlavaForConditionalGeneration(cfg).eval()
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.decoder.tie_word_embeddings
    ids, mask, pix, image_mask = _batch()
    with torch.no_grad():
        ref = tied(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   pixel_values=torch.tensor(pix[image_mask]).permute(0, 3, 1, 2)).logits.numpy()
    out = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix),
               image_mask=jnp.asarray(image_mask)).logits
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-4, rtol=0)


def test_padding_image_before_a_real_one_is_refused(pair):
    """The k-th <image> slot takes image k: a padding image (mask False) before a real one would
    put the padding into the slot silently."""
    _, ours, _ = pair
    ids, mask, pix, image_mask = _batch()
    one = ids.copy()
    one[1] = np.where(one[1] == IMG, 5, one[1])             # sample 1: no slots
    one[0, np.flatnonzero(ids[0] == IMG)[:K]] = 5           # sample 0: one slot
    with pytest.raises(ImageSlotError, match=r"samples \[0\]: image_mask has a padding image before a real one"):
        ours(jnp.asarray(one), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pix),
             image_mask=np.array([[False, True], [False, False]]))


def test_generation_in_train_mode_with_lora_dropout():
    """A model in train mode (as built or restored) with LoRA dropout generates, deterministically
    (decoding runs in eval mode; it raised a TraceContextError), the same tokens as in eval mode."""
    cfg = MLLMConfig(lora=LoRAConfig(rank=4, alpha=8, dropout=0.5, target=r"decoder\..*(q_proj|v_proj)$"))
    model = MLLM(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    for _, m in nnx.iter_modules(model):
        if getattr(m, "lora", None) is not None:
            m.lora.b[...] = 0.5 * jnp.ones_like(m.lora.b[...])
    ids = np.full((2, 5), 7, np.int32)
    model.train()
    a = np.asarray(model.generate(ids, max_new_tokens=3, stop_tokens=()).tokens)
    model.eval()
    b = np.asarray(model.generate(ids, max_new_tokens=3, stop_tokens=()).tokens)
    np.testing.assert_array_equal(a, b)


def test_siglip_llava_export_runs_in_transformers(tmp_path):
    """A SigLIP tower has no CLS token, so every patch feeds the projector; transformers'
    'default' strategy drops hidden state 0 whatever it is, so the export says 'full' (it said
    'default', and transformers refused: 16 image tokens, 15 features each). Loading a SigLIP
    LLaVA whose config says 'default' is refused (this model cannot drop a patch)."""
    from mllm_jax.config import ConfigError, DecoderConfig, VisionConfig
    cfg = MLLMConfig(vision=VisionConfig(variant="siglip", image_size=16, patch_size=4, hidden_size=32, num_heads=2,
                                         intermediate_size=48, hidden_act="gelu_pytorch_tanh"),
                     decoder=DecoderConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_heads=4,
                                           num_kv_heads=2), image_token_id=IMG)
    ours = MLLM(cfg, rngs=nnx.Rngs(0))
    save_pretrained(ours, tmp_path)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    k = cfg.tokens_per_image
    ids = np.full((1, k + 4), 7, np.int32)
    ids[0, 2:2 + k] = IMG
    pix = np.random.default_rng(0).normal(size=(1, 1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 pixel_values=torch.tensor(pix[:, 0].transpose(0, 3, 1, 2))).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pix)).logits)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    again = load_pretrained(tmp_path)
    assert again.config.tokens_per_image == k
    with pytest.raises(ConfigError, match="SigLIP"):
        MLLMConfig.from_hf({**hf.config.to_dict(), "vision_feature_select_strategy": "default"})


def test_llava_folder_prepares_images_as_its_processor(pair, tmp_path):
    """A LLaVA folder's preprocessor_config.json (the CLIPImageProcessor LlavaProcessor holds:
    shorter edge, bicubic, centre crop) sets how ImageSpec prepares images; they were stretched
    to the tower's size. An oblong photo prepared by each side gives the same logits, and the file
    save_pretrained writes loads in transformers as the same processor."""
    import shutil

    from mllm_jax.data.pipeline import ImageSpec
    hf, _, src = pair
    folder = tmp_path / "llava"
    shutil.copytree(src, folder)
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size=16)
    proc.save_pretrained(folder)
    ours = load_pretrained(folder)
    assert (ours.config.vision.resize_shortest_edge, ours.config.vision.resample) == (20, "bicubic")
    spec = ImageSpec.from_vision(ours.config.vision)
    img = np.random.default_rng(4).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    want = proc(img, return_tensors="np")["pixel_values"]                       # [1, 3, 16, 16]
    np.testing.assert_array_equal(spec(img), want[0].transpose(1, 2, 0))
    ids = np.full((1, K + 4), 7, np.int32)
    ids[0, 2:2 + K] = IMG
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(want)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(spec(img)[None, None])).logits)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    save_pretrained(ours, tmp_path / "out")
    again = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out", local_files_only=True, backend="pil")
    np.testing.assert_array_equal(again(img, return_tensors="np")["pixel_values"], want)
    assert load_pretrained(tmp_path / "out").config.vision == ours.config.vision
    assert ImageSpec.from_vision(load_pretrained(src).config.vision).shortest_edge is None   # no file: stretch
