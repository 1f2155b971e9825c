"""Medians, ratios against the reference, the issue's targets, and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contenders import Sample

REFERENCE = "tar|zstd -3 -T2"
MiB = 1024 * 1024
RSS_LIMIT = 256 * MiB


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None
    limit: float
    at_least: bool  # measured >= limit, else measured <= limit
    unit: str = "x"
    binding: bool = True  # informative targets are shown but decide nothing
    best: float | None = None  # the same measured on the best times, where that applies

    def _meets(self, value: float | None) -> bool:
        return value is not None and (value >= self.limit if self.at_least else value <= self.limit)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.name, "measured": self.measured, "limit": self.limit,
                "rule": ">=" if self.at_least else "<=", "unit": self.unit, "pass": self._meets(self.measured),
                "binding": self.binding, "best": self.best,
                "pass_best": self._meets(self.best) if self.best is not None else None}


def median(samples: list[Sample], key: Callable[[Sample], float | int | None]) -> float | None:
    values = [v for v in (key(s) for s in samples) if v is not None]
    return float(statistics.median(values)) if values else None


def _ratios(ss: list[Sample], base: list[Sample], inverse: bool) -> tuple[float | None, float | None]:
    """(median of the per-repetition ratios, ratio of the best times): base/this, or this/base if ``inverse``.
    Pairing by repetition compares runs taken back to back, under the same load."""
    if not base:
        return None, None

    def ratio(a: float, b: float) -> float:
        return a / b if inverse else b / a

    paired = [ratio(s.seconds, b.seconds) for s, b in zip(ss, base, strict=False)]
    best = ratio(min(s.seconds for s in ss), min(b.seconds for b in base))
    return float(statistics.median(paired)), best


def _row(name: str, op: str, ss: list[Sample], data_bytes: int, base: list[Sample]) -> dict[str, Any]:
    secs = median(ss, lambda s: s.seconds) or 0.0
    vs, vs_best = _ratios(ss, base, inverse=op == "second backup")
    return {
        "contender": name, "operation": op, "n": len(ss),
        "seconds": secs, "min": min(s.seconds for s in ss), "max": max(s.seconds for s in ss),
        "mb_per_s": data_bytes / 1e6 / secs if secs else None,
        "vs": vs, "vs_best": vs_best,
        "cpu_seconds": median(ss, lambda s: s.cpu_seconds),
        "engine_seconds": median(ss, lambda s: s.engine_seconds),
        "stored_bytes": median(ss, lambda s: s.stored_bytes),
        "repo_growth": median(ss, lambda s: s.repo_growth),
        "peak_rss": max(s.peak_rss for s in ss),
        "load": max(s.load for s in ss),
    }


def summarize(samples: dict[str, dict[str, list[Sample]]], data_bytes: int
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per contender and operation: median times, and ``vs`` = the median over the repetitions
    of the reference's time over this one's (backup, restore: throughput relative to the reference),
    or of this one's time over its own full backup's (second backup); ``vs_best`` the same of the best
    times.  And the verdict on each target."""
    ref = samples.get(REFERENCE, {})
    rows = []
    for name, ops in samples.items():
        for op, ss in ops.items():
            base = ops["backup"] if op == "second backup" else ref.get(op, [])
            rows.append(_row(name, op, ss, data_bytes, base))
    return rows, [t.as_dict() for t in _targets(rows)]


def _find(rows: list[dict[str, Any]], name: str, op: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["contender"] == name and r["operation"] == op), None)


def _get(row: dict[str, Any] | None, key: str) -> float | None:
    return None if row is None or row[key] is None else float(row[key])


def _targets(rows: list[dict[str, Any]]) -> list[Target]:
    out: list[Target] = []
    for backend in ("local", "s3"):
        name = f"volmove {backend}"
        full, rest, second = (_find(rows, name, op) for op in ("backup", "restore", "second backup"))
        if full is None:
            continue
        binding = backend == "local"
        tag = "" if binding else " (S3, informative)"
        ratio = (second["stored_bytes"] / full["stored_bytes"]) if second and full["stored_bytes"] else None
        out += [
            Target(f"backup throughput vs reference{tag}", full["vs"], 0.8, True, binding=binding,
                   best=full["vs_best"]),
            Target(f"restore throughput vs reference{tag}", _get(rest, "vs"), 0.8, True, binding=binding,
                   best=_get(rest, "vs_best")),
            Target(f"second backup time / full backup time{tag}", _get(second, "vs"), 0.2, False,
                   binding=binding, best=_get(second, "vs_best")),
            Target(f"second backup stored / full backup stored{tag}", ratio, 0.10, False, binding=binding),
        ]
    volmove = [r for r in rows if r["contender"].startswith("volmove")]
    for op, label in (("backup", "backups"), ("restore", "restores")):
        peaks = [r["peak_rss"] for r in volmove if r["operation"].endswith(op)]
        if peaks:
            out.append(Target(f"peak RSS of volmove {label}", max(peaks) / MiB, RSS_LIMIT / MiB, False, "MiB"))
    return out


