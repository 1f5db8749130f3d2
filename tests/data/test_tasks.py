"""slora.data: GLUE readers on GLUE-format files written here, stand-ins on fixture files in the asset layout,
JSONL, calibration sources (nothing downloaded). Encoding and batching: tests/data/test_text.py.
The @slow test reads the real fetched assets (python -m slora.assets)."""
import json
import random

import pytest

from slora.data import tasks
from tests.support.tiny import write_jsonl

# First three test-split uids of rt-polarity for seed 0, from
#   [e.uid for e in tasks.load_task("rt-polarity")["test"][:3]]   (torch 2.13 CPU, real assets)
PINNED_RT_TEST_UIDS = ["2843", "199", "6270"]

# -----------------------------------------------------------------------------
# GLUE fixtures: two train lines and two dev lines per task, in each task's own column layout

MNLI_COLS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def mnli_row(i, a, b, label, n_votes):
    return [str(i), "1", f"{i}e", "fiction", "(", "(", "(", "(", a, b] + [label] * n_votes + [label]


# task -> (folder, header or None, rows); each row's (text, text_pair, label) is listed in EXPECTED
GLUE = {
    "cola": ("CoLA", None, [["gj04", "1", "", "Our friends won't buy this analysis."],
                            ["gj04", "0", "*", "They drank the pub."]]),
    "sst2": ("SST-2", ["sentence", "label"], [["a charming journey ", "1"], ["dull and lifeless", "0"]]),
    "mrpc": ("MRPC", ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             [["1", "702876", "702977", "He said so.", "So he said."], ["0", "1", "2", "Rain.", "Sun."]]),
    "stsb": ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2", "score"],
             [["0", "main", "MSRvid", "2012", "1", "none", "none", "A plane takes off.", "A jet takes off.", "5.000"],
              ["1", "main", "MSRvid", "2012", "4", "none", "none", "A man plays.", "A cat eats.", "0.250"]]),
    "qqp": ("QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [["1", "3", "4", "How to cook?", "Cooking how?", "1"], ["2", "5", "6", "Why?", "Where?", "0"]]),
    "mnli": ("MNLI", None, None),  # written by write_glue with train/dev column counts of their own
    "qnli": ("QNLI", ["index", "question", "sentence", "label"],
             [["0", "Who?", "Ann did.", "entailment"], ["1", "When?", "Blue.", "not_entailment"]]),
    "rte": ("RTE", ["index", "sentence1", "sentence2", "label"],
            [["0", "A dog runs.", "An animal moves.", "entailment"], ["1", "It rains.", "It is dry.",
                                                                     "not_entailment"]]),
}
EXPECTED = {  # (text, text_pair, label) of the two rows, as load_task must return them
    "cola": [("Our friends won't buy this analysis.", None, 1), ("They drank the pub.", None, 0)],
    "sst2": [("a charming journey ", None, 1), ("dull and lifeless", None, 0)],
    "mrpc": [("He said so.", "So he said.", 1), ("Rain.", "Sun.", 0)],
    "stsb": [("A plane takes off.", "A jet takes off.", 5.0), ("A man plays.", "A cat eats.", 0.25)],
    "qqp": [("How to cook?", "Cooking how?", 1), ("Why?", "Where?", 0)],
    "mnli": [("A man sleeps.", "A person rests.", 1), ("A man sleeps.", "A man runs.", 0)],
    "qnli": [("Who?", "Ann did.", 0), ("When?", "Blue.", 1)],
    "rte": [("A dog runs.", "An animal moves.", 0), ("It rains.", "It is dry.", 1)],
}


