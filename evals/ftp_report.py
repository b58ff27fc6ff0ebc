"""The FTP side-by-side table (``results/smollm2-ftp/table.md``) from ``tokenprune eval``'s results.json.

One row per (sparsity, method), with the realised share of the scored tokens' token-block
computations skipped (``scored_skipped``): a row whose scored tokens skip less than the target
spends more FLOPs where the perplexity is measured, so compare rows at equal FLOPs.

    .venv/bin/python -m evals.ftp_report results/smollm2-ftp
"""
from __future__ import annotations

import json
import os
import sys


def table(rows: list[dict]) -> str:
    lines = ["| sparsity | method | perplexity | next-token agreement | FLOPs rel. | scored tokens' blocks skipped "
             "| KV rel. | prefill time rel. |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            continue
        s = (r.get("config") or {}).get("sparsity", 0.0)
        lines.append(f"| {s:g} | {r['label']} | {r['quality']:.2f} | {r['agreement']:.3f} | {r['flops_rel']:.3f} | "
                     f"{r.get('scored_skipped', 0.0):.3f} | {r['kv_rel']:.3f} | {r['latency_rel']:.2f} |")
    return "\n".join(lines)


def main(folder: str = "results/smollm2-ftp") -> None:
    data = json.load(open(os.path.join(folder, "results.json")))
    text = f"`{data['meta']['command']}`\n\n" + table(data["rows"]) + "\n"
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
