"""What a task is: task specs, readers (GLUE, offline stand-ins, JSONL), seeded splits, calibration sources.

  spec = get_task(name); splits = load_task(name, glue_dir=..., seed=0)   -> {"train", "dev"[, "test"]}
  spec, splits = load_jsonl(kind, train_path[, dev_path])                 (user data)
The splits have the same roles for every task: fine-tune on "train", evaluate every epoch (and select) on "dev",
report "test" once at the end where it exists.
  - GLUE: train.tsv -> train, dev.tsv -> dev (GLUE's test labels are hidden): the usual GLUE protocol. With
    holdout=f > 0 a seeded fraction f of train.tsv becomes "dev" for selection and dev.tsv becomes "test".
    MNLI adds dev_mismatched.tsv as "dev_mismatched" ("test_mismatched" with a holdout).
  - Stand-ins: one seeded 80/10/10 split; dev and test get floor(n/10) items each, train the rest.
Split rule (`seeded_order`): items sorted by `uid`, then permuted by torch.randperm(n, generator=torch.Generator()
.manual_seed(seed)); test is the last block, dev the block before. Hash seed, dict and file order play no part.
How Examples become tensors (encoding, chat rendering, collation, calibration batches) is slora.batches.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Sequence

import torch

from slora.errors import SloraError
from slora.data.scores import GLUE_SCORES


# -----------------------------------------------------------------------------
# Examples and task specs


@dataclass(frozen=True)
class Example:
    uid: str                             # stable identity: "<file name>:<line>", a VADER ID or a Wikipedia title
    text: str | tuple                    # the sentence, the first of a pair, the generation prompt, or (chat) the
    #                                      (role, content) pairs before the final assistant turn
    text_pair: str | None = None         # second sentence of a pair task
    label: int | float | str | None = None  # class id | regression target | reference text | None (calibration)


@dataclass(frozen=True)
class TaskSpec:
    name: str                            # the key in TASKS
    kind: str                            # "classification" | "regression" | "generation"
    num_labels: int                      # classes; 1 for regression (one output); 0 for generation (LM head)
    text_fields: tuple[str, ...]         # columns/fields read as text (and text_pair)
    label_field: str                     # column/field read as the label
    scores: tuple[str, ...]              # names for slora.data.scores.score
    main_score: str                      # the one that ranks runs
    label_names: tuple[str, ...] = ()    # file value of each class id, in id order
    label_range: tuple[float, float] | None = None  # regression targets must lie in [lo, hi]
    folder: str | None = None            # sub-folder of GLUE_DIR (GLUE tasks only)

    def __post_init__(self):
        if self.kind not in ("classification", "regression", "generation"):
            raise ValueError(f"task {self.name}: unknown kind {self.kind!r}")
        if self.main_score not in self.scores:
            raise ValueError(f"task {self.name}: main score {self.main_score!r} not in {self.scores}")


def _glue(name, folder, fields, label, label_names=(), label_range=None, kind="classification"):
    names, main = GLUE_SCORES[name]
    n = 1 if kind == "regression" else len(label_names)
    return TaskSpec(name, kind, n, fields, label, names, main, label_names, label_range, folder)


# CoLA's train/dev files have no header; these are its columns (GLUE's CoLA README).
COLA_COLUMNS = ("source", "label", "original_label", "sentence")
NLI2 = ("entailment", "not_entailment")
WIKI_TOPICS = ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics",
               "People", "Philosophy and religion", "Physical sciences", "Society and social sciences",
               "Technology")  # the 11 topics of the Vital Articles file, sorted; "Uncategorized" is dropped
GEN_SCORES = ("bleu4", "rouge1", "rougeL")

TASKS = {
    "cola": _glue("cola", "CoLA", ("sentence",), "label", ("0", "1")),
    "sst2": _glue("sst2", "SST-2", ("sentence",), "label", ("0", "1")),
    "mrpc": _glue("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1")),
    "stsb": _glue("stsb", "STS-B", ("sentence1", "sentence2"), "score", label_range=(0.0, 5.0), kind="regression"),
    "qqp": _glue("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1")),
    "mnli": _glue("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral")),
    "qnli": _glue("qnli", "QNLI", ("question", "sentence"), "label", NLI2),
    "rte": _glue("rte", "RTE", ("sentence1", "sentence2"), "label", NLI2),
    # Offline stand-ins (docs/assets.md): VADER movie sentences and Wikipedia Vital Articles.
    "rt-polarity": TaskSpec("rt-polarity", "classification", 2, ("text",), "sign(mean_rating)",
                            ("accuracy", "f1", "mcc"), "accuracy", ("negative", "positive")),
    "rt-regression": TaskSpec("rt-regression", "regression", 1, ("text",), "mean_rating",
                              ("pearson", "spearman", "pearson_spearman"), "pearson_spearman", label_range=(-4.0, 4.0)),
    "wiki-topic": TaskSpec("wiki-topic", "classification", len(WIKI_TOPICS), ("extract",), "topic",
                           ("accuracy",), "accuracy", WIKI_TOPICS),
    # ROUGE-L ranks runs: on descriptions of ~6 words it is steadier than corpus BLEU-4.
    "wiki-describe": TaskSpec("wiki-describe", "generation", 0, ("title", "extract"), "description",
                              GEN_SCORES, "rougeL"),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (JSONL data: load_jsonl)")
    return TASKS[name]


# -----------------------------------------------------------------------------
# Seeded splits


def seeded_order(items: Sequence[Example], seed: int) -> list[Example]:
    """Items sorted by uid, then permuted by a torch.Generator seeded with `seed`."""
    ordered = sorted(items, key=lambda e: e.uid)
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed))
    return [ordered[i] for i in perm.tolist()]


def seeded_split(items: Sequence[Example], n_dev: int, n_test: int, seed: int, source) -> dict[str, list]:
    """train / dev [/ test] of the seeded order: test is its last n_test items, dev the n_dev before them."""
    order, n_train = seeded_order(items, seed), len(items) - n_dev - n_test
    if n_dev < 1 or n_train < 1:
        raise ValueError(f"{source}: {len(items)} items cannot give {n_dev} dev, {n_test} test and >= 1 train")
    return {"train": order[:n_train], "dev": order[n_train:n_train + n_dev]} | (
        {"test": order[n_train + n_dev:]} if n_test else {})


def carve(items: Sequence[Example], fraction: float, seed: int, source) -> dict[str, list]:
    """train / dev with floor(fraction·n) items in dev (+1e-9: 0.29·100 is 28.999... in floats)."""
    return seeded_split(items, math.floor(len(items) * fraction + 1e-9), 0, seed, source)


# -----------------------------------------------------------------------------
# GLUE from a local folder in the standard layout (GLUE_DIR/<Task>/{train,dev}.tsv)


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's contents; bytes that are not UTF-8 are an error naming the file and the line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SloraError(f"{path}:{line}", f"byte {raw[e.start]:#04x} is not UTF-8; save the file as UTF-8") from None


def _tsv(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, tab-separated fields) of each non-empty line. No quote handling: GLUE's and VADER's
    files are not CSV-quoted (transformers reads GLUE with quotechar=None). CRLF endings and a UTF-8 byte-order
    mark (MRPC) are dropped."""
    lines = read_text(path, "utf-8-sig").split("\n")
    return [(i, line.rstrip("\r").split("\t")) for i, line in enumerate(lines, start=1) if line.rstrip("\r")]


