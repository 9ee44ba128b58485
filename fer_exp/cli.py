"""The ``fer-exp`` command line."""

from __future__ import annotations

import json
import sys

import click

from fer_exp.classes import CLASS_NAMES


class UserError(click.ClickException):
    """A problem with the user's input: printed without a traceback, exit status 2."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fer-exp")
def main() -> None:
    """fer-exp: tracked, reproducible facial emotion recognition experiments on FER2013."""


@main.group()
def data() -> None:
    """Inspect FER2013 data sources."""


def format_summary(summary: dict) -> str:
    """The per-split x per-class table and the facts a user checks before training."""
    lines = [
        f"source:      {summary['source']}",
        f"format:      {summary['format']}",
        f"split rule:  {summary['split_rule']}",
        f"image size:  {'x'.join(map(str, summary['image_size']))} uint8 grayscale",
        "",
    ]
    width = max(len(n) for n in CLASS_NAMES) + 1
    lines.append("split".ljust(7) + "".join(n.rjust(width) for n in CLASS_NAMES) + "total".rjust(8))
    for split, counts in summary["class_counts"].items():
        lines.append(split.ljust(7) + "".join(str(counts[n]).rjust(width) for n in CLASS_NAMES)
                     + str(summary["sizes"][split]).rjust(8))
    lines += ["", f"class imbalance (train, largest/smallest class): {summary['imbalance_ratio']}"]
    lines.append(f"converted to grayscale: {summary['converted_to_gray']}; resized to 48x48: {summary['resized']}")
    if summary["ignored"]:
        lines.append(f"ignored {len(summary['ignored'])} hidden file(s), e.g. {summary['ignored'][0]}")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} bad sample(s) (--on-bad skip):")
        lines += [f"  {s['where']}: {s['why']}" for s in summary["skipped"][:20]]
        if len(summary["skipped"]) > 20:
            lines.append(f"  ... and {len(summary['skipped']) - 20} more (see --json)")
    lines.append(f"loaded in {summary['load_seconds']:.2f} s ({'cache' if summary['from_cache'] else 'decoded'})")
    return "\n".join(lines)


@data.command("inspect")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--on-bad", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="Stop at the first bad sample, or skip bad samples and report them.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the val hold-out, where one is made.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Size of the val hold-out.")
@click.option("--no-cache", is_flag=True, help="Decode again instead of reading the cache.")
def data_inspect(source: str, as_json: bool, on_bad: str, seed: int, val_fraction: float, no_cache: bool) -> None:
    """Show the format, split rule and per-class counts of SOURCE (a path or 'synthetic')."""
    from fer_exp.data import DataError, load_data

    try:
        loaded = load_data(source, on_bad=on_bad, seed=seed, val_fraction=val_fraction, use_cache=not no_cache)
    except DataError as exc:
        raise UserError(str(exc)) from None
    summary = loaded.summary()
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


if __name__ == "__main__":
    sys.exit(main())
