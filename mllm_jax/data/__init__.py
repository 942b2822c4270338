"""Data: samples, the synthetic scene world, real dataset formats, tokenisation, teacher
features and the grain pipeline.

    schema.py          Sample / Segment, validation, DataError (reasons the pipeline counts)
    synthetic.py       the scene world: scenes, rendering, captions, scene-graph features
    synthetic_tasks.py VQA, POPE probes, hard negatives, edits/stories, multi-image QA, RAG facts
    synthetic_sets.py  training tasks (SceneSource) and evaluation sets (*_set functions)
    formats.py         LLaVA JSON, interleaved JSONL, image-text pairs, Fashion-MNIST
    tokenize.py        offline BPE, HF tokenizer folders, ChatML template, encode_sample
    teachers.py        per-slice teacher features and their tensorstore cache
    sources.py         DataConfig -> source and teacher providers
    pipeline.py        grain pipeline and the checkpointable DataIterator (make_iterator)
"""
