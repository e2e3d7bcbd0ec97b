"""`theseus-deploy export`: click only at import time; the work is in export.api."""
import click

from theseus_deploy.registry import FORMATS


@click.command(name="export")
@click.option("--model", required=True, help="Model folder (predecessor or successor) or hub id.")
@click.option("--format", "formats", multiple=True, required=True,
              type=click.Choice(list(FORMATS)),
              help="Artifact to build; repeat for several: " + "; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()))
@click.option("--output", required=True, help="Output folder: one file per format, manifest.json, config and tokenizer.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (17 or higher).")
@click.option("--max-batch-size", default=32, show_default=True, type=int, help="Largest batch (TensorRT profile max).")
@click.option("--max-seq-length", default=512, show_default=True, type=int, help="Longest sequence (TensorRT profile max).")
@click.option("--opt-batch-size", default=None, type=int, help="TensorRT profile opt batch (default: max/2).")
@click.option("--opt-seq-length", default=None, type=int, help="TensorRT profile opt sequence length (default: max/2).")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Check every artifact against PyTorch.")
@click.option("--atol", default=None, type=float, help="Absolute tolerance on logits (default per format: fp32 1e-4, fp16 2e-2, int8/bf16 50% of the largest logit).")
@click.option("--task", default=None, help="Also score each artifact on this task's dev set next to PyTorch.")
@click.option("--data-dir", default=None, help="Local glue_data folder for --task.")
@click.option("--max-eval-samples", default=None, type=int, help="Score only the first N dev examples.")
@click.option("--max-task-drop", default=0.01, show_default=True, type=float,
              help="With --task: fail if an artifact's dev score is more than this below PyTorch's (0.01 = 1 point).")
@click.option("--int8-per-channel/--int8-per-tensor", default=True, show_default=True,
              help="onnx-int8: one weight scale per output channel (more accurate) or per tensor.")
@click.option("--int8-reduce-range/--no-int8-reduce-range", default=False, show_default=True,
              help="onnx-int8: 7-bit weights, for CPUs without VNNI (avoids u8 x s8 saturation).")
@click.option("--threads", default=None, type=int, help="CPU threads for validation runs.")
@click.option("--overwrite/--no-overwrite", default=False, help="Replace a non-empty output folder.")
def export(model, formats, output, **kwargs):
    """Export a model to ONNX / ONNX Runtime INT8 / FP16 / TensorRT, each validated against PyTorch."""
    import json

    from theseus_deploy.export.api import export_model
    from theseus_deploy.export.validate import ValidationError
    from theseus_deploy.errors import UsageError

    try:
        manifest = export_model(model, formats, output, **kwargs)
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
