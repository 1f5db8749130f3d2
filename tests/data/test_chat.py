"""slora.data.chat and --jsonl-kind chat: ChatML and LLaMA-3 rendering against the templates rendered as strings,
assistant-only loss, truncation, generation prompts, calibration, bad records, and a tiny end-to-end run.
The exact comparison with transformers' apply_chat_template on the real tokenizers is tests/chat_compat.py."""
import json

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from slora.data import chat, tasks, text
from slora.cli import finetune
from slora.data.tasks import Example
from slora.data.text import IGNORE_INDEX
from slora.io.model_folder import save_model
from tests.support.tiny import tiny_llama, tiny_model_dir

# SmolLM2-135M-Instruct's chat template, from ~/.cache/slora/models/smollm2-135m/tokenizer_config.json
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
WORDS = "the cat sat on a mat dog ran far be good system user assistant".split()
CONVO = (("system", "be good"), ("user", "the cat"), ("assistant", "sat on a mat"), ("user", "a dog"))
FINAL = "ran far"


def word_tokenizer(family):
    """WordLevel over WORDS with "\\n" split out and spaces dropped, plus the family's markers as special tokens
    (so that tok.encode of a rendered string splits on them, as transformers does)."""
    marks = {"chatml": ["<|im_start|>", "<|im_end|>"],
             "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
             "none": ["<eos>"]}[family]
    vocab = {t: i for i, t in enumerate(["<unk>"] + marks + ["\n"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.Split(Regex(" +"), behavior="removed")])
    tok.add_special_tokens(marks)
    return tok


def rendered(family, messages, generation_prompt=False):
    """The template as a string (SMOLLM2_TEMPLATE without its default system turn; Meta-Llama-3-8B-Instruct's
    public template: bos, then header + "\\n\\n" + content|trim + <|eot_id|>)."""
    if family == "chatml":
        s = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages)
        return s + ("<|im_start|>assistant\n" if generation_prompt else "")
    s = "<|begin_of_text|>" + "".join(f"<|start_header_id|>{r}<|end_header_id|>\n\n{c.strip()}<|eot_id|>"
                                      for r, c in messages)
    return s + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt else "")


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_render_matches_the_template_string(family):
    tok = word_tokenizer(family)
    messages = CONVO + (("assistant", f"  {FINAL} \n"),)  # LLaMA-3 trims the content, ChatML keeps it
    assert chat.template_family(tok) == family
    turns = chat.render_turns(tok, messages)
    ids = [i for t, _ in turns for i in t]
    assert ids == tok.encode(rendered(family, messages), add_special_tokens=False).ids
    prompt = [i for t, _ in chat.render_turns(tok, CONVO) for i in t] + chat.generation_prompt(tok)
    assert prompt == tok.encode(rendered(family, CONVO, True), add_special_tokens=False).ids
    # loss: exactly the assistant turns' content and their end marker
    v = tok.get_vocab()
    end = v["<|im_end|>"] if family == "chatml" else v["<|eot_id|>"]
    trained = [i for t, loss in turns for i, keep in zip(t, loss) if keep]
    final = [v["ran"], v["far"]] + ([v["\n"]] if family == "chatml" else [])  # ChatML keeps the content's "\n"
    assert trained == [v[w] for w in "sat on a mat".split()] + [end] + final + [end]
    assert chat.stop_ids(tok) == [end]


def test_unknown_template_is_an_error_suggesting_instructions():
    with pytest.raises(ValueError, match="use --jsonl-kind instructions"):
        chat.render_turns(word_tokenizer("none"), CONVO)


