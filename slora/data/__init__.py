"""Data: what a task is, how its text becomes batches, and how predictions are scored.

    tasks.py   task specs, readers (GLUE, the offline stand-ins, JSONL), seeded splits, calibration sources
    text.py    tokenization, batching with dynamic padding, calibration batches
    chat.py    chat templates (ChatML, LLaMA-3) rendered without jinja
    scores.py  task scores: accuracy, F1, MCC, Pearson, Spearman, BLEU-4, ROUGE-1, ROUGE-L
"""
