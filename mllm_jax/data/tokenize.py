"""Tokenisation: an offline byte-level BPE, any local HF tokenizer, the chat template, and
``encode_sample`` (a ``Sample`` -> token ids with image slots, loss targets and slice ids).

    tok = train_tokenizer(scene_corpus(SceneConfig()), "out/tokenizer", vocab_size=512)
    tok = TextTokenizer.from_dir("out/tokenizer")            # or any HF dir with tokenizer.json
    enc = encode_sample(sample, tok, tokens_per_image=64)

Rendering (ChatML, the format of SmolLM2/Qwen2 instruct models):

    conversation:  <|im_start|>user\\n{seg}\\n{seg}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
                   (a conversation ending in a user turn gets the assistant header appended:
                    the generation prompt)
    document:      <s>{seg}\\n{seg}...</s>

An image segment becomes ``tokens_per_image`` copies of the ``<image>`` token id (HF LLaVA's
pre-expanded form). Loss targets are the assistant turns' tokens and their ``<|im_end|>``
(documents: all text tokens and ``</s>``, if ``doc_loss``). Every segment is one slice: its
tokens get ``slice_ids = k + 1`` for segment ``k``; template tokens and separators get 0.
Special-token strings inside segment text (``</s>`` in scraped HTML, ``<|im_end|>`` in a chat log)
are encoded as ordinary text (``TextTokenizer.encode_text``), except ``<soft>`` slots; a literal
``<image>`` in text is a ``DataError`` (images are segments).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from mllm_jax.data.schema import DataError, Sample

PAD, BOS, EOS, IMAGE, IM_START, IM_END = "<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"
SOFT = "<soft>"   # a learned soft-prompt slot (MLLMConfig.soft_prompt_token_id)
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, IM_START, IM_END, SOFT)   # ids 0..6 in a trained tokenizer

# Jinja ChatML template saved with trained tokenizers so transformers' apply_chat_template
# renders the same text (images as one "<image>" each, segments joined by newlines).
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Turn delimiters as text; special tokens inside them must exist in the tokenizer."""
    turn_start: str = IM_START + "{role}\n"
    turn_end: str = IM_END
    after_turn: str = "\n"
    separator: str = "\n"                  # between segments of one turn / one document
    doc_start: Optional[str] = BOS
    doc_end: Optional[str] = EOS
    requires: tuple[str, ...] = (IM_START, IM_END)   # special tokens the turn delimiters use


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the special ids the data pipeline needs. Picklable."""

    def __init__(self, tokenizer, *, source: str = "<memory>", pad_token: Optional[str] = PAD,
                 bos_token: Optional[str] = BOS, eos_token: Optional[str] = EOS,
                 image_token: str = IMAGE, template: ChatTemplate = ChatTemplate()):
        self.tok, self.source, self.template = tokenizer, source, template
        self.pad_token, self.bos_token, self.eos_token, self.image_token = pad_token, bos_token, eos_token, image_token
        self.image_id = self.token_id(image_token)
        self.pad_id = self.token_id(pad_token) if pad_token is not None and tokenizer.token_to_id(pad_token) is not None else 0
        self._cache: dict[str, tuple[int, ...]] = {}
        self._text_cache: dict[str, tuple[int, ...]] = {}
        self._plain = None                  # the tokenizer with special tokens split (encode_text)
        missing = [x for x in template.requires if tokenizer.token_to_id(x) is None]
        self.chat_error = (f"tokenizer {source} lacks the chat template's special tokens {missing}; pass a "
                           "ChatTemplate matching its format or add them as special tokens") if missing else None

    @classmethod
    def from_dir(cls, path: str | Path, *, add_image_token: bool = False, template: ChatTemplate = ChatTemplate()):
        """Loads ``tokenizer.json`` (and special tokens from ``tokenizer_config.json``) of a local
        HF tokenizer folder. ``add_image_token`` appends ``<image>`` when the vocabulary lacks it
        (then the model's embedding needs ``len(tokenizer)`` rows)."""
        from tokenizers import AddedToken, Tokenizer
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no tokenizer.json; train one with "
                                    "mllm_jax.data.tokenize.train_tokenizer or point to an HF tokenizer folder")
        tok = Tokenizer.from_file(str(file))
        conf = {}
        if (file.parent / "tokenizer_config.json").exists():
            conf = json.loads((file.parent / "tokenizer_config.json").read_text())

        def special(name, default):
            v = conf.get(name, default)
            v = v.get("content") if isinstance(v, dict) else v
            return v if v is not None and tok.token_to_id(v) is not None else None
        if tok.token_to_id(IMAGE) is None:
            if not add_image_token:
                raise ValueError(f"{file}: the vocabulary has no {IMAGE} token; pass add_image_token=True "
                                 "(and size the model's embedding to len(tokenizer))")
            tok.add_special_tokens([AddedToken(IMAGE, special=True, normalized=False)])
        # the template's default document delimiters stand for the tokenizer's own BOS/EOS
        # (<|endoftext|> in GPT-2/Qwen vocabularies; none for BERT): never encoded as text
        tmpl = dataclasses.replace(
            template,
            doc_start=special("bos_token", BOS) if template.doc_start == BOS else template.doc_start,
            doc_end=special("eos_token", EOS) if template.doc_end == EOS else template.doc_end)
        return cls(tok, source=str(file), pad_token=special("pad_token", PAD), bos_token=tmpl.doc_start,
                   eos_token=tmpl.doc_end, template=tmpl)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer {self.source}: no token {token!r} in the vocabulary")
        return i

    def encode(self, text: str) -> tuple[int, ...]:
        """Ids of ``text`` without added BOS/EOS, special-token strings in it as special tokens
        (template pieces; cached: the scene world repeats many strings)."""
        return self._memo(self._cache, text, lambda t: self.tok.encode(t, add_special_tokens=False).ids)

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Ids of data text (a segment of a sample): special-token strings in it (``</s>``,
        ``<|im_end|>``, ``<|endoftext|>``, ...) are ordinary text, as with transformers'
        ``split_special_tokens=True``, so that text cannot end a document or a turn; only
        ``<soft>`` (a soft-prompt slot, placed in prompts on purpose) stays a special token."""
        return self._memo(self._text_cache, text, self._encode_plain)

    def _encode_plain(self, text: str) -> list[int]:
        if self._plain is None:
            from tokenizers import Tokenizer
            plain = Tokenizer.from_str(self.tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        soft = self.tok.token_to_id(SOFT)
        out: list[int] = []
        for j, part in enumerate(text.split(SOFT) if soft is not None else [text]):
            if j:
                out.append(soft)
            if part:
                out.extend(self._plain.encode(part, add_special_tokens=False).ids)
        return out

    @staticmethod
    def _memo(cache: dict, text: str, encode) -> tuple[int, ...]:
        ids = cache.get(text)
        if ids is None:
            ids = tuple(encode(text))
            if len(cache) < 100_000:
                cache[text] = ids
        return ids

    def stop_ids(self) -> tuple[int, ...]:
        """Where generation ends, as training renders samples: the template's turn end
        (``<|im_end|>``) and the tokenizer's own EOS, those of them in the vocabulary."""
        ids = (self.tok.token_to_id(self.template.turn_end),
               self.tok.token_to_id(self.eos_token) if self.eos_token else None)
        return tuple(sorted({i for i in ids if i is not None}))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __getstate__(self):
        return {**self.__dict__, "tok": self.tok.to_str(), "_cache": {}, "_text_cache": {}, "_plain": None}

    def __setstate__(self, state):
        from tokenizers import Tokenizer
        state["tok"] = Tokenizer.from_str(state["tok"])
        self.__dict__.update(state)


