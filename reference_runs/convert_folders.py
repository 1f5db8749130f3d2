"""Convert the recorded run folders of reference_runs/<suite>/<task>/<name>/ into reference_runs/<suite>/runs.jsonl.

    python reference_runs/convert_folders.py     # writes every suite's runs.jsonl, checking each line against its folder

One line per run (store.py), sorted by (task, name). Each line is read back through store.Record and compared with the
folder's files: command, env, args and metrics whole; ranks whole and in order; sensitivity.json's config (with the
per-module "hessian") and "weights" whole, and of its modules the kept fields (all of them for an allocate-only run);
epoch_sensitivity.json whole; every log event less its timestamp, either kept or equal to what ranks.json and
metrics.json hold. Any difference stops the conversion.
"""
import json
import sys
from pathlib import Path

import store

HERE = Path(__file__).resolve().parent
SUITES = ("nlu", "nlg", "nlg-full", "mpnet", "stability", "figure3")


def read(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def check(folder: Path, rec: store.Record) -> None:
    def same(what, got, want):
        if got != want:
            raise AssertionError(f"{folder}: {what} differs")
    same("command", rec.command, (folder / "command.txt").read_text().strip())
    for name, got in (("env.json", rec.env), ("args.json", rec.args), ("metrics.json", rec.metrics)):
        same(name, got, read(folder, name))
    ranks = read(folder, "ranks.json")
    same("ranks.json", list(rec.ranks().items()), list(ranks.items()))
    sens, got = read(folder, "sensitivity.json"), rec.sensitivity()
    same("sensitivity config", got["config"], sens["config"])
    same("sensitivity keys", sorted(got), sorted(sens))
    same("sensitivity weights", got.get("weights"), sens.get("weights"))
    same("module order", list(got["modules"]), list(sens["modules"]))
    for n, m in sens["modules"].items():
        kept = m if rec.args.get("allocate_only") else {k: m[k] for k in store.THETA_FIELDS}
        same(f"module {n}", got["modules"][n], kept)
    if (folder / "epoch_sensitivity.json").is_file():
        same("epoch_sensitivity.json", rec.epochs(), read(folder, "epoch_sensitivity.json")["epochs"])
    else:
        same("epochs", rec.epochs(), [])
    kept = iter(rec.log())
    metrics = read(folder, "metrics.json")
    for row in (folder / "log.jsonl").read_text().splitlines():
        e = json.loads(row)
        e.pop("time")
        if store._repeated(e, metrics, ranks):
            continue
        same("log event", next(kept), e)
    same("log length", next(kept, None), None)


def main():
    total = 0
    for suite in SUITES:
        folders = sorted(p.parent for p in (HERE / suite).glob("*/*/env.json"))
        path = HERE / suite / store.FILE
        path.unlink(missing_ok=True)
        for folder in folders:
            task, name = folder.parent.name, folder.name
            line = store.from_folder(folder, task, name, (folder / "command.txt").read_text().strip(),
                                     read(folder, "env.json"))
            store.append(path, line)
        runs = store.load(path)
        assert len(runs) == len(folders), (suite, len(runs), len(folders))
        for folder in folders:
            check(folder, runs[folder.parent.name, folder.name])
        print(f"{suite}: {len(folders)} runs -> {path.relative_to(HERE)} ({path.stat().st_size:,} bytes), checked")
        total += len(folders)
    print(f"{total} runs")


if __name__ == "__main__":
    sys.exit(main())
