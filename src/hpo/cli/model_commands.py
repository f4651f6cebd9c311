"""The final model's commands: predict and export."""

from __future__ import annotations

from pathlib import Path

import click

from hpo.cli.group import cli, data_option, device_option, study_option
from hpo.errors import HpoError
from hpo.paths import final_dir
from hpo.results import report
from hpo.search import session


def _final_model_path(study_arg: str, model_path: str | None) -> tuple[str, Path]:
    name = session.study_name(study_arg)
    path = Path(model_path) if model_path else final_dir(name) / "model.pt"
    if not path.is_file():
        raise HpoError(
            f"no final model at {path}. Run `hpo final-train --study {name}` first, or pass --model "
            "with the path of its model.pt."
        )
    return name, path


model_option = click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="The final checkpoint [default: runs/STUDY/final/model.pt].",
)


@cli.command()
@study_option
@model_option
@click.option("--top", type=click.IntRange(1, 10), default=1, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@device_option
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
def predict(
    study_arg: str, model_path: str | None, top: int, as_json: bool, device: str | None, images: tuple[str, ...]
) -> None:
    """Class and probability of each IMAGE (PNG or JPEG, any size, grey or colour) under the final model."""
    from hpo.learn import inference
    from hpo.learn.devices import place

    name, path = _final_model_path(study_arg, model_path)
    model, meta = inference.load_model(path, name, place(device).device)
    results = inference.predict_files(model, [Path(p) for p in images], top, info=meta["data"])
    for result in results:
        if result.error:
            click.echo(f"{result.path}: cannot predict: {result.error}", err=True)
        if as_json or not result.error:
            click.echo(report.prediction_line(result, as_json))
    failed = sum(1 for result in results if result.error)
    if failed:
        raise HpoError(f"{failed} of {len(results)} files could not be predicted (reasons above); the others were.")


@cli.command()
@study_option
@model_option
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx"]), required=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Output file [default: beside the checkpoint, model.ts or model.onnx].",
)
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Compare the exported model's outputs with the PyTorch model's on the test split.",
)
@data_option
def export(
    study_arg: str, model_path: str | None, fmt: str, out: str | None, check: bool, data_dir: str | None
) -> None:
    """Write the final model as a self-contained TorchScript or ONNX file (normalisation and class names inside)."""
    from hpo.learn import inference, sources

    name, path = _final_model_path(study_arg, model_path)
    model, meta = inference.load_model(path, name)
    target = Path(out) if out else path.with_suffix(inference.EXPORT_FORMATS[fmt])
    inference.export(model, meta, fmt, target)
    info = meta["data"]
    click.echo(report.export_line(target, fmt, inference.input_text(info), len(info["classes"])))
    if check:
        result = inference.check_export(model, target, fmt, sources.test_images(info, data_dir), info)
        click.echo(report.export_check_line(result))
        if not result.ok:
            raise HpoError(report.export_mismatch(result, fmt))
