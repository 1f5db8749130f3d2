"""The recorded runs of reference_runs/ as data: one JSON line per run in reference_runs/<suite>/runs.jsonl.

A run of a suite is one `python -m slora.finetune` command. It writes a run folder (args.json, sensitivity.json,
ranks.json, metrics.json, log.jsonl, epoch_sensitivity.json where asked, ranks.svg, the PEFT adapter); its line keeps
what a reader of the evidence needs, in these keys:

- "task", "name": the run's place in its suite (its command writes the folder <suite>/<task>/<name>/);
- "command": the exact command, `python -m slora.finetune ... --device D --out reference_runs/<suite>/<task>/<name>`;
- "env": the hardware and versions: device, CPU, torch threads, torch and Python versions, wall time in seconds, and
  how many runs shared the device;
- "args": args.json, every option as the run parsed and resolved it;
- "metrics": metrics.json, whole (final and per-epoch scores, budget, parameter counts, timings);
- "sensitivity": sensitivity.json's "config" less its per-module "hessian" (in "hessian" below), and "weights";
- "modules": the per-matrix data as columns, one list per field, in the order of ranks.json: "module" (the name),
  "rank" (ranks.json), and "theta", "d_in", "d_out" of sensitivity.json's "modules". The allocate-only runs
  (stability/, figure3/), which exist to study the metrics, keep every field there (also "trace", "topk",
  "effective_rank", "s_global", "s_local", "tokens");
- "hessian": sensitivity.json's config["hessian"] as columns in the same order: "shared_with" (the index in
  "module" of the matrix whose H it shares), "dead_inputs", and in full mode "damping", "dominant_rows",
  "offdiag_share", "percdamp";
- "epochs" (where θ was re-measured after each epoch, `--epoch-sensitivity`): epoch_sensitivity.json's epochs, each
  with its "epoch", "seconds" where recorded, and "theta" and "rank" columns in the order of "modules";
- "log": log.jsonl's events without their timestamps, less the events whose content is already in the line (an
  "allocate" event equal to the ranks and budget, an "eval" event equal to an entry of metrics "epochs", a "final"
  event equal to metrics "final"); the training steps keep loss, learning rate and tokens/s.

Left out: the adapter and ranks.svg (the command rebuilds them), the finetune file list (.slora-run.json), the other
per-module fields of a fine-tuning run's sensitivity.json, and the log's timestamps. Record gives the kept parts
back in the form of the run folder's files (ranks(), sensitivity(), epochs(), ...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FILE = "runs.jsonl"
THETA_FIELDS = ("theta", "d_in", "d_out")  # what a fine-tuning run keeps of sensitivity.json's modules
_cache: dict[Path, tuple[tuple[int, int, int], dict]] = {}


def _read(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def _columns(rows: list[dict], where: str) -> dict[str, list]:
    """{field: [value of each row]} for rows that all have the same fields."""
    fields = list(rows[0])
    if any(list(r) != fields for r in rows):
        raise ValueError(f"{where}: the modules do not all have the same fields")
    return {f: [r[f] for r in rows] for f in fields}


def from_folder(folder: Path, task: str, name: str, command: str, env: dict) -> dict:
    """The line of a run from its run folder (the format of the module docstring)."""
    folder = Path(folder)
    args, metrics, ranks = _read(folder, "args.json"), _read(folder, "metrics.json"), _read(folder, "ranks.json")
    sens = _read(folder, "sensitivity.json")
    config = dict(sens["config"])
    hessian = config.pop("hessian")
    names = list(ranks)
    if list(sens["modules"]) != names or list(hessian) != names:
        raise ValueError(f"{folder}: sensitivity.json and ranks.json list the modules in different orders")
    keep = None if args.get("allocate_only") else THETA_FIELDS
    mods = [{k: v for k, v in sens["modules"][n].items() if keep is None or k in keep} for n in names]
    hess = [dict(hessian[n], shared_with=names.index(hessian[n]["shared_with"])) for n in names]
    columns = {"module": names, "rank": [ranks[n] for n in names]} | _columns(mods, f"{folder}/sensitivity.json")
    line = {"task": task, "name": name, "command": command, "env": env, "args": args, "metrics": metrics,
            "sensitivity": {"config": config} | {k: v for k, v in sens.items() if k not in ("config", "modules")},
            "modules": columns, "hessian": _columns(hess, f"{folder}/sensitivity.json")}
    if (folder / "epoch_sensitivity.json").is_file():
        epochs = []
        for e in _read(folder, "epoch_sensitivity.json")["epochs"]:
            if list(e["theta"]) != names or list(e["ranks"]) != names:
                raise ValueError(f"{folder}/epoch_sensitivity.json: modules in another order than ranks.json")
            rest = {k: v for k, v in e.items() if k not in ("theta", "ranks")}
            epochs.append(rest | {"theta": [e["theta"][n] for n in names], "rank": [e["ranks"][n] for n in names]})
        line["epochs"] = epochs
    events = []
    for row in (folder / "log.jsonl").read_text().splitlines():
        e = json.loads(row)
        e.pop("time", None)
        if not _repeated(e, metrics, ranks):
            events.append(e)
    line["log"] = events
    return line


def _repeated(e: dict, metrics: dict, ranks: dict) -> bool:
    """Whether a log event says nothing that ranks.json and metrics.json do not already hold."""
    body = {k: v for k, v in e.items() if k != "event"}
    if e["event"] == "allocate":
        return body == {"budget": metrics.get("budget"), "ranks": ranks}
    if e["event"] == "eval":
        return body in metrics.get("epochs", [])
    if e["event"] == "final":
        return body == metrics.get("final")
    return False


def dumps(line: dict) -> str:
    return json.dumps(line, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def append(path: Path, line: dict) -> None:
    """Add one run to a suite file, as one write of one whole line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps(line) + "\n")


