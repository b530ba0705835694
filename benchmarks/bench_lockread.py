"""Reading a dvc.lock as DVC does, whole, against entry by entry: ``python -m benchmarks.bench_lockread``.

pipeline/dvc_lockcache.py's ``parse_lock`` gives the dict DVC's own parse (ruamel, YAML 1.2) gives, parsing
only the stage entries whose text it has not parsed before. On the study's lock (study/dvc.lock, by default)
this times, interleaved round by round in one process: DVC's parse of the whole text (the baseline); the
first entry-wise read (nothing cached); a later process's read (memory empty, the entries from the cache file
under the scratch repository's ``.dvc/tmp``); and a read after one entry changed, as a finished cell leaves
the lock. Every result is checked equal, type for type, to DVC's parse.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, Result, median, parser
from pipeline import dvc_lockcache
from pipeline.dvc_lockcache import _same, parse_lock
from pipeline.dvc_lockfile import _dvc_render


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--lock", default=str(ROOT / "study" / "dvc.lock"), help="the lock (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    args = p.parse_args(argv)
    from dvc.utils.strictyaml import parse_yaml

    text = Path(args.lock).read_text()
    whole = parse_yaml(text, args.lock)
    # The same lock after one entry changed, rendered by DVC's own dumper as its update would.
    changed_data = copy.deepcopy(whole)
    name = next(reversed(changed_data["stages"]))
    changed_data["stages"][name]["cmd"] = str(changed_data["stages"][name].get("cmd", "")) + " --changed"
    changed = _dvc_render(changed_data)
    changed_whole = parse_yaml(changed, args.lock)
    arms: dict[str, list[float]] = {
        "dvc_whole": [],
        "first": [],
        "later_process": [],
        "one_entry_changed": [],
    }
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=args.work or None) as scratch:
            (Path(scratch) / ".dvc").mkdir()
            path = str(Path(scratch) / "dvc.lock")
            t = time.perf_counter()
            parse_yaml(text, path)
            arms["dvc_whole"].append(time.perf_counter() - t)
            dvc_lockcache._MEMORY.clear()
            for arm, body, want in (
                ("first", text, whole),
                ("later_process", text, whole),
                ("one_entry_changed", changed, changed_whole),
            ):
                dvc_lockcache._MEMORY.clear()  # each arm as a new process: what the cache file holds
                t = time.perf_counter()
                got = parse_lock(body, path, parse_yaml)
                arms[arm].append(time.perf_counter() - t)
                assert _same(got, want), f"{arm}: not DVC's parse"
    res = Result("lockread")
    res.settings = {
        "lock": str(Path(args.lock).relative_to(ROOT)),
        "bytes": len(text.encode()),
        "entries": len(whole.get("stages") or {}),
        "rounds": args.rounds,
    }
    base = median(arms["dvc_whole"])
    for arm, secs in arms.items():
        res.measurements[arm] = {
            "seconds": [round(s, 3) for s in secs],
            "median_s": round(median(secs), 3),
            "ratio_to_dvc_whole": round(median(secs) / base, 3),
        }
        print(
            f"{arm}: median {median(secs):.3f} s ({median(secs) / base:.3f} of DVC's whole parse)", flush=True
        )
    res.target(
        "later process's read / DVC's whole parse",
        res.measurements["later_process"]["ratio_to_dvc_whole"],
        "<=",
        0.2,
    )
    res.target(
        "read after one entry changed / DVC's whole parse",
        res.measurements["one_entry_changed"]["ratio_to_dvc_whole"],
        "<=",
        0.2,
    )
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
