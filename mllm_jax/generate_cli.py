"""``python -m mllm_jax generate``: decode text from a trained run or a Hugging Face model.

    python -m mllm_jax generate --run runs/tiny --prompt "Describe the image briefly." --image img.png
    python -m mllm_jax generate --hf path/to/hf_dir --prompt "The capital of France is"
    python -m mllm_jax generate --hf assets/SmolLM2-135M-Instruct --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --chat --prompt "What is the capital of France?"

A run's tokenizer is its config's ``data.tokenizer``; an HF dir's is its own tokenizer files
(GGUF: the tokenizer inside the file, read by transformers). ``--chat`` wraps the prompt in the
chat template. Images (``--image``, repeatable) go in front of the prompt text, one ``<image>``
slot each; with ``--hf`` (a LLaVA), a prompt may place them itself with one ``<image>`` mark per
image, as LLaVA's prompt format does. A run's prompts are rendered as its training data was (``encode_sample``): a document
(its start token, the images, the text, without the end-of-document token), or with ``--chat`` a
user turn holding the images and the text, then the assistant header.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mllm_jax generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a training run directory (its newest good checkpoint)")
    src.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors, or --gguf)")
    p.add_argument("--gguf", help="GGUF file name inside --hf")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--image", action="append", default=[], help="image file for a multimodal model (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def _hf_tokenizer(path: str, gguf: str | None):
    from transformers import AutoTokenizer
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)

    def encode(text: str, chat: bool) -> list[int]:
        if chat:
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        return tok(text)["input_ids"]
    return encode, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token_id


def _hf_stop_ids(path: Path, model, tokenizer_eos) -> set[int]:
    """What transformers' generate stops on (generation_config.json's eos_token_id, else the
    model config's: Llama-3 lists several) plus the tokenizer's EOS."""
    import json

    def ids(v):
        return set() if v is None else {int(x) for x in v} if isinstance(v, (list, tuple)) else {int(v)}
    gen = path / "generation_config.json"
    cfg = getattr(model.config, "decoder", model.config)
    out = ids(json.loads(gen.read_text()).get("eos_token_id")) if gen.exists() else ids(cfg.eos_token_id)
    return out | ids(tokenizer_eos)


def run_prompt_ids(tok, tokens_per_image: int, prompts, images=(), chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt (with ``images``, file paths or arrays, in front of its text) as
    training renders a sample: with ``chat`` a user turn and the assistant header, else a
    document without its end token."""
    from mllm_jax.data.schema import Sample, image_segment, text_segment, validate_sample
    from mllm_jax.data.tokenize import encode_sample
    role = "user" if chat else None
    end = list(tok.encode(tok.template.doc_end)) if tok.template.doc_end and not chat else []
    out = []
    for i, text in enumerate(prompts):
        segs = tuple(image_segment(im, role) for im in images) + (text_segment(text, role),)
        sample = validate_sample(Sample(f"prompt {i}", segs, source="--prompt"))
        ids = encode_sample(sample, tok, tokens_per_image, add_generation_prompt=True if chat else None
                            ).input_ids.tolist()
        out.append(ids[:len(ids) - len(end)] if end and ids[-len(end):] == end else ids)
    return out


