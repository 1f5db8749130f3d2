"""The commands: argument parsing, the one-line error runner and the order of the stages. The thin modules at the
top of slora/ (`python -m slora.finetune`, ...) call the `main` of these.

    finetune.py   python -m slora.finetune: load, calibrate, allocate, train, write the run folder
    argcheck.py   command-line values checked before anything loads
    runner.py     the error convention: one line on stderr, exit status 2 / 1 / 130 / 143
    merge.py      python -m slora.merge
    assets.py     python -m slora.assets
    gguf.py       python -m slora.gguf
    wiki_chat.py  python -m slora.wiki_chat: chat-format JSONL from the Wikipedia asset
    bench.py      python -m slora.bench: calibration and training at LLaMA shapes, side by side with transformers
    bench_train.py, bench_nlg.py, bench_overhead.py, bench_dist.py: its training, NLG, host-overhead and torchrun cases
"""
