"""HTML tables of the report: a run's configuration summary, its metrics, the run comparison.

Values are printed as read from the run files: accuracies (%) with two decimals, MCC /
NMI / ECE with four, '-' for an empty shot group (null in eval.json), 'n/a' for an
undefined value: a shot group whose classes have no test images (also null), or a NaN
in an eval.json written before metrics were strict JSON.
"""

from __future__ import annotations

import math
from html import escape

from ..rundir import RunDir
from .rundata import RunRecord

METRIC_COLUMNS = (("top1", "top-1", "pct", True), ("top5", "top-5", "pct", True), ("many", "many", "pct", True),
                  ("medium", "medium", "pct", True), ("few", "few", "pct", True), ("mcc", "MCC", "frac", True),
                  ("nmi", "NMI", "frac", True), ("ece", "ECE", "frac", False))
OPTIONAL_COLUMNS = ("top5",)  # shown when a row has it (eval.json leaves top-5 out for 5 classes or fewer)


def fmt(value, kind: str = "pct") -> str:
    """'-' for None, 'n/a' for NaN / infinity; two decimals for percentages, four for fractions."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if kind == "pct" else f"{value:.4f}"


def metric_text(m: dict, key: str, kind: str = "pct") -> str:
    """fmt of m[key]; 'n/a' for a null shot group that has classes (none of them has test images)."""
    if m.get(key) is None and (m.get("groups") or {}).get(key):
        return "n/a"
    return fmt(m.get(key), kind)


def _params(section: dict | None) -> str:
    if not section:
        return ""
    params = section.get("params") or {}
    text = ", ".join(f"{k} {v}" for k, v in params.items())
    return f"{section.get('name', '')} ({text})" if text else str(section.get("name", ""))


def config_rows(rec: RunRecord) -> list[tuple[str, str]]:
    """(label, value) pairs that say what data, model, recipe and epochs the numbers are of."""
    cfg, data, ev = rec.config, rec.data, rec.eval
    d = cfg.get("data", {})
    counts = rec.train_counts
    rows = [("run folder", str(rec.path))]
    if data.get("description"):
        rows.append(("data", data["description"]))
    ratio = f"{max(counts) / min(counts):.1f}" if counts and min(counts) > 0 else "-"
    if d.get("profile") in (None, "none"):  # no profile applied: the configured ratio says nothing of the counts
        shape = f"profile none (class counts as in the source), measured ratio {ratio} of the training counts"
    else:
        shape = f"profile {d.get('profile')}, imbalance ratio {d.get('imbalance_ratio')} (measured {ratio})"
    rows.append(("long tail", f"source {d.get('source')}, {shape}, data seed {d.get('seed')}"))
    split = f"{sum(counts)} training images, {len(counts)} classes"
    if data:
        split += f"; validation {data.get('num_val', 0)}; test {data.get('num_test', ev.get('num_samples'))}"
    rows.append(("splits", split))
    m = cfg.get("model", {})
    params = ", ".join(f"{k} {v}" for k, v in (m.get("params") or {}).items())
    rows.append(("model", f"{m.get('name')}, {m.get('head')} head" + (f", {params}" if params else "")
                 + (f", initial weights {m['weights']}" if m.get("weights") else "")))
    method = cfg.get("method", {})
    rows.append(("method", _params(method)))
    rows.append(("loss", _params(cfg.get("loss"))))
    rows.append(("sampler", _params(cfg.get("sampler"))))
    rw = cfg.get("reweight", {})
    if rw.get("scheme", "none") != "none":
        rows.append(("re-weighting", f"{rw.get('scheme')}, beta {rw.get('beta')}, from epoch {rw.get('start_epoch')}"))
    if rec.posthoc is not None:
        rows.append(("training", f"none: a post-hoc method fitted on the stage-1 model ({RunDir.POSTHOC})"))
    else:
        rows.append(("training", _schedule(rec)))
    seconds = sum(float(r.get("seconds", 0.0)) for r in rec.metrics)
    if seconds:
        took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
        rows.append(("training time", f"{took} (sum of the epochs' seconds in {RunDir.METRICS})"))
    evaluated = f"last checkpoint, after epoch {ev.get('epoch')}; {ev.get('num_samples')} test images"
    if "best_val" in ev:
        evaluated += f"; best on validation: after epoch {ev['best_val'].get('epoch')}"
    rows.append(("evaluated", evaluated))
    th = ev["thresholds"]
    sizes = {g: len(ev["groups"].get(g, [])) for g in ("many", "medium", "few")}
    rows.append(("shot groups", f"many n > {th['many']} ({sizes['many']} classes), medium {th['few']} <= n <= "
                                f"{th['many']} ({sizes['medium']}), few n < {th['few']} ({sizes['few']})"))
    if rec.posthoc:
        rows.append((RunDir.POSTHOC, ", ".join(f"{k} {v}" for k, v in rec.posthoc.items()
                                               if not isinstance(v, (list, dict)))))
    return rows


def _schedule(rec: RunRecord) -> str:
    t = rec.config.get("train", {})
    text = (f"{t.get('epochs')} epochs configured, {len(rec.metrics)} recorded in {RunDir.METRICS}; "
            f"batch {t.get('batch_size')}, lr {t.get('lr')} ({t.get('lr_schedule')}, warm-up "
            f"{t.get('warmup_epochs')}, milestones {t.get('milestones')}, decay {t.get('lr_decay')}), "
            f"weight decay {t.get('weight_decay')}, seed {t.get('seed')}")
    if t.get("mixup_alpha"):
        text += f", mixup alpha {t.get('mixup_alpha')}"
    return text


def key_value_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def metric_rows(rec: RunRecord) -> list[tuple[str, dict]]:
    """(label, metrics) for the last epoch, best-on-validation and post-hoc LA, as present."""
    rows = [(f"last epoch ({rec.eval.get('epoch')})", rec.eval)]
    if "best_val" in rec.eval:
        rows.append((f"best on validation (epoch {rec.eval['best_val'].get('epoch')})", rec.eval["best_val"]))
    la = rec.eval_logit_adjusted
    if la is not None:
        rows.append((f"last + post-hoc logit adjustment (tau {la.get('tau')})", la))
        if "best_val" in la:
            rows.append((f"best on validation + post-hoc LA (tau {la.get('tau')})", la["best_val"]))
    return rows


def _best(values: list, higher: bool):
    present = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if len(present) < 2:
        return None
    return max(present) if higher else min(present)


def metrics_table(rows: list[tuple[str, dict]], *, first_header: str = "evaluation",
                  extra: list[tuple[str, list[str]]] | None = None) -> str:
    """Rows of top-1 / top-5 / many / medium / few / MCC / NMI / ECE; the best of each column in bold.
    The top-5 column is left out when no row has top-5 (5 classes or fewer, or an older eval.json).

    `extra`: leading text columns (header, one value per row), e.g. a comparison's config.
    """
    extra = extra or []
    columns = [c for c in METRIC_COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(c[0] in m for _, m in rows)]
    head = "".join(f"<th>{escape(h)}</th>" for h in [first_header, *[h for h, _ in extra], *[c[1] for c in columns]])
    best = {key: _best([m.get(key) for _, m in rows], higher) for key, _, _, higher in columns}
    body = []
    for r, (label, m) in enumerate(rows):
        cells = [f"<td>{escape(label)}</td>", *[f"<td>{escape(vals[r])}</td>" for _, vals in extra]]
        for key, _, kind, _ in columns:
            text = escape(metric_text(m, key, kind))
            value = m.get(key)
            cells.append(f"<td class=\"num\"><b>{text}</b></td>" if value is not None and value == best[key]
                         else f"<td class=\"num\">{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="metrics"><tr>{head}</tr>{"".join(body)}</table>'


def comparison_table(records: list[RunRecord], *, checkpoint: str = "last") -> str:
    """One row per run (last epoch, or best-on-validation where present), with its recipe."""
    rows, method, loss, epochs = [], [], [], []
    for rec in records:
        m = rec.eval if checkpoint == "last" else rec.eval.get("best_val")
        if m is None:
            continue
        rows.append((rec.label, m))
        cfg = rec.config
        method.append(_params({k: v for k, v in cfg.get("method", {}).items() if k != "params"}) or "")
        loss.append(_params(cfg.get("loss")))
        epochs.append("post-hoc" if rec.posthoc is not None
                      else f"{m.get('epoch')} / {cfg.get('train', {}).get('epochs')}")
    if not rows:
        return ""
    return metrics_table(rows, first_header="run", extra=[("method", method), ("loss", loss),
                                                          ("epoch / configured", epochs)])