def write_tsv(path, header, rows, eol="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([("\t".join(header))] if header else []) + ["\t".join(r) for r in rows]
    path.write_text(eol.join(lines) + eol, encoding="utf-8")


def write_glue(root, task):
    folder, header, rows = GLUE[task]
    if task == "mnli":  # train has label1 + gold_label, dev has label1..label5 + gold_label
        rows = [("A man sleeps.", "A person rests.", "entailment"), ("A man sleeps.", "A man runs.", "contradiction")]
        write_tsv(root / folder / "train.tsv", MNLI_COLS + ["label1", "gold_label"],
                  [mnli_row(i, *r, 1) for i, r in enumerate(rows)])
        dev_header = MNLI_COLS + [f"label{k}" for k in range(1, 6)] + ["gold_label"]
        for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
            write_tsv(root / folder / name, dev_header, [mnli_row(i, *r, 5) for i, r in enumerate(rows)])
        return root / folder
    write_tsv(root / folder / "train.tsv", header, rows)
    write_tsv(root / folder / "dev.tsv", header, rows, eol="\r\n")  # CRLF as written on Windows
    return root / folder


def triples(examples):
    return [(e.text, e.text_pair, e.label) for e in examples]


@pytest.mark.parametrize("task", list(GLUE))
def test_glue_readers(tmp_path, task):
    write_glue(tmp_path, task)
    splits = tasks.load_task(task, glue_dir=tmp_path)
    assert set(splits) == ({"train", "dev", "dev_mismatched"} if task == "mnli" else {"train", "dev"})
    for part in splits.values():
        assert triples(part) == EXPECTED[task]
    spec = tasks.get_task(task)
    assert spec.num_labels == {"stsb": 1, "mnli": 3}.get(task, 2)
    assert spec.main_score == {"cola": "mcc", "stsb": "pearson_spearman", "mrpc": "acc_and_f1",
                                "qqp": "acc_and_f1"}.get(task, "accuracy")


def test_glue_holdout_carves_dev_from_train(tmp_path):
    rows = [[f"sentence number {i}", str(i % 2)] for i in range(40)]
    write_tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], rows)
    write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], rows[:3])
    splits = tasks.load_task("sst2", glue_dir=tmp_path, holdout=0.1, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 36, "dev": 4, "test": 3}
    assert triples(splits["test"]) == triples(tasks.load_task("sst2", glue_dir=tmp_path)["dev"])
    assert not {e.uid for e in splits["train"]} & {e.uid for e in splits["dev"]}
    assert splits == tasks.load_task("sst2", glue_dir=tmp_path, holdout=0.1, seed=3)  # deterministic