def _check_width(path: Path, i: int, fields: list[str], width: int) -> None:
    if len(fields) != width:
        raise ValueError(f"{path}:{i}: malformed line, {len(fields)} tab-separated fields where {width} are expected")


def _parse_label(spec: TaskSpec, raw: str, where: str) -> int | float:
    if spec.kind == "regression":
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where}: label {raw!r} is not a number") from None
        if not spec.label_range[0] <= value <= spec.label_range[1]:  # also rejects nan
            raise ValueError(f"{where}: label {raw!r} out of range {list(spec.label_range)}")
        return value
    if raw not in spec.label_names:
        raise ValueError(f"{where}: label {raw!r} out of range for task {spec.name}; expected one of "
                         f"{list(spec.label_names)}")
    return spec.label_names.index(raw)


def read_glue_tsv(spec: TaskSpec, path) -> list[Example]:
    """One GLUE TSV file as Examples; every line must have as many fields as the header (CoLA: COLA_COLUMNS)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GLUE file not found (expected GLUE_DIR/{spec.folder}/{path.name})")
    rows = _tsv(path)
    if spec.name != "cola" and not rows:
        raise ValueError(f"{path}: empty file, expected a header line")
    header, rows = (list(COLA_COLUMNS), rows) if spec.name == "cola" else (rows[0][1], rows[1:])
    missing = [c for c in spec.text_fields + (spec.label_field,) if c not in header]
    if missing:
        raise ValueError(f"{path}:1: header lacks column(s) {missing} of task {spec.name}; header is {header}")
    cols = [header.index(c) for c in spec.text_fields]
    out = []
    for i, fields in rows:
        _check_width(path, i, fields, len(header))
        texts = [fields[c] for c in cols] + [None]
        label = _parse_label(spec, fields[header.index(spec.label_field)], f"{path}:{i}")
        out.append(Example(f"{path.name}:{i}", texts[0], texts[1], label))
    return out


# -----------------------------------------------------------------------------
# Offline stand-ins from the fetched assets ($SLORA_HOME/data, see docs/assets.md)

VADER_FILES = {"rt": "movieReviewSnippets", "tweets": "tweets", "amazon": "amazonReviewSnippets",
               "nyt": "nytEditorialSnippets"}
# The wiki-describe instruction; the model answers with the article's short description.
DESCRIBE_PROMPT = "Write a short description (a few words) of this Wikipedia article.\n\nTitle: {title}\n\n{extract}"


def _data_root(data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    from slora.io.assets import data_dir as assets_data_dir  # lazy: slora.assets owns SLORA_HOME and fetching
    return Path(assets_data_dir())


def read_vader(name: str, data_dir=None) -> list[tuple[str, float, str]]:
    """(ID, mean rating in [-4, 4], text) for each line `ID\\tmean_rating\\ttext` of a VADER ground-truth file."""
    path = _data_root(data_dir) / "vader" / f"{VADER_FILES[name]}_GroundTruth.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VADER ground truth not found (run `python -m slora.assets`)")
    out = []
    for i, fields in _tsv(path):
        _check_width(path, i, fields, 3)
        out.append((fields[0], _parse_label(TASKS["rt-regression"], fields[1], f"{path}:{i}"), fields[2]))
    return out


def read_wiki(data_dir=None) -> list[dict]:
    """The Vital Articles summaries as a list of {title, extract, description, topic}, sorted by title."""
    path = _data_root(data_dir) / "wiki" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Wikipedia summaries not found (run `python -m slora.assets`)")
    try:
        items = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise SloraError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg}); re-run `python -m slora.assets`") from None
    if not isinstance(items, dict):
        raise SloraError(path, "expected a JSON object {key: summary}; re-run `python -m slora.assets`")
    for key, item in items.items():
        item = item if isinstance(item, dict) else {}
        missing = [f for f in ("title", "extract", "description", "topic") if not isinstance(item.get(f), str)]
        if missing:
            raise ValueError(f"{path}: entry {key!r} lacks string field(s) {missing}")
    return sorted(items.values(), key=lambda d: d["title"])


def standin_examples(spec: TaskSpec, data_dir=None) -> list[Example]:
    """All items of a stand-in task, before splitting."""
    if spec.name in ("rt-polarity", "rt-regression"):
        rows = read_vader("rt", data_dir)
        if spec.name == "rt-regression":
            return [Example(uid, text, None, rating) for uid, rating, text in rows]
        # polarity: label = sign of the mean rating; the neutral (exactly 0) sentences have no sign
        return [Example(uid, text, None, int(rating > 0)) for uid, rating, text in rows if rating != 0]
    wiki = read_wiki(data_dir)
    if spec.name == "wiki-topic":
        unknown = sorted({d["topic"] for d in wiki} - set(WIKI_TOPICS) - {"Uncategorized"})
        if unknown:
            raise ValueError(f"wiki-topic: unexpected topic(s) {unknown} in the summaries file")
        # the extract names its subject in its first sentence, so the title adds nothing
        return [Example(d["title"], d["extract"], None, WIKI_TOPICS.index(d["topic"]))
                for d in wiki if d["topic"] != "Uncategorized"]
    return [Example(d["title"], DESCRIBE_PROMPT.format(**d), None, d["description"])
            for d in wiki if d["description"].strip()]


def load_task(name: str, *, glue_dir=None, data_dir=None, seed: int = 0,
              holdout: float = 0.0) -> dict[str, list[Example]]:
    """The splits of a named task (roles and split rule: module docstring). glue_dir: the folder holding CoLA/,
    SST-2/, ... (GLUE only). data_dir: the assets' data folder, default slora.assets.data_dir(). holdout: the
    fraction of GLUE's train.tsv carved out as "dev"."""
    spec = get_task(name)
    if spec.folder is not None:
        if glue_dir is None:
            raise ValueError(f"task {name} reads GLUE from a local folder: pass glue_dir (GLUE_DIR/{spec.folder}/)")
        folder = Path(glue_dir) / spec.folder
        files = {"dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"} if name == "mnli" else {}
        train = read_glue_tsv(spec, folder / "train.tsv")
        devs = {k: read_glue_tsv(spec, folder / f) for k, f in (files or {"dev": "dev.tsv"}).items()}
        if holdout == 0.0:
            return {"train": train, **devs}
        # select on a seeded part of train.tsv; GLUE's dev files become the held-out test sets
        tests = {k.replace("dev", "test"): v for k, v in devs.items()}
        return carve(train, holdout, seed, folder / "train.tsv") | tests
    if holdout:
        raise ValueError(f"task {name} already has a seeded dev split; holdout applies to GLUE and JSONL only")
    items = standin_examples(spec, data_dir)
    return seeded_split(items, len(items) // 10, len(items) // 10, seed, f"task {name}")


# -----------------------------------------------------------------------------
# Generic JSONL: classification {"text", ["text_pair"], "label"}, instructions {"prompt", "response"} or chat
# {"messages": [{"role", "content"}, …]} (the format of TRL, torchtune and hosted fine-tuning APIs)

JSONL_KINDS = ("classification", "instructions", "chat")


def read_jsonl(path, kind: str) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: JSONL file not found")
    need = {"classification": {"text": str, "label": int}, "instructions": {"prompt": str, "response": str},
            "chat": {}}[kind]
    out = []
    for i, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        if kind == "chat":
            out.append(chat_example(obj, f"{path.name}:{i}", f"{path}:{i}"))
            continue
        pair = obj.get("text_pair")
        for key, typ in need.items():  # bool is an int subclass in Python, so reject it explicitly
            if not isinstance(obj.get(key), typ) or isinstance(obj.get(key), bool):
                raise ValueError(f"{path}:{i}: field {key!r} must be of type {typ.__name__}, got {obj.get(key)!r}")
        if pair is not None and not isinstance(pair, str):
            raise ValueError(f"{path}:{i}: field 'text_pair' must be of type str, got {pair!r}")
        texts = (obj["prompt"], None, obj["response"]) if kind == "instructions" else (obj["text"], pair, obj["label"])
        out.append(Example(f"{path.name}:{i}", *texts))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


CHAT_ROLES = ("system", "user", "assistant")


def chat_example(obj: dict, uid: str, where: str) -> Example:
    """{"messages": [{"role", "content"}, …]} as an Example: text = the (role, content) pairs before the final
    assistant turn (a tuple), label = that turn's content (the reference of generation scoring)."""
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list, got {msgs!r}")
    pairs = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: field 'messages[{j}]' must be an object, got {m!r}")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"{where}: field 'messages[{j}].role' must be one of {CHAT_ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: field 'messages[{j}].content' must be of type str, got {m.get('content')!r}")
        pairs.append((m["role"], m["content"]))
    if pairs[-1][0] != "assistant" or len(pairs) < 2:
        raise ValueError(f"{where}: field 'messages' must end with an assistant turn that follows at least one "
                         f"other message (roles: {[r for r, _ in pairs]})")
    return Example(uid, tuple(pairs[:-1]), None, pairs[-1][1])


TASK_JSONL_CLS = TaskSpec("jsonl-classification", "classification", 2, ("text", "text_pair"), "label",
                          ("accuracy",), "accuracy")  # the kind and name; num_labels comes from the data


def load_jsonl(kind: str, train, dev=None, test=None, *, num_labels: int | None = None, seed: int = 0,
               holdout: float = 0.1) -> tuple[TaskSpec, dict[str, list[Example]]]:
    """(spec, splits) for user JSONL files. kind: "classification" (integer labels 0..num_labels-1; num_labels
    defaults to 1 + the largest train label), "instructions" or "chat" (`chat_example`). Without a dev file a
    seeded `holdout` fraction of train becomes dev."""
    if kind not in JSONL_KINDS:
        raise ValueError(f"JSONL kind must be one of {JSONL_KINDS}, got {kind!r}")
    splits = {"train": read_jsonl(train, kind)}
    splits = carve(splits["train"], holdout, seed, train) if dev is None else splits | {"dev": read_jsonl(dev, kind)}
    splits |= {"test": read_jsonl(test, kind)} if test is not None else {}
    if kind == "instructions":
        return TaskSpec("jsonl-instructions", "generation", 0, ("prompt",), "response", GEN_SCORES, "rougeL"), splits
    if kind == "chat":  # scored on the final assistant turn
        return TaskSpec("jsonl-chat", "generation", 0, ("messages",), "messages", GEN_SCORES, "rougeL"), splits
    files = {"train": train, "dev": dev if dev is not None else train, "test": test}
    where = {(part, e.uid): f"{files[part]}:{e.uid.rsplit(':', 1)[1]}" for part, items in splits.items()
             for e in items}
    negative = next(((part, e) for part, items in splits.items() for e in items if e.label < 0), None)
    if negative:
        raise SloraError(where[negative[0], negative[1].uid], f"label {negative[1].label} is negative; classes are "
                                                              f"numbered 0..K-1")
    seen = sorted({e.label for e in splits["train"]})
    if num_labels is None:
        # the classes are those seen in training, and they must be 0..K-1: labels {0, 1, 1000} would otherwise
        # build a 1001-way head with 998 classes that no example ever teaches. So K is at most the number of
        # distinct labels, and the first missing classes are found among the len(seen) + 5 smallest values: a
        # label of 10⁸ allocates nothing of that size (a set of range(K) would be gigabytes)
        k = seen[-1] + 1
        if k > len(seen):
            present = set(seen)
            gaps = list(islice((c for c in range(k) if c not in present), 6))
            first = next(e for e in splits["train"] if e.label == seen[-1])
            raise SloraError(where["train", first.uid], f"label {seen[-1]}, but no training example has class "
                             f"{', '.join(map(str, gaps[:5]))}{' ...' if len(gaps) > 5 else ''}; labels must be "
                             f"0..K-1: renumber them, or pass --num-labels K if some classes have no training example")
    else:
        k = num_labels
    check_classes(TASK_JSONL_CLS, splits["train"], train)
    for part, items in splits.items():
        for e in items:
            if not 0 <= e.label < k:
                hint = ("pass --num-labels K to state the number of classes" if num_labels is None
                        else f"--num-labels is {num_labels}")
                raise SloraError(where[part, e.uid], f"label {e.label} is outside the classes 0..{k - 1} "
                                 f"{'seen in training' if num_labels is None else 'stated'}; {hint}")
    return TaskSpec(TASK_JSONL_CLS.name, "classification", k, ("text", "text_pair"), "label", ("accuracy",),
                    "accuracy", tuple(str(i) for i in range(k))), splits


def check_classes(spec: TaskSpec, train: Sequence[Example], source) -> None:
    """A classification task trains on at least two classes: with one, every prediction is that class and
    accuracy on a dev set of the same class reads 1.0 while nothing was learnt."""
    if spec.kind != "classification":
        return
    seen = sorted({e.label for e in train})
    if len(seen) < 2:
        raise SloraError(source, f"the {len(train)} training example(s) all have label {seen[0] if seen else None}; "
                                 f"classification needs at least two classes in training (more or other data, "
                                 f"or a larger --max-train)")


# -----------------------------------------------------------------------------
# Calibration sets (paper §4.7: by default the task's own training inputs)

CALIBRATION_SOURCES = ("task", "ptb", "wiki") + tuple(VADER_FILES)


def _text_file_examples(path: Path) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration text not found")
    return [Example(f"{path.name}:{i}", s.strip())
            for i, s in enumerate(read_text(path).split("\n"), start=1) if s.strip()]


def calibration_examples(source: str, n: int, *, train: Sequence[Example] | None = None, seed: int = 0,
                         data_dir=None) -> list[Example]:
    """n sequences drawn without replacement (the seeded order's first n) from a source: "task" (the task's
    `train` examples; their inputs are used), "ptb" (PTB train lines), "wiki" (article extracts), "tweets",
    "amazon", "nyt", "rt" (VADER sentences), or the path of a text file with one sequence per non-empty line."""
    if source == "task":
        if train is None:
            raise ValueError("calibration source 'task' needs the task's train examples")
        pool = list(train)
    elif source == "ptb":
        pool = _text_file_examples(_data_root(data_dir) / "ptb" / "train.txt")
    elif source == "wiki":
        pool = [Example(d["title"], d["extract"]) for d in read_wiki(data_dir)]
    elif source in VADER_FILES:
        pool = [Example(uid, text) for uid, _, text in read_vader(source, data_dir)]
    elif Path(source).is_file():
        pool = _text_file_examples(Path(source))
    else:
        raise ValueError(f"calibration source {source!r} is neither one of {CALIBRATION_SOURCES} nor a file")
    if not 0 < n <= len(pool):
        culprit = source if source not in CALIBRATION_SOURCES else f"calibration source {source!r}"
        raise SloraError(culprit, f"has {len(pool)} sequences (non-empty lines); cannot draw {n}: lower --calib-n")
    return seeded_order(pool, seed)[:n]