def test_default_system_turn_from_the_model_folder(tmp_path):
    tok = word_tokenizer("chatml")
    assert chat.default_system(tmp_path, tok) is None  # no tokenizer_config.json: no default turn
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLLM2_TEMPLATE}))
    system = chat.default_system(tmp_path, tok)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert chat.with_default_system(CONVO[1:], system) == (("system", system),) + CONVO[1:]
    assert chat.with_default_system(CONVO, system) == CONVO  # a conversation with its own system turn keeps it
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'Cutting Knowledge Date' }}"}))
    with pytest.raises(ValueError, match="LLaMA-3.1-style chat template"):
        chat.default_system(tmp_path, word_tokenizer("llama3"))


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_encode_lm_prompts_and_calibration_use_the_rendering(family):
    tok = word_tokenizer(family)
    e = Example("x.jsonl:1", CONVO, None, FINAL)
    (f,) = text.encode_lm(tok, [e], max_len=256)
    turns = chat.render_turns(tok, CONVO + (("assistant", FINAL),))
    assert f.input_ids == [i for t, _ in turns for i in t]
    assert f.labels == [i if keep else IGNORE_INDEX for t, loss in turns for i, keep in zip(t, loss)]
    (p,) = text.encode_prompts(tok, [e], max_len=256)
    assert p.input_ids == tok.encode(rendered(family, CONVO, True), add_special_tokens=False).ids
    (b,) = text.calibration_batches(tok, [e], decoder=True, max_len=256, batch_size=1, pad_id=0)
    assert b["input_ids"][0].tolist() == f.input_ids
    # truncation: the final turn keeps max_len//2 tokens, the context its last tokens
    (short,) = text.encode_lm(tok, [e], max_len=12)
    assert len(short.input_ids) == 12 and short.input_ids[6:] == turns[-1][0][:6]
    assert short.input_ids[:6] == [i for t, _ in turns[:-1] for i in t][-6:]
    (sp,) = text.encode_prompts(tok, [e], max_len=5)
    assert sp.input_ids == p.input_ids[-5:]


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_chat_records_and_bad_records(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]}
    spec, splits = tasks.load_jsonl("chat", write_lines(tmp_path / "t.jsonl", [good] * 3),
                                   write_lines(tmp_path / "d.jsonl", [good]))
    assert spec.kind == "generation" and spec.name == "jsonl-chat"
    (e,) = splits["dev"]
    assert e.text == (("user", "hi"), ("assistant", "hello"), ("user", "bye")) and e.label == "see you"
    cases = [
        ({"messages": "hi"}, r":2: field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
         r":2: field 'messages\[1\]\.role' must be one of"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
         r":2: field 'messages\[0\]\.content' must be of type str"),
        ({"messages": [{"role": "user", "content": "a"}]}, r":2: field 'messages' must end with an assistant turn"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, r":2: field 'messages' must end with an assistant"),
    ]
    for record, match in cases:
        f = write_lines(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises(ValueError, match=f"{f}{match}"):
            tasks.read_jsonl(f, "chat")


def test_finetune_on_chat_data(tmp_path):
    model = tiny_model_dir(tmp_path / "m", "decoder")  # a ChatML vocabulary (tests/support/tiny.py)
    rows = [{"messages": [{"role": "user", "content": "what is the capital of france"},
                          {"role": "assistant", "content": "paris"},
                          {"role": "user", "content": "what city"}, {"role": "assistant", "content": "paris"}]}] * 12
    train, dev = write_lines(tmp_path / "t.jsonl", rows[:10]), write_lines(tmp_path / "d.jsonl", rows[10:])
    out = finetune.main(["--model", str(model), "--task", "jsonl", "--jsonl-kind", "chat", "--train-file",
                         str(train), "--dev-file", str(dev), "--batch-size", "4", "--calib-n", "8", "--max-steps",
                         "2", "--gen-tokens", "2", "--out", str(tmp_path / "run")])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]["dev"]) == {"bleu4", "rouge1", "rougeL"} and metrics["steps"] == 2
    # a decoder whose vocabulary has no chat markers is refused before anything is computed
    plain = word_tokenizer("none")
    plain.save(str(tmp_path / "plain.json"))
    save_model(tiny_llama(vocab_size=plain.get_vocab_size()), tmp_path / "plain", tokenizer=tmp_path / "plain.json")
    with pytest.raises(ValueError, match="use --jsonl-kind instructions"):
        finetune.main(["--model", str(tmp_path / "plain"), "--task", "jsonl",
                       "--jsonl-kind", "chat", "--train-file", str(train), "--dev-file", str(dev),
                       "--out", str(tmp_path / "run2")])


def test_header_merged_with_leading_whitespace_counts_as_content():
    # byte-level BPEs pre-tokenize "\n " as one piece (SmolLM2), so "assistant\n sat" has no token boundary after
    # the header's "\n"; the merged token carries content, so it is trained, and the ids stay the template's
    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "\n", "\n ", " "] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n ?|[^\s]+| "), behavior="isolated")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    messages = (("user", "the cat"), ("assistant", " sat"))
    turns = chat.render_turns(tok, messages)
    assert [i for t, _ in turns for i in t] == tok.encode(rendered("chatml", messages), add_special_tokens=False).ids
    assert [i for i, keep in zip(*turns[1]) if keep] == [vocab["\n "], vocab["sat"], vocab["<|im_end|>"]]