def load(path: Path) -> dict[tuple[str, str], "Record"]:
    """{(task, name): Record} of a suite file ({} when there is none); a name recorded twice is an error."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    if path in _cache and _cache[path][0] == stamp:
        return _cache[path][1]
    runs = {}
    for i, row in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = Record(json.loads(row))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
        if rec.key in runs:
            raise ValueError(f"{path}:{i}: {rec.key} is recorded twice")
        runs[rec.key] = rec
    _cache[path] = (stamp, runs)
    return runs


class Record:
    """One recorded run: its line, and the kept parts of its run folder in the files' own form."""

    def __init__(self, line: dict):
        self.line = line

    @property
    def key(self) -> tuple[str, str]:
        return self.line["task"], self.line["name"]

    @property
    def command(self) -> str:
        return self.line["command"]

    @property
    def env(self) -> dict:
        return self.line["env"]

    @property
    def args(self) -> dict:
        return self.line["args"]

    @property
    def metrics(self) -> dict:
        return self.line["metrics"]

    def _column(self, field: str) -> dict:
        cols = self.line["modules"]
        return dict(zip(cols["module"], cols[field]))

    def ranks(self) -> dict[str, int]:
        """ranks.json."""
        return self._column("rank")

    def theta(self) -> dict[str, float]:
        return self._column("theta")

    def sensitivity(self) -> dict:
        """sensitivity.json as far as it is kept: "config" (with "hessian"), "modules" and "weights"."""
        cols, hess = self.line["modules"], self.line["hessian"]
        names = cols["module"]
        modules = {n: {f: v[i] for f, v in cols.items() if f not in ("module", "rank")} for i, n in enumerate(names)}
        hessian = {n: {f: names[v[i]] if f == "shared_with" else v[i] for f, v in hess.items()}
                   for i, n in enumerate(names)}
        sens = dict(self.line["sensitivity"])
        return sens | {"config": sens["config"] | {"hessian": hessian}, "modules": modules}

    def allocation(self) -> dict:
        """{"theta": {module: θ}, "ranks": {module: r}}, the form slora.method.stability.stability compares."""
        return {"theta": self.theta(), "ranks": self.ranks()}

    def epochs(self) -> list[dict]:
        """epoch_sensitivity.json's "epochs" ([] where θ was not re-measured after each epoch)."""
        names = self.line["modules"]["module"]
        out = []
        for e in self.line.get("epochs", []):
            rest = {k: v for k, v in e.items() if k not in ("theta", "rank")}
            out.append(rest | {"theta": dict(zip(names, e["theta"])), "ranks": dict(zip(names, e["rank"]))})
        return out

    def log(self, event: str | None = None) -> list[dict]:
        """The kept log events, or those of one kind."""
        return [e for e in self.line["log"] if event is None or e["event"] == event]