def test_glue_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sst-3'; known tasks: cola, sst2, .*wiki-describe"):
        tasks.load_task("sst-3", glue_dir=tmp_path)
    with pytest.raises(ValueError, match="pass glue_dir"):
        tasks.load_task("rte")
    missing = tmp_path / "RTE" / "train.tsv"
    with pytest.raises(FileNotFoundError, match=f"{missing}: GLUE file not found"):
        tasks.load_task("rte", glue_dir=tmp_path)
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "RTE" / "train.tsv", header, [["0", "a", "b", "entailment"], ["1", "a b", "entailment"]])
    with pytest.raises(ValueError, match=f"{missing}:3: malformed line, 3 tab-separated fields where 4"):
        tasks.load_task("rte", glue_dir=tmp_path)
    write_tsv(tmp_path / "RTE" / "train.tsv", header, [["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]])
    with pytest.raises(ValueError, match=f"{missing}:3: label 'maybe' out of range for task rte"):
        tasks.load_task("rte", glue_dir=tmp_path)
    write_tsv(tmp_path / "CoLA" / "train.tsv", None, [["gj04", "2", "", "x"]])
    with pytest.raises(ValueError, match=f"{tmp_path / 'CoLA' / 'train.tsv'}:1: label '2' out of range"):
        tasks.load_task("cola", glue_dir=tmp_path)
    sts = ["index", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "STS-B" / "train.tsv", sts, [["0", "a", "b", "5.5"]])
    with pytest.raises(ValueError, match=r"train.tsv:2: label '5.5' out of range \[0.0, 5.0\]"):
        tasks.load_task("stsb", glue_dir=tmp_path)
    write_tsv(tmp_path / "QQP" / "train.tsv", ["id", "q1", "q2", "is_duplicate"], [["0", "a", "b", "1"]])
    with pytest.raises(ValueError, match=r"train.tsv:1: header lacks column\(s\) \['question1', 'question2'\]"):
        tasks.load_task("qqp", glue_dir=tmp_path)


# -----------------------------------------------------------------------------
# Stand-ins on fixture files in the asset layout (data/vader, data/wiki, data/ptb)

RATINGS = [2.5, -1.0, 0.0, 3.1, -2.2] * 6  # 30 sentences, 6 neutral ones dropped by rt-polarity


def write_assets(root, shuffle_seed=None):
    rows = [(f"{i + 1}", r, f"sentence {i + 1} rated {r}") for i, r in enumerate(RATINGS)]
    if shuffle_seed is not None:  # the same items in another file order
        random.Random(shuffle_seed).shuffle(rows)
    (root / "vader").mkdir(parents=True)
    for name in tasks.VADER_FILES.values():
        (root / "vader" / f"{name}_GroundTruth.txt").write_bytes(
            "".join(f"{i}\t{r}\t{t}\r\n" for i, r, t in rows).encode())
    topics = list(tasks.WIKI_TOPICS) + ["Uncategorized"]
    wiki = {f"Title {i}": {"title": f"Title {i}", "extract": f"Extract {i}.", "topic": topics[i % len(topics)],
                           "description": "" if i % 5 == 0 else f"description {i}"} for i in range(24)}
    items = list(wiki.items())
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    (root / "wiki").mkdir()
    (root / "wiki" / "summaries_en-us.json").write_text(json.dumps(dict(items)))
    (root / "ptb").mkdir()
    (root / "ptb" / "train.txt").write_text("".join(f" ptb line {i} \n" for i in range(12)) + "\n")
    return root


@pytest.fixture
def assets(tmp_path):
    return write_assets(tmp_path / "data")


def test_rt_polarity_and_regression(assets):
    pol = tasks.load_task("rt-polarity", data_dir=assets)
    # 24 non-neutral items: dev = test = floor(24/10) = 2, train = 20
    assert {k: len(v) for k, v in pol.items()} == {"train": 20, "dev": 2, "test": 2}
    every = [e for part in pol.values() for e in part]
    assert sorted(e.uid for e in every) == sorted(str(i + 1) for i, r in enumerate(RATINGS) if r != 0)
    for e in every:  # label = sign of the rating, read back from the sentence text
        assert e.label == int(float(e.text.split()[-1]) > 0)
    reg = tasks.load_task("rt-regression", data_dir=assets)
    assert {k: len(v) for k, v in reg.items()} == {"train": 24, "dev": 3, "test": 3}
    assert all(isinstance(e.label, float) and e.label == float(e.text.split()[-1]) for p in reg.values() for e in p)


def test_splits_deterministic_and_order_free(tmp_path, assets):
    shuffled = write_assets(tmp_path / "other", shuffle_seed=7)
    for task in ("rt-polarity", "wiki-topic", "wiki-describe"):
        a = tasks.load_task(task, data_dir=assets, seed=0)
        assert a == tasks.load_task(task, data_dir=assets, seed=0)
        assert a == tasks.load_task(task, data_dir=shuffled, seed=0)  # file and dict order play no part
        assert a != tasks.load_task(task, data_dir=assets, seed=1)


def test_wiki_tasks(assets):
    topic = tasks.load_task("wiki-topic", data_dir=assets)
    every = [e for part in topic.values() for e in part]
    assert len(every) == 22  # 24 articles, 2 of them Uncategorized (i = 11, 23)
    for e in every:
        i = int(e.uid.split()[-1])
        assert e.text == f"Extract {i}." and tasks.WIKI_TOPICS[e.label] == tasks.WIKI_TOPICS[i % 12]
    describe = tasks.load_task("wiki-describe", data_dir=assets)
    every = [e for part in describe.values() for e in part]
    assert len(every) == 24 - 5  # i % 5 == 0 has an empty description
    assert tasks.get_task("wiki-describe").kind == "generation"
    for e in every:
        assert e.label == f"description {e.uid.split()[-1]}"
        assert f"Title: {e.uid}" in e.text and f"Extract {e.uid.split()[-1]}." in e.text
    with pytest.raises(ValueError, match="holdout applies to GLUE and JSONL only"):
        tasks.load_task("wiki-topic", data_dir=assets, holdout=0.1)


def test_standin_errors(tmp_path, assets):
    with pytest.raises(FileNotFoundError, match="movieReviewSnippets_GroundTruth.txt: VADER ground truth not found"):
        tasks.load_task("rt-polarity", data_dir=tmp_path / "nowhere")
    bad = assets / "vader" / "movieReviewSnippets_GroundTruth.txt"
    bad.write_text("1\t2.0\tfine\n2\t4.5\ttoo high\n")
    with pytest.raises(ValueError, match=f"{bad}:2: label '4.5' out of range"):
        tasks.load_task("rt-polarity", data_dir=assets)
    bad.write_text("1\t2.0\tfine\n2\tno tab here\n")
    with pytest.raises(ValueError, match=f"{bad}:2: malformed line, 2 tab-separated fields where 3"):
        tasks.load_task("rt-regression", data_dir=assets)


def test_default_data_dir_follows_slora_home(tmp_path, monkeypatch):
    write_assets(tmp_path / "data")
    monkeypatch.setenv("SLORA_HOME", str(tmp_path))
    assert tasks.load_task("rt-polarity") == tasks.load_task("rt-polarity", data_dir=tmp_path / "data")


# -----------------------------------------------------------------------------
# JSONL


def test_jsonl_classification_and_instructions(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(20)]
                        + [{"text": "a", "text_pair": "b", "label": 1}])
    spec, splits = tasks.load_jsonl("classification", train, seed=0, holdout=0.2)
    assert spec.num_labels == 3 and spec.kind == "classification"
    assert {k: len(v) for k, v in splits.items()} == {"train": 17, "dev": 4}
    pair = [e for p in splits.values() for e in p if e.text == "a"]
    assert triples(pair) == [("a", "b", 1)]
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "Say hi", "response": "hi"}])
    spec, splits = tasks.load_jsonl("instructions", dev, dev)
    assert spec.kind == "generation" and triples(splits["dev"]) == [("Say hi", None, "hi")]


