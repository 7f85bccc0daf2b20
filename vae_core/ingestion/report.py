"""The Markdown summary of an ingestion run (the flow's Prefect artifact): counts per split, shape,
channel statistics, duplicates and the quarantine (the first entries; the rest in the manifest or its
side files), the rows each node decoded and the reads retried."""

from __future__ import annotations

from typing import Any

from vae_core.data.shards import SPLITS
from vae_core.ingestion.ingest import Published
from vae_core.ingestion.publish import manifest_entries


def summary_markdown(result: Published) -> str:
    """A short Markdown report of a published (or found) version."""
    m = result.manifest
    lines = [
        f"# Dataset `{m.name}` version `{m.version}`",
        "",
        f"{'Created' if result.created else 'Already existed (nothing written)'}: `{result.url}`  ",
        f"Source: {m.source.kind} `{m.source.url}`  ",
        f"Shape: {m.height} x {m.width} x {m.channels} (H x W x C), labels: "
        f"{len(m.label_names) if m.label_names else 'none'}",
        "",
        "| split | rows | shards |",
        "|---|---:|---:|",
    ]
    lines += [f"| {s} | {m.counts[s]:,} | {len(m.splits[s].shards) if s in m.splits else 0} |" for s in SPLITS]
    stats = ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(m.channel_mean, m.channel_std))
    i = m.items
    lines += [
        "",
        f"Channel mean / std (pixel/255, train): {stats}",
        "",
        f"Items: {i.seen:,} seen = {i.ok:,} ok + {i.duplicates:,} duplicates + {i.quarantined:,} quarantined"
        + (f"; {m.label_conflicts:,} duplicates disagree with the kept copy's label" if m.label_conflicts else ""),
    ]
    where = m.quarantine_file or "manifest.json"
    if i.quarantined:
        lines += ["", "| quarantined | reason |", "|---|---|"]
        lines += [f"| `{q['id']}` | {q['reason']} |" for q in manifest_entries(result.url, m, "quarantine", limit=50)]
        if i.quarantined > 50:
            lines.append(f"| ... | {i.quarantined - 50} more in {where} |")
    duplicates = manifest_entries(result.url, m, "duplicates", limit=None if m.duplicates_file is None else 1000)
    if i.duplicates:
        lines += ["", "| duplicate | kept |", "|---|---|"]
        lines += [f"| `{d['id']}` | `{d['duplicate_of']}` |" for d in duplicates[:20]]
        if i.duplicates > 20:
            lines.append(f"| ... | {i.duplicates - 20} more in {m.duplicates_file or 'manifest.json'} |")
    lines += _label_conflict_lines(m, duplicates)
    if result.nodes:
        lines += ["", "| node | address | rows decoded by this run |", "|---|---|---:|"]
        lines += [f"| `{n.node_id[:12]}` | {n.address} | {n.rows:,} |" for n in result.nodes]
    if result.created:
        lines += ["", f"Storage reads retried (transient errors): {result.retries:,}"]
    return "\n".join(lines) + "\n"


def _label_conflict_lines(m: Any, duplicates: list[dict[str, Any]]) -> list[str]:
    """Markdown lines listing the duplicates whose label differs from the kept copy's (none: no lines)."""
    conflicts = [d for d in duplicates if d.get("label") != d.get("kept_label")]
    if not conflicts:
        return []
    names = m.label_names or []

    def label(y: int | None) -> str:
        return "none" if y is None else f"{y} ({names[y]})" if 0 <= y < len(names) else str(y)

    lines = ["", f"{m.label_conflicts:,} duplicates disagree with the kept copy on their label (label noise; "
             "only the kept copy's label is in the dataset):", "",
             "| duplicate | its label | kept | kept label |", "|---|---|---|---|"]
    lines += [f"| `{d['id']}` | {label(d['label'])} | `{d['duplicate_of']}` | {label(d['kept_label'])} |"
              for d in conflicts[:20]]
    if m.label_conflicts > 20:
        lines.append(f"| ... | | | {m.label_conflicts - 20} more |")
    return lines
