"""The HTML report of a ``labkit run``: one self-contained file an instructor can open anywhere.

``render_report`` writes the environment (device, profile, parameters, versions) and then, per
lab, its status and time, its records, its claims with their verdicts, its plots (embedded as
base64 data URIs, taken from the executed notebook by ``plots_of``) and, for a failed lab, the
failing cell's source and traceback.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

_CSS = """body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:left;vertical-align:top}.ok{color:#176f2c}.failed{color:#b00020}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}img{max-width:100%;border:1px solid #eee}"""


def render_report(summary: dict, labs: list) -> str:
    """Self-contained HTML: environment, then per lab status, time, claims, records, plots,
    failure."""
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>"
                   for k, v in [("device", summary["device"]), ("profile", summary["profile"]),
                                ("parameters", json.dumps(summary["params"])),
                                *summary["versions"].items(), ("created", summary["created"])])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>labkit run</title>"
             f"<style>{_CSS}</style></head><body><h1>labkit run: "
             f"<span class='{'ok' if summary['ok'] else 'failed'}'>"
             f"{'all labs passed' if summary['ok'] else 'failed'}</span></h1><table>{rows}</table>"]
    for lab in labs:
        on = f", GPU {e(lab.gpus)}" if lab.gpus is not None else ""
        parts.append(f"<h2>{e(Path(lab.notebook).name)}: <span class='{lab.status}'>{lab.status}"
                     f"</span> ({lab.duration_s:.1f} s{on})</h2>")
        if lab.claims:
            held = sum(c["holds"] for c in lab.claims)
            parts.append(f"<p>claims: {held} of {len(lab.claims)} hold</p><table><tr><th>claim"
                         "</th><th>holds</th><th>evidence</th></tr>" + "".join(
                f"<tr><td>{e(c['text'])}{'' if c.get('key', True) else ' (not key)'}</td>"
                f"<td class='{'ok' if c['holds'] else 'failed'}'>"
                f"{'yes' if c['holds'] else 'no'}</td><td>{e(c['evidence'])}</td></tr>"
                for c in lab.claims) + "</table>")
        if lab.records:
            parts.append("<table><tr><th>record</th><th>value</th></tr>" + "".join(
                f"<tr><td>{e(k)}</td><td>{e(json.dumps(v))}</td></tr>"
                for k, v in lab.records.items()) + "</table>")
        else:
            parts.append("<p>no recorded results</p>")
        if lab.failure is not None:
            f = lab.failure
            parts.append(f"<p class='failed'>failed at {e(f.describe())}</p>"
                         f"<pre>{e(f.source)}</pre><pre>{e(f.traceback)}</pre>")
        parts.extend(f"<img alt='plot from {e(Path(lab.notebook).name)}' "
                     f"src='data:image/png;base64,{png}'>" for png in plots_of(Path(lab.output)))
    parts.append("</body></html>")
    return "\n".join(parts)


def plots_of(path: Path) -> list[str]:
    """The PNG images (base64) in an executed notebook's outputs; none if it cannot be read."""
    try:
        nb = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return ["".join(o["data"]["image/png"]).replace("\n", "")
            for c in nb.get("cells", []) for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