def _run_model(run: str):
    from mllm_jax.data.tokenize import TextTokenizer
    from mllm_jax.train.experiment import restore_run
    state, step = restore_run(run)
    from mllm_jax.config import ExperimentConfig, load_config
    cfg = load_config(Path(run) / "config.yaml", ExperimentConfig)
    if not cfg.data.tokenizer:
        raise SystemExit(f"{run}/config.yaml has no data.tokenizer: cannot encode prompts")
    tok = TextTokenizer.from_dir(cfg.data.tokenizer)
    return state.model(), tok, step


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.temperature >= 0:      # a negative one decoded greedily without a word
        parser.error(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    import jax

    from mllm_jax.models.mllm import MLLM
    if args.run:
        model, tok, step = _run_model(args.run)
        if args.image and not isinstance(model, MLLM):
            raise SystemExit("--image needs a multimodal model (LLaVA / an MLLM run)")
        tpi = model.config.tokens_per_image if isinstance(model, MLLM) else 0
        run_prompts = run_prompt_ids(tok, tpi, args.prompt, args.image, args.chat)
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        stops = set(tok.stop_ids())   # the end of an assistant turn (--chat) or of a document
        print(f"# {args.run} step {step}", file=sys.stderr)
    else:
        from mllm_jax.convert.hf import load_pretrained
        model = load_pretrained(args.hf, gguf_file=args.gguf)
        encode, decode, eos = _hf_tokenizer(args.hf, args.gguf)
        stops = _hf_stop_ids(Path(args.hf), model, eos)
    prompts = run_prompts if args.run else [encode(p, args.chat) for p in args.prompt]
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every row ends at the last column
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
              temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
              key=jax.random.key(args.seed), stop_tokens=tuple(sorted(stops)))
    if isinstance(model, MLLM) and args.run:      # image slots already in the prompts
        out = _generate_with_images(model, ids, mask, args.image, kw)
    elif isinstance(model, MLLM):
        out = _generate_mllm(model, ids, mask, args.image, kw)
    else:
        if args.image:
            raise SystemExit("--image needs a multimodal model (LLaVA / an MLLM run)")
        from mllm_jax.generate import generate
        out = generate(model, ids, attention_mask=mask, **kw)
    for i, row in enumerate(np.asarray(out.tokens)):
        print(decode(row[: int(out.lengths[i])].tolist()))
    return 0


def _pixels(model, images):
    """``float32[M, H, W, C]`` of the image files as the model's vision tower takes them (None
    without images)."""
    if not images:
        return None
    from mllm_jax.data.pipeline import ImageSpec
    from mllm_jax.data.schema import load_image
    spec = ImageSpec.from_vision(model.config.vision)
    return np.stack([spec(load_image(f, "--image", f)) for f in images])


def _generate_with_images(model, ids, mask, images, kw):
    """``model.generate`` on prompts that hold every image's slots, each row with all images."""
    if not images:
        return model.generate(ids, attention_mask=mask, **kw)
    pix = _pixels(model, images)
    return model.generate(ids, attention_mask=mask, pixel_values=np.broadcast_to(pix, (len(ids),) + pix.shape).copy(),
                          **kw)


def _generate_mllm(model, ids, mask, images, kw):
    """An HF LLaVA's prompts. A prompt holding ``<image>`` (one id per image, as LLaVA's prompt
    format writes it, e.g. ``"USER: <image>\nWhat is shown? ASSISTANT:"``) gets each of them
    expanded to the image's ``tokens_per_image`` slots where it stands, as transformers'
    LlavaProcessor does; a prompt without any gets all images' slots in front of its text."""
    k, image_id = model.config.tokens_per_image, model.config.image_token_id
    if not images:
        return model.generate(ids, attention_mask=mask, **kw)
    rows = []
    for r in range(len(ids)):  # each prompt gets all images
        real = ids[r][mask[r].astype(bool)]
        marks = int((real == image_id).sum())
        if marks == 0:
            rows.append(np.concatenate([np.full(k * len(images), image_id, np.int32), real]))
        elif marks == len(images):
            rows.append(np.concatenate([np.full(k, image_id, np.int32) if t == image_id else np.asarray([t], np.int32)
                                        for t in real]))
        else:
            raise SystemExit(f"--prompt {r + 1} holds {marks} <image> marks but {len(images)} --image files "
                             "were given: one mark per image, or none (the images then go in front)")
    width = max(len(r) for r in rows)
    ids2 = np.zeros((len(rows), width), np.int32)
    mask2 = np.zeros_like(ids2)
    for i, r in enumerate(rows):
        ids2[i, width - len(r):], mask2[i, width - len(r):] = r, 1
    return _generate_with_images(model, ids2, mask2, images, kw)


if __name__ == "__main__":
    raise SystemExit(main())
