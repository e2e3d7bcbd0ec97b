"""`theseus-deploy export`: options from `ExportConfig`; the work is in theseus_deploy.export.api
(formats) and the registry's writers (`--format triton`: theseus_deploy.export.triton)."""
import json

import click

from theseus_deploy import config as C
from theseus_deploy.cli import options_from
from theseus_deploy.errors import UsageError
from theseus_deploy.registry import FORMATS, WRITERS, load


@click.command(name="export", epilog="Formats: " + "; ".join(f"{f.name}: {f.help}" for f in [*FORMATS.values(), *WRITERS.values()]))
@options_from(C.ExportConfig, required=("model", "formats", "output"))
def export(**kwargs):
    """Export a model to ONNX / ONNX Runtime INT8 / FP16 / TensorRT, each validated against PyTorch."""
    from theseus_deploy.export.api import export_model
    from theseus_deploy.export.validate import ValidationError
    from theseus_deploy.loyalty import describe

    cfg = C.ExportConfig.of(**kwargs)
    writers = [f for f in cfg.formats if f in WRITERS]
    if len(writers) > 1:
        raise UsageError(f"give one of --format {', '.join(WRITERS)}, got {', '.join(writers)}")
    try:
        if writers:  # a serving layout of the other formats (e.g. a Triton model repository)
            repo = load(WRITERS[writers[0]].writer)(cfg)
        else:
            manifest = export_model(cfg)
    except ValidationError as e:
        raise UsageError(f"validation failed, nothing written: {e}") from None
    if writers:
        for line in repo["validation"]:
            click.echo(f"ok  {line}")
        click.echo(f"wrote the Triton model repository {cfg.output} (entry point: {', '.join(repo['entry_points'])})")
        return
    for a in manifest["artifacts"]:
        v = a.get("validation", {})
        worst = max((s["max_abs_diff"] for s in v.get("shapes", [])), default=None)
        task = v.get("task")
        line = f"{a['format']:<11} {a.get('file') or '-':<18}"
        if a.get("bytes"):
            line += f" {a['bytes'] / 1e6:8.1f} MB"
        if worst is not None:
            line += f"  max|diff| {worst:.2e}"
        if task:
            line += f"  dev {task['score']:.4f} ({task['delta_vs_pytorch']:+.4f} vs PyTorch)"
            if task.get("loyalty"):
                line += f", loyalty {describe(task['loyalty'])}"
        if a.get("fused_ops"):
            line += "  fused " + json.dumps({k: v for k, v in a["fused_ops"].items() if v})
        click.echo(line)
    click.echo(f"wrote {cfg.output}/manifest.json")