def test_jsonl_errors(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": 0}, "{not json"])
    with pytest.raises(ValueError, match=f"{f}:2: not valid JSON"):
        tasks.read_jsonl(f, "classification")
    write_jsonl(f, [{"text": "a", "label": "pos"}])
    with pytest.raises(ValueError, match=f"{f}:1: field 'label' must be of type int, got 'pos'"):
        tasks.read_jsonl(f, "classification")
    write_jsonl(f, [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    d = write_jsonl(tmp_path / "d.jsonl", [{"text": "c", "label": 0}, {"text": "d", "label": 2}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: label 2 is outside the classes 0..1 seen in training"):
        tasks.load_jsonl("classification", f, d)
    assert tasks.load_jsonl("classification", f, d, num_labels=3)[0].num_labels == 3  # stated: class 2 exists


# -----------------------------------------------------------------------------
# Calibration sources


def test_calibration_sources(tmp_path, assets):
    for source, n in [("ptb", 12), ("wiki", 24), ("tweets", 30), ("amazon", 5), ("nyt", 5), ("rt", 30)]:
        got = tasks.calibration_examples(source, n, seed=1, data_dir=assets)
        assert len(got) == n == len({e.uid for e in got})
        assert got == tasks.calibration_examples(source, n, seed=1, data_dir=assets)
        assert all(e.text and e.label is None for e in got)
    assert {e.text for e in tasks.calibration_examples("ptb", 12, data_dir=assets)} == {
        f"ptb line {i}" for i in range(12)}
    text = tmp_path / "calib.txt"
    text.write_text("first line\n\nsecond line\n")
    assert sorted(e.text for e in tasks.calibration_examples(str(text), 2)) == ["first line", "second line"]
    train = tasks.load_task("rt-polarity", data_dir=assets)["train"]
    task = tasks.calibration_examples("task", 5, train=train, seed=0)
    assert set(task) <= set(train) and len(task) == 5
    with pytest.raises(ValueError, match="has 2 sequences .non-empty lines.; cannot draw 3"):
        tasks.calibration_examples(str(text), 3)
    with pytest.raises(ValueError, match=r"'wikitext' is neither one of \('task', 'ptb', 'wiki'"):
        tasks.calibration_examples("wikitext", 3)
    with pytest.raises(ValueError, match="needs the task's train examples"):
        tasks.calibration_examples("task", 3)



# -----------------------------------------------------------------------------
# The real assets (python -m slora.assets)


@pytest.mark.slow
def test_real_standins():
    sizes = {name: {k: len(v) for k, v in tasks.load_task(name).items()}
             for name in ("rt-polarity", "rt-regression", "wiki-topic", "wiki-describe")}
    # docs/assets.md: 10,605 movie sentences, 37 rated exactly 0; 9,033 topic items; 9,862 with a description
    assert sizes == {"rt-polarity": {"train": 8456, "dev": 1056, "test": 1056},      # 10,568 = 10,605 - 37
                     "rt-regression": {"train": 8485, "dev": 1060, "test": 1060},    # 10,605
                     "wiki-topic": {"train": 7227, "dev": 903, "test": 903},         # 9,033
                     "wiki-describe": {"train": 7890, "dev": 986, "test": 986}}      # 9,862
    pol = tasks.load_task("rt-polarity")
    positives = sum(e.label for part in pol.values() for e in part)
    assert positives == 5242  # docs/assets.md: 5,242 sentences rated > 0
    # pinned split (seed 0, torch.randperm on a CPU generator, torch 2.13): a change means new splits
    assert [e.uid for e in pol["test"][:3]] == PINNED_RT_TEST_UIDS
    for source in ("ptb", "wiki", "tweets", "amazon", "nyt", "rt"):
        assert len(tasks.calibration_examples(source, 64)) == 64
