"""The precision section of ``report.json``/``report.md``: the rows of :mod:`.precisions` with each row's
speed-up over torchvision eager, the INT8/FP32 ratio on OpenVINO, and the CPU features they depend on.

``speedup_vs_torch_eager`` of a row = torchvision eager p50 (ms/frame, batch 1) / the row's ms/frame at
batch 1. ``int8_speedup_vs_fp32`` = OpenVINO fp32 ms/frame / OpenVINO int8 ms/frame at the largest batch
size; ``met`` only when int8's gate passed. A precision whose gate failed is still timed (compiled for
timing only by :mod:`.precisions`, never served), so the table shows what the gate costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retinaedge.bench.stats import ratio, safe_div
from retinaedge.runtime.backends.openvino.cpu import FEATURES, read_cpu

INT8_GOAL = 1.5
NOTE = (
    "rows opened first, then alternated in rounds in one process on the benchmark's frames (median per row); "
    "on a shared machine the figures are noisy: compare rows of one report, not across reports; torch eager "
    "ran in its own phase, so the speed-ups over it are affected by the load of another moment"
)


def precision_section(precisions: dict[str, Any] | None, eager_p50: float | None) -> dict[str, Any] | None:
    """The section (None when the table was skipped)."""
    if precisions is None:
        return None
    rows = []
    for row in precisions.get("rows", []):
        rows.append(
            {**row, "speedup_vs_torch_eager": _round(safe_div(eager_p50, row.get("ms_per_frame_batch1")))}
        )
    cpu = read_cpu()
    return {
        "cpu": cpu.to_dict(),
        "rows": rows,
        "openvino_skipped": precisions.get("openvino_skipped"),
        "failed": precisions.get("failed"),
        "note": NOTE,
    }


def int8_ratio(section: dict[str, Any] | None) -> dict[str, Any]:
    """``int8_speedup_vs_fp32`` on OpenVINO (see the module docstring)."""
    rows = {
        (r["backend"], r["requested"]): r for r in (section or {}).get("rows", []) if not r.get("variant")
    }
    fp32, int8 = rows.get(("openvino", "fp32")), rows.get(("openvino", "int8"))
    value, reason, served = None, None, False
    if fp32 is None or int8 is None:
        reason = "no OpenVINO rows (openvino not installed, or --no-precisions)"
    elif int8["served"] != "int8" and int8.get("timed") == "served":
        reason = f"int8 was not offered or not gated here: {int8['reason']}"
    else:
        key = f"ms_per_frame_batch{int8['batch']}"
        value = safe_div(fp32.get(key), int8.get(key))
        served = int8["served"] == "int8"
        if not served:
            reason = f"int8 was timed but NOT served (its gate failed): {int8['reason']}"
    out = ratio(
        value,
        goal=INT8_GOAL,
        higher_is_better=True,
        definition="OpenVINO fp32 / OpenVINO int8 ms per frame at the largest batch size; met only when "
        "int8's gate passed (served)",
        reason=reason,
    )
    if value is not None and not served:
        out["met"] = False
    out["gate_passed"] = served
    return out


def render(section: dict[str, Any] | None) -> list[str]:
    """Markdown lines of the section."""
    if section is None:
        return []
    flags = ", ".join(f for f in FEATURES if section["cpu"]["features"].get(f)) or "none of " + ", ".join(
        FEATURES
    )
    lines = [
        "",
        "## Precisions",
        "",
        f"CPU: {section['cpu']['model']}; features: {flags}. {section['note']}.",
        "",
        "| backend | precision | served | hint, streams | ms/frame b1 | ms/frame bN | × torch eager | gate | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        gate_text = _gate_text(r.get("gate"))
        proxy = r.get("gate_bundle")
        if proxy:
            decided = _gate_text((proxy.get("gates") or {}).get(r["requested"]))
            gate_text = f"decided on {Path(proxy['bundle']).name}: {decided}; this bundle's own: {gate_text}"
        batch_ms = r.get(f"ms_per_frame_batch{r['batch']}")
        if r.get("timed", "served") != "served":
            gate_text += " (timed, not served)"
        lines.append(
            f"| {r['backend']} | {r['requested']}{' alone (no re-check)' if r.get('variant') else ''} | "
            f"{'-' if r.get('variant') else r['served']} | {_hint(r)} | {r['ms_per_frame_batch1']} | "
            f"{batch_ms} (b{r['batch']}) | {r['speedup_vs_torch_eager']} | "
            f"{gate_text} | {r['reason'] or '-'} |"
        )
    for r in section["rows"]:
        recheck = r.get("recheck")
        if recheck:
            lines.append(
                f"\n{r['backend']} {r['requested']}: served with an fp32 re-check (band {recheck['band']}), "
                f"which re-ran {recheck['rechecked']} of the {recheck['frames']} timed frames"
            )
    if section.get("openvino_skipped"):
        lines.append(f"\nOpenVINO rows skipped: {section['openvino_skipped']}")
    if section.get("failed"):
        lines.append(f"\nThe precision table failed: {section['failed']}")
    return lines


def _hint(row: dict[str, Any]) -> str:
    settings = row.get("settings") or {}
    if not settings.get("performance_hint"):
        return "-"
    return f"{settings['performance_hint']}, {settings.get('streams')}"


def _gate_text(gate: dict[str, Any] | None) -> str:
    if not gate:
        return "-"
    text = f"{'passed' if gate['passed'] else 'FAILED'}: {gate['kept']}/{gate['reference_findings']} kept, "
    text += f"{gate.get('new_count', len(gate['new']))} new"
    return text + (f", AP50 drop {gate['map50']['drop']}" if gate.get("map50") else "")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