def train_tokenizer(texts: Iterable[str], out_dir: Optional[str | Path] = None, *, vocab_size: int = 512,
                    min_frequency: int = 2) -> TextTokenizer:
    """Trains a byte-level BPE (``SPECIAL_TOKENS`` get ids 0..6, ``<image>`` = 3, ``<soft>`` = 6). With
    ``out_dir``, saves an HF tokenizer folder (tokenizer.json, tokenizer_config.json with the
    ChatML chat template) that ``TextTokenizer.from_dir`` and transformers both load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    roles = ["system\n", "user\n", "assistant\n"] * 50
    tok.train_from_iterator(list(roles) + list(texts), trainer)
    out = TextTokenizer(tok)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "pad_token": PAD, "additional_special_tokens": [IMAGE, IM_START, IM_END, SOFT],
            "chat_template": CHATML_JINJA, "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        }, indent=2))
        out.source = str(out_dir / "tokenizer.json")
    return out


@dataclasses.dataclass
class Encoded:
    """One sample as tokens (unpadded). ``target[t]`` = 1 if token ``t`` is a loss target."""
    input_ids: np.ndarray        # int32[L]
    target: np.ndarray           # int32[L]
    slice_ids: np.ndarray        # int32[L]   0 = no slice, k+1 = segment k
    slice_is_image: np.ndarray   # bool[S]
    images: list                 # the image segments' arrays, in order


def encode_sample(sample: Sample, tok: TextTokenizer, tokens_per_image: int, *, doc_loss: bool = True,
                  add_generation_prompt: Optional[bool] = None) -> Encoded:
    """Renders a (validated) sample; see the module docstring for the format."""
    t = tok.template
    ids: list[int] = []
    target: list[int] = []
    slices: list[int] = []

    def put(piece, is_target=False, slice_id=0):
        ids.extend(piece)
        target.extend([int(is_target)] * len(piece))
        slices.extend([slice_id] * len(piece))

    def put_segment(k, seg, is_target):
        if seg.kind == "image":
            put([tok.image_id] * tokens_per_image, False, k + 1)
            return
        if tok.image_token in seg.text:
            raise DataError("image_count_mismatch", sample.id, f"segments[{k}].text",
                            f"text contains a literal {tok.image_token} token with no image attached; "
                            "images must be separate segments")
        piece = tok.encode_text(seg.text)
        put(piece, is_target, k + 1)

    segs = sample.segments
    if sample.is_chat:
        if tok.chat_error:
            raise ValueError(tok.chat_error)
        k = 0
        while k < len(segs):
            role = segs[k].role
            put(tok.encode(t.turn_start.format(role=role)))
            first = True
            while k < len(segs) and segs[k].role == role:
                if not first:
                    put(tok.encode(t.separator))
                put_segment(k, segs[k], role == "assistant")
                first, k = False, k + 1
            put(tok.encode(t.turn_end), role == "assistant")
            put(tok.encode(t.after_turn))
        gen = segs[-1].role != "assistant" if add_generation_prompt is None else add_generation_prompt
        if gen:
            put(tok.encode(t.turn_start.format(role="assistant")))
    else:
        if t.doc_start:
            put(tok.encode(t.doc_start))
        for k, seg in enumerate(segs):
            if k:
                put(tok.encode(t.separator))
            put_segment(k, seg, doc_loss)
        if t.doc_end:
            put(tok.encode(t.doc_end), doc_loss)
    return Encoded(np.asarray(ids, np.int32), np.asarray(target, np.int32), np.asarray(slices, np.int32),
                   np.asarray([s.kind == "image" for s in segs], bool),
                   [s.image for s in segs if s.kind == "image"])


def chat_messages(sample: Sample) -> list[dict]:
    """The sample as HF chat messages (images as ``<image>`` placeholders), for
    ``apply_chat_template`` with the saved Jinja template."""
    msgs: list[dict] = []
    for seg in sample.segments:
        text = IMAGE if seg.kind == "image" else seg.text
        if msgs and msgs[-1]["role"] == seg.role:
            msgs[-1]["content"] += "\n" + text
        else:
            msgs.append({"role": seg.role, "content": text})
    return msgs


def main(argv=None) -> None:
    """``python -m mllm_jax.data.tokenize --out DIR``: trains the scene-world BPE into DIR."""
    import argparse
    from mllm_jax.config import SceneConfig
    from mllm_jax.data.synthetic_sets import scene_corpus
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--samples", type=int, default=4000, help="scene-world samples per split in the corpus")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    tok = train_tokenizer(scene_corpus(SceneConfig(seed=a.seed), a.samples), a.out, vocab_size=a.vocab_size)
    print(f"wrote {a.out}/tokenizer.json ({len(tok)} tokens; <image> = {tok.image_id})")


__all__ = [
    "SPECIAL_TOKENS", "PAD", "BOS", "EOS", "IMAGE", "IM_START", "IM_END", "SOFT", "CHATML_JINJA", "ChatTemplate",
    "TextTokenizer", "train_tokenizer", "Encoded", "encode_sample", "chat_messages", "main",
]


if __name__ == "__main__":
    main()
