"""Evaluation: the metrics the demo compares arms on, over the scene world's test split.

    encode.py     Samples -> fixed-shape batches through the training pipeline's own encoding
    embed.py      Embedder (EmbedConfig: pooled cosine, or GAK / soft-DTW over slice embeddings),
                  sequence_similarity (the one call into mllm_jax.align), SceneGraphOracle
    answer.py     Answerer: greedy generation and candidate log-likelihoods; answer normalisation
    retrieval.py  R@K, image<->text, hard negatives (SugarCrepe categories), interleaved, composed
    vqa.py        VQA exact match (generate | loglik over the closed answer vocabulary)
    pope.py       POPE accuracy / precision / recall / F1 / yes-ratio per strategy
    caption.py    BLEU / ROUGE-L / CIDEr via pycocoevalcap (lazy import, simple tokenizer)
    rag.py        retrieve with the model's own embeddings, then answer (own / oracle / none)
    report.py     Markdown table, JSON, loss-curve and similarity-matrix figures
    suite.py      run_suite: all of it for one model, with the demo's headline keys
"""
