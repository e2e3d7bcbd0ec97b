"""Calibration texts for static INT8: a task's *training* texts (never the dev set the task-drop
check scores), or the user's own file.

    load_calibration("sst2", data_dir, None, None, 256)          # first 256 SST-2 training sentences
    load_calibration("custom", None, "texts.jsonl", "text", 256)  # column `text` of the user's file

Returns the texts as (a, b-or-None) pairs, like `theseus_deploy.data.TaskData.texts`, and a
record for the manifest (where they came from, how many, a digest of their content).
"""
from __future__ import annotations

import hashlib

from theseus_deploy.errors import UsageError


def load_calibration(task: str | None, data_dir: str | None, file: str | None, text_columns: str | None,
                     samples: int) -> tuple[list, dict]:
    if samples < 1:
        raise UsageError(f"--calibration-samples must be at least 1, got {samples}")
    if not task:
        raise UsageError("onnx-int8-static needs calibration texts: give --calibration-task (a GLUE task, or "
                         "'custom' with --calibration-file), or --task")
    if task.lower() == "custom":
        from theseus_deploy.data import _read_table

        if not file or not text_columns:
            raise UsageError("--calibration-task custom needs --calibration-file and --calibration-text-columns")
        cols = [c.strip() for c in text_columns.split(",") if c.strip()]
        if not 1 <= len(cols) <= 2:
            raise UsageError(f"--calibration-text-columns takes one or two column names, got '{text_columns}'")
        rows = _read_table(file)
        missing = [c for c in cols if c not in rows[0]]
        if missing:
            raise UsageError(f"column '{missing[0]}' not in {file} (columns: {', '.join(rows[0])})")
        texts = [(str(r[cols[0]]), str(r[cols[1]]) if len(cols) > 1 else None) for r in rows
                 if all(r.get(c) not in (None, "") for c in cols)][:samples]
        if not texts:
            raise UsageError(f"no calibration texts in {file} (columns {', '.join(cols)})")
        record = {"task": "custom", "source": file, "text_columns": cols}
    else:
        if file:
            raise UsageError("--calibration-file goes with --calibration-task custom")
        from theseus_deploy.data import load_task

        data = load_task(task, data_dir, "train", samples)
        texts = data.texts
        record = {"task": data.spec.name, "split": "train", "source": str(data.source)}
    digest = hashlib.sha256("\n".join(f"{a}\t{b or ''}" for a, b in texts).encode()).hexdigest()
    record.update({"samples": len(texts), "texts_sha256": digest})
    return texts, record
