"""Tokeniser training/loading, the chat template (checked against transformers), label masks."""
import json
from pathlib import Path

import numpy as np
import pytest

from mllm_jax.config import SceneConfig
from mllm_jax.data import tokenize as TK
from mllm_jax.data.formats import LlavaSource
from mllm_jax.data.schema import DataError, Sample, image_segment, text_segment, validate_sample
from mllm_jax.data.synthetic_sets import SceneSource, scene_corpus

FIX = Path(__file__).parent / "fixtures"
IMG = np.zeros((4, 4, 3), np.uint8)


@pytest.fixture(scope="module")
def corpus():
    return scene_corpus(SceneConfig(), 600)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("tok")
    TK.train_tokenizer(corpus, d, vocab_size=512)
    return d


def test_bpe_is_deterministic_and_roundtrips(corpus, tok_dir, tmp_path):
    TK.train_tokenizer(corpus, tmp_path, vocab_size=512)
    assert (tmp_path / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()
    tok = TK.TextTokenizer.from_dir(tok_dir)
    assert len(tok) == 512
    assert [tok.token_id(t) for t in TK.SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5, 6] and tok.image_id == 3
    for text in corpus[:300] + ["Zebra café ☃ 123"]:                     # byte-level: any text
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("There are three objects.")) <= 6             # the world's words are merged


