"""The fine-tuning run: from "ranks allocated" to "adapter and scores", and the run folder that records it.

    loop.py        the training loop (TrainConfig in, metrics out): AdamW, schedule, accumulation, resume points
    objective.py   the loss of an optimizer step: summed per-token / per-example losses over the target count
    evaluation.py  predictions on a split (classes, values or generated text) and their task scores
    run_folder.py  the run folder: lock, in-progress folder, completion, --replace, its JSON and log writers
    resume.py      training checkpoints (--save-every) and --resume
    divergence.py  stopping a diverged run: non-finite checks on the host or on the device
    heatmap.py     ranks.svg
"""
