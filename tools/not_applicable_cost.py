"""CPU of an instance the model's intended use refuses against one it takes (development tooling).

Runs the runtime's reader (what the service runs for each instance) on an out-of-scope instance, which
stops at the header, and the whole detection on an applicable one, each ``--repeat`` times in this
process, and reports the process CPU time (user + system, ``time.process_time``) per instance and their
ratio. One thread for inference, so the figures are per core. Usage::

    .venv/bin/python tools/not_applicable_cost.py --model models/demo \\
        --applicable examples/study_01/IM0015.dcm --refused /tmp/oos/sagittal-mr.dcm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from retinaedge.runtime.detector import Detector
from retinaedge.runtime.intended_use import NotApplicableError


def cpu_ms_per_instance(run: object, repeat: int) -> float:
    start = time.process_time()
    for _ in range(repeat):
        run()  # type: ignore[operator]
    return (time.process_time() - start) * 1e3 / repeat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--applicable", type=Path, required=True)
    p.add_argument("--refused", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args(argv)
    applicable, refused = args.applicable.read_bytes(), args.refused.read_bytes()
    with Detector.open(args.model, threads=1) as det:
        det.detect(applicable)  # warm-up

        def refuse() -> None:
            try:
                det.detect(refused)
            except NotApplicableError:
                return
            raise SystemExit(f"{args.refused} is applicable to the model")

        refuse()
        taken = cpu_ms_per_instance(lambda: det.detect(applicable), args.repeat)
        refused_ms = cpu_ms_per_instance(refuse, args.repeat)
    report = {
        "applicable_cpu_ms": round(taken, 3),
        "not_applicable_cpu_ms": round(refused_ms, 3),
        "ratio": round(refused_ms / taken, 4),
        "repeat": args.repeat,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