# ---------------------------------------------------------------- text


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    width = int(spec.split(".")[0] or 0)
    return f"{'-':>{width}}" if value is None else f"{value:{spec}}{suffix}"


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def _table_lines(rows: list[dict[str, Any]]) -> list[str]:
    head = (f"{'contender':<16} {'operation':<14} {'median s':>9} {'min-max s':>13} {'MB/s':>6} {'ratio':>11} "
            f"{'best':>5} "
            f"{'cpu s':>6} {'engine s':>8} {'stored MB':>9} {'on disk':>8} {'peak RSS':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["vs"] is None:
            ratio = "-"
        elif r["operation"] == "second backup":
            ratio = f"{r['vs']:.2f}x full"
        else:
            ratio = f"{r['vs']:.2f}x ref"
        lines.append(
            f"{r['contender']:<16} {r['operation']:<14} {r['seconds']:>9.2f} "
            f"{r['min']:>6.2f}-{r['max']:<6.2f} {_fmt(r['mb_per_s'], '6.0f')} {ratio:>11} "
            f"{_fmt(r['vs_best'], '5.2f')} "
            f"{_fmt(r['cpu_seconds'], '6.1f')} {_fmt(r['engine_seconds'], '8.2f')} "
            f"{_fmt(_mb(r['stored_bytes']), '9.1f')} {_fmt(_mb(r['repo_growth']), '8.1f')} "
            f"{r['peak_rss'] / MiB:>5.0f} MiB")
    return lines


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    lines = []
    for t in targets:
        verdict = ("PASS" if t["pass"] else "FAIL") if t["binding"] else ("ok" if t["pass"] else "miss")
        unit = "x" if t["unit"] == "x" else f" {t['unit']}"
        measured = _fmt(t["measured"], ".2f" if t["unit"] == "x" else ".0f")
        limit = f"{t['limit']:.2f}" if t["unit"] == "x" else f"{t['limit']:.0f}"
        best = ""
        if t.get("best") is not None:
            best = f"; best times: {t['best']:.2f}x" + (", which disagrees: noise?" if t["pass_best"] != t["pass"]
                                                        else "")
        lines.append(f"  {verdict:<4}  {t['target']:<60} {measured:>7}{unit}  (target {t['rule']} {limit}{unit}"
                     f"{best})")
    return lines


def _load_range(doc: dict[str, Any]) -> str:
    loads = [r["load"] for r in doc["summary"]]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"


def render(doc: dict[str, Any]) -> str:
    ds, ch, cfg = doc["dataset"], doc["change"], doc["config"]
    lines = [
        f"volmove benchmark: {ds['bytes'] / 1e6:.0f} MB in {ds['files']} files ({ds['small_files']} small), "
        f"median of {cfg['repeat']}, {doc['machine']['cpus']} CPUs, 1-min load {_load_range(doc)}, "
        f"volmove {doc['machine']['volmove_commit']}",
        f"second backup after changing {ch['changed_bytes'] / 1e6:.1f} MB: {ch['overwrites']} x 64 KiB overwrites "
        f"in {ch['files_overwritten']} large files + appends to {ch['appends']} small files",
        "",
        *_table_lines(doc["summary"]),
        "MB = 10^6 bytes. ratio: median over the repetitions of the reference's time over this one's (= throughput",
        "relative to the reference; each repetition's runs are back to back), or for a second backup of its time over",
        "the same tool's full backup; best: the same of the best times. engine s: the tool's own timing, start-up",
        "excluded. stored MB: what the tool reports it added (restic 0.14: before compression); on disk: repo growth.",
        "",
        "targets (issue 2, 'Speed and memory'):",
        *_target_lines(doc["targets"]),
    ]
    loads = [r["load"] for r in doc["summary"]]
    cpus = doc["machine"]["cpus"] or 1
    if loads and max(loads) > cpus:
        lines.append(f"  NOTE: the machine was busy (1-min load up to {max(loads):.1f} on {cpus} CPUs): times are "
                     f"inflated and ratios noisy; 'best' is the less load-sensitive column")
    bad = [c for c in doc["restore_checks"] if not (c["complete"] and c.get("compare", True))]
    lines += [f"  WARNING: restore by {c['contender']} did not match the source: {c}" for c in bad]
    return "\n".join(lines)