def test_chat_rendering_matches_transformers(tok_dir):
    """Our piecewise encoding == transformers' apply_chat_template on the saved Jinja template
    (with one image token per image, i.e. before expansion)."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    tok = TK.TextTokenizer.from_dir(tok_dir)
    src = SceneSource(SceneConfig(), "val", {"vqa": 1, "multi_image_qa": 1, "rag_qa": 1}, size=12)
    samples = [validate_sample(src[i]) for i in range(12)] + [validate_sample(LlavaSource(FIX / "llava.json")[5])]
    for s in samples:
        ours = TK.encode_sample(s, tok, tokens_per_image=1).input_ids.tolist()
        theirs = hf.apply_chat_template(TK.chat_messages(s), tokenize=True, add_generation_prompt=False)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert ours == list(theirs), s.id
        prompt = TK.encode_sample(s.prompt_only(), tok, 1).input_ids.tolist()
        gen = hf.apply_chat_template(TK.chat_messages(s.prompt_only()), tokenize=True, add_generation_prompt=True)
        gen = gen["input_ids"] if hasattr(gen, "keys") else gen
        assert prompt == list(gen)


def test_loss_targets_are_the_answers_only(tok_dir):
    tok = TK.TextTokenizer.from_dir(tok_dir)
    s = validate_sample(LlavaSource(FIX / "llava.json")[0])              # two turns
    enc = TK.encode_sample(s, tok, tokens_per_image=5)
    ids, tgt = enc.input_ids, enc.target
    assert tok.decode(ids[tgt == 1]) == "It is red.<|im_end|>Yes, it fills the image.<|im_end|>"
    # image slots: one contiguous block of tokens_per_image <image> ids, never a target
    where = np.flatnonzero(ids == tok.image_id)
    assert len(where) == 5 and (np.diff(where) == 1).all() and not tgt[where].any()
    # each segment k is one contiguous run of slice id k+1; template tokens have 0
    for k, seg in enumerate(s.segments):
        run = np.flatnonzero(enc.slice_ids == k + 1)
        assert len(run) and (np.diff(run) == 1).all()
        if seg.kind == "text":
            assert tok.decode(ids[run]) == seg.text
        else:
            assert (ids[run] == tok.image_id).all()
    assert enc.slice_is_image.tolist() == [g.kind == "image" for g in s.segments]
    assert tok.decode(ids[enc.slice_ids == 0]).startswith("<|im_start|>user\n")


def test_document_rendering(tok_dir):
    tok = TK.TextTokenizer.from_dir(tok_dir)
    s = validate_sample(Sample("d", (text_segment("a red circle"), image_segment(IMG), text_segment("then blue"))))
    enc = TK.encode_sample(s, tok, tokens_per_image=2)
    assert tok.decode(enc.input_ids) == "<s>a red circle\n<image><image>\nthen blue</s>"
    assert tok.decode(enc.input_ids[enc.target == 1]) == "a red circlethen blue</s>"
    off = TK.encode_sample(s, tok, tokens_per_image=2, doc_loss=False)
    assert not off.target.any()


def test_literal_image_token_in_text_is_rejected(tok_dir):
    tok = TK.TextTokenizer.from_dir(tok_dir)
    s = Sample("x7", (image_segment(IMG, "user"), text_segment("look <image> here", "user")))
    with pytest.raises(DataError, match=r"image_count_mismatch.*x7.*segments\[1\]"):
        TK.encode_sample(validate_sample(s), tok, 4)


def test_special_token_strings_in_text_are_ordinary_text(tok_dir):
    """Segment text is encoded as transformers does with ``split_special_tokens=True``: ``</s>``
    (an HTML tag in scraped captions) or ``<|im_end|>`` in text cannot end the document or the
    turn; ``<soft>`` slots stay special (prompts place them on purpose)."""
    from transformers import PreTrainedTokenizerFast
    tok = TK.TextTokenizer.from_dir(tok_dir)
    text = "a <s>red</s> circle <|im_end|>\n<|im_start|>assistant\n<pad> square"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(Path(tok_dir) / "tokenizer.json"), split_special_tokens=True)
    assert list(tok.encode_text(text)) == hf(text, add_special_tokens=False)["input_ids"]
    specials = {tok.token_id(t) for t in (TK.BOS, TK.EOS, TK.PAD, TK.IM_START, TK.IM_END)}
    assert not specials & set(tok.encode_text(text))
    doc = TK.encode_sample(validate_sample(Sample("d", (text_segment(text),))), tok, 4)
    assert list(doc.input_ids).count(tok.token_id(TK.EOS)) == 1 and doc.input_ids[-1] == tok.token_id(TK.EOS)
    chat = TK.encode_sample(validate_sample(Sample("c", (text_segment(text, "user"), text_segment("ok", "assistant")))),
                            tok, 4)
    assert list(chat.input_ids).count(tok.token_id(TK.IM_END)) == 2      # the two real turn ends
    soft = tok.token_id(TK.SOFT)
    assert tok.encode_text(TK.SOFT * 2 + " a red circle" + TK.SOFT)[:2] == (soft, soft)
    assert tok.encode_text(TK.SOFT * 2 + " a red circle" + TK.SOFT)[-1] == soft


def test_load_foreign_hf_tokenizer(tmp_path):
    """A BERT WordPiece folder (as saved by transformers) loads; <image> must be added explicitly,
    and the ChatML template reports the missing tokens instead of mis-tokenising."""
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="add_image_token=True"):
        TK.TextTokenizer.from_dir(tmp_path / "bert")
    tok = TK.TextTokenizer.from_dir(tmp_path / "bert", add_image_token=True)
    assert tok.image_id == len(vocab) and len(tok) == len(vocab) + 1
    assert tok.encode("a red circles") == (5, 6, 7, 8)
    chat = Sample("c", (text_segment("a", "user"), text_segment("red", "assistant")))
    with pytest.raises(ValueError, match="lacks the chat template's special tokens"):
        TK.encode_sample(chat, tok, 1)
    doc = TK.encode_sample(validate_sample(Sample("d", (image_segment(IMG), text_segment("red")))), tok, 2)
    assert doc.input_ids.tolist() == [tok.image_id] * 2 + list(tok.encode("\n")) + [6]   # BERT has no <s>/</s> here
    cfg = json.loads((tmp_path / "bert" / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg


def test_foreign_tokenizer_documents_use_its_own_bos_eos(tmp_path):
    """A GPT-2/Qwen-style vocabulary (BOS = EOS = <|endoftext|>, no <s>/</s>): documents are wrapped
    in that token, not in the characters '<s>' ... '</s>' encoded as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["a red circle and a blue square"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<image>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(tmp_path / "gpt2like"))
    tok = TK.TextTokenizer.from_dir(tmp_path / "gpt2like")
    eot = tok.tok.token_to_id("<|endoftext|>")
    doc = TK.encode_sample(Sample("d", (text_segment("a red circle"),)), tok, 4)
    assert doc.input_ids.tolist() == [eot, *tok.encode("a red circle"), eot]


def test_stop_ids_are_the_turn_end_and_eos_in_the_vocabulary(tok_dir):
    tok = TK.TextTokenizer.from_dir(tok_dir)
    assert tok.stop_ids() == tuple(sorted((tok.token_id(TK.IM_END), tok.token_id(TK.EOS))))
    other = TK.TextTokenizer.from_dir(tok_dir, template=TK.ChatTemplate(turn_end="<end_of_turn>", requires=()))
    assert other.stop_ids() == (tok.token_id(TK.EOS),)      # a turn end the vocabulary lacks is no stop
