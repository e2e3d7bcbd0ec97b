"""`theseus-deploy export`: options from `ExportConfig`; the work is in theseus_deploy.export.api."""
import click

from theseus_deploy import config as C
from theseus_deploy.cli import options_from
from theseus_deploy.registry import FORMATS


@click.command(name="export", epilog="Formats: " + "; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()))
@options_from(C.ExportConfig, required=("model", "formats", "output"))
def export(**kwargs):
    """Export a model to ONNX / ONNX Runtime INT8 / FP16 / TensorRT, each validated against PyTorch."""
    import dataclasses
    import json

    from theseus_deploy.errors import UsageError
    from theseus_deploy.export.api import export_model
    from theseus_deploy.export.validate import ValidationError

    cfg = C.ExportConfig(**kwargs)
    args = dataclasses.asdict(cfg)
    model, formats, output = args.pop("model"), args.pop("formats"), args.pop("output")
    triton = {k[len("triton_"):]: args.pop(k) for k in list(args) if k.startswith("triton_")}
    if "triton" in formats:  # a model repository of the other formats (theseus_deploy.export.triton)
        from theseus_deploy.export.triton import export_repository

        max_batch_size = args.pop("max_batch_size")
        try:
            repo = export_repository(model, output, formats, max_batch_size=max_batch_size, **triton, **args)
        except ValidationError as e:
            raise UsageError(f"validation failed, nothing written: {e}") from None
        for line in repo["validation"]:
            click.echo(f"ok  {line}")
        click.echo(f"wrote the Triton model repository {output} (entry point: {', '.join(repo['entry_points'])})")
        return
    try:
        manifest = export_model(model, formats, output, **args)
    except ValidationError as e:
        raise UsageError(f"validation failed, nothing written: {e}") from None
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
        if a.get("fused_ops"):
            line += "  fused " + json.dumps({k: v for k, v in a["fused_ops"].items() if v})
        click.echo(line)
    click.echo(f"wrote {output}/manifest.json")
