"""`python -m mllm_jax generate --hf DIR`: same text as transformers' generate on the same dir."""
import pytest
import torch
import transformers

from mllm_jax import generate_cli
from mllm_jax.data.tokenize import train_tokenizer


def _tiny_llama(path, seed: int):
    """A tokenizer trained into ``path`` and a random tiny Llama of its vocabulary (not saved)."""
    tok = train_tokenizer(["a red circle left of a blue square", "two green triangles", "is there a cross?"] * 20,
                          path, vocab_size=300, min_frequency=1)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return hf


def test_generate_cli_matches_transformers(tmp_path, capsys):
    hf = _tiny_llama(tmp_path, seed=0)
    hf.save_pretrained(tmp_path)
    prompts = ["a red circle", "is there a blue"]
    assert generate_cli.main(["--hf", str(tmp_path), "--max-new-tokens", "6"]
                             + sum((["--prompt", p] for p in prompts), [])) == 0
    printed = capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = []
    for p in prompts:
        ids = torch.tensor([hf_tok(p)["input_ids"]])
        out = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=hf_tok.eos_token_id)
        expected.append(hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert printed == "".join(e + "\n" for e in expected)


def test_generate_cli_stops_on_generation_config_eos_ids(tmp_path, capsys):
    """An HF dir whose generation_config.json lists several eos ids (Llama-3 style): the CLI stops
    on each, as transformers' generate does (it stopped on the tokenizer's EOS only)."""
    hf = _tiny_llama(tmp_path, seed=1)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([hf_tok("a red circle")["input_ids"]])
    free = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
    eos = [hf_tok.eos_token_id, int(free[1])]
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = eos, 0
    hf.save_pretrained(tmp_path)
    assert generate_cli.main(["--hf", str(tmp_path), "--max-new-tokens", "6", "--prompt", "a red circle"]) == 0
    out = hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] - ids.shape[1] <= 2
    assert capsys.readouterr().out == hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_run_prompts_are_rendered_as_training_renders_samples(tmp_path):
    """``--run`` prompts: a document starts with the tokenizer's BOS, then the image slots, the
    separator and the text, and stops before the end-of-document token; ``--chat`` puts the
    images and text inside the user turn, then the assistant header (built here by hand from the
    template's pieces)."""
    import numpy as np

    tok = train_tokenizer(["a red circle left of a blue square", "describe the image"] * 20, tmp_path,
                          vocab_size=300, min_frequency=1)
    t, img, k = tok.template, np.zeros((8, 8, 3), np.uint8), 4
    text = list(tok.encode("describe the image"))
    slots = [tok.image_id] * k + list(tok.encode(t.separator))
    doc, chat = (generate_cli.run_prompt_ids(tok, k, ["describe the image"], [img], chat=c)[0] for c in (False, True))
    assert doc == list(tok.encode(t.doc_start)) + slots + text
    assert chat == (list(tok.encode(t.turn_start.format(role="user"))) + slots + text + list(tok.encode(t.turn_end))
                    + list(tok.encode(t.after_turn)) + list(tok.encode(t.turn_start.format(role="assistant"))))
    assert generate_cli.run_prompt_ids(tok, k, ["describe the image"])[0] == list(tok.encode(t.doc_start)) + text


def test_hf_mllm_images_go_in_front_of_each_prompt(monkeypatch):
    """``--hf`` with a LLaVA model and ``--image``: each prompt's real ids get ``tokens_per_image``
    ``<image>`` ids per image in front, rows left-padded again (ids here by hand)."""
    import types

    import numpy as np

    pix = np.zeros((1, 4, 4, 3), np.float32)
    monkeypatch.setattr(generate_cli, "_pixels", lambda model, images: pix)
    seen = {}
    model = types.SimpleNamespace(config=types.SimpleNamespace(tokens_per_image=2, image_token_id=7),
                                  generate=lambda ids, **kw: seen.update(ids=ids, **kw) or "out")
    ids = np.array([[0, 5, 6], [9, 10, 11]], np.int32)
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    assert generate_cli._generate_mllm(model, ids, mask, ["a.png"], {"max_new_tokens": 3}) == "out"
    np.testing.assert_array_equal(seen["ids"], [[0, 7, 7, 5, 6], [7, 7, 9, 10, 11]])
    np.testing.assert_array_equal(seen["attention_mask"], [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert seen["pixel_values"].shape == (2, 1, 4, 4, 3) and seen["max_new_tokens"] == 3


def test_hf_mllm_image_marks_in_a_prompt_are_expanded_where_they_stand(monkeypatch):
    """A LLaVA prompt written as LLaVA's format writes it ("USER: <image>\n... ASSISTANT:"): its
    <image> id (7 here) becomes tokens_per_image slots in place, as LlavaProcessor expands it;
    the number of marks must be the number of images."""
    import types

    import numpy as np

    pix = np.zeros((2, 4, 4, 3), np.float32)
    monkeypatch.setattr(generate_cli, "_pixels", lambda model, images: pix)
    seen = {}
    model = types.SimpleNamespace(config=types.SimpleNamespace(tokens_per_image=2, image_token_id=7),
                                  generate=lambda ids, **kw: seen.update(ids=ids, **kw) or "out")
    ids = np.array([[1, 5, 7, 6, 7, 8]], np.int32)
    mask = np.ones_like(ids)
    generate_cli._generate_mllm(model, ids, mask, ["a.png", "b.png"], {})
    np.testing.assert_array_equal(seen["ids"], [[1, 5, 7, 7, 6, 7, 7, 8]])
    with pytest.raises(SystemExit, match="--prompt 1 holds 2 <image> marks but 1 --image files"):
        generate_cli._generate_mllm(model, ids, mask, ["a.png"], {})


def test_a_negative_temperature_is_refused(capsys):
    """--temperature -0.5 decoded greedily without a word (do_sample was temperature > 0)."""
    from mllm_jax.generate_cli import main
    with pytest.raises(SystemExit) as e:
        main(["--hf", "nowhere", "--prompt", "x", "--temperature", "-0.5"])
    assert e.value.code == 2 and "--temperature -0.5: must be >= 0 (0 = greedy)" in capsys.readouterr().err
