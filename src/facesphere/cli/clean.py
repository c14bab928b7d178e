"""``facesphere clean profile | report | review``: find label noise in a labelled set, report it, review it.

``profile`` embeds a set, classifies every image (clean, flip, outlier, duplicate, unreadable) and writes the
cleaned list files and the report into a new folder; ``report`` renders the report again from the saved profile;
``review`` asks, flagged image by flagged image, whether to confirm or reject the flag (the web page of
``facesphere serve --review DIR`` does the same in a browser). Source images are never changed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import typer

from facesphere.cli.errors import user_errors
from facesphere.cli.faces import MODEL_HELP

logger = logging.getLogger("facesphere")
app = typer.Typer(help="Find label noise in a labelled set (flips, outliers, duplicates), report and review it.",
                  no_args_is_help=True)
FolderArg = typer.Argument(..., help="output folder of `facesphere clean profile`")
ANSWERS = {"c": "confirm", "confirm": "confirm", "r": "reject", "reject": "reject", "s": "skip", "skip": "skip",
           "": "skip", "q": "quit", "quit": "quit"}


@app.command("profile")
def profile(data: Path = typer.Argument(..., help="the labelled set: an image folder (one sub-folder per identity), "
                                                  "a list file (<path> <label> lines) or a RecordIO pack"),
            model: Path = typer.Option(..., "--model", help=MODEL_HELP),
            threshold: Path = typer.Option(..., "--threshold", dir_okay=False,
                                           help="the model's calibrated threshold file (`facesphere calibrate`)"),
            out: Path = typer.Option(..., "--out", help="new output folder for the lists, the report and the profile"),
            batch_size: int = typer.Option(64, "--batch-size", min=1, help="images per embedding batch"),
            device: str = typer.Option("cpu", "--device", help="torch device of the model (cpu, cuda, cuda:1)"),
            workers: int = typer.Option(2, "--workers", min=0, help="image decoding processes"),
            flip: bool = typer.Option(True, "--flip/--no-flip", help="flip-sum test-time augmentation")) -> None:
    """Profile SET with --model at --threshold: write kept.txt, the flagged lists and report.html into --out."""
    from facesphere.cleaning.profile import profile_set
    from facesphere.cleaning.report import PROFILE, check_new_output, write_cleaning

    with user_errors():
        check_new_output(out)
        result = profile_set(data, model, threshold, out / PROFILE, batch_size=batch_size, device=device,
                             workers=workers, flip=flip)
        summary = write_cleaning(result, out)
    typer.echo(json.dumps(summary, indent=2))


@app.command("report")
def report(folder: Path = FolderArg) -> None:
    """Render the report (report.json, report.html, histograms, contact sheets) again from the saved profile."""
    from facesphere.cleaning.report import rewrite_report

    with user_errors():
        summary = rewrite_report(folder)
    typer.echo(json.dumps(summary, indent=2))


@app.command("review")
def review(folder: Path = FolderArg) -> None:
    """Confirm or reject each pending flagged image (c/r, s to skip, q to quit); decisions are saved at once."""
    from facesphere.cleaning.review import ReviewFolder

    with user_errors():
        session = ReviewFolder(folder)
        session.sync()
        pending = session.items(pending_only=True)
        done: Counter[str] = Counter()
        for k, item in enumerate(pending, start=1):
            typer.echo(f"[{k}/{len(pending)}] {item.kind} #{item.index}: {item.path}", err=True)
            typer.echo(f"  filed as {item.identity!r} (label {item.label}, own cosine {item.own_cosine})"
                       + (f"; suggested {item.suggested_identity!r} (label {item.suggested_label}, cosine "
                          f"{item.other_cosine})" if item.kind == "flip" else "")
                       + (f"; repeats {item.duplicate_path}" if item.kind == "duplicate" else ""), err=True)
            answer = _ask()
            if answer == "quit":
                break
            if answer != "skip":
                session.decide(item.index, answer)
            done[answer] += 1
        left = len(session.items(pending_only=True))
    typer.echo(json.dumps({"confirmed": done["confirm"], "rejected": done["reject"], "skipped": done["skip"],
                           "pending": left}, indent=2))


def _ask() -> str:
    """One answer from the reviewer; the end of the input means quit."""
    while True:
        try:
            text = typer.prompt("confirm, reject, skip or quit? [c/r/s/q]", default="s", show_default=False,
                                err=True)
        except typer.Abort:
            return "quit"
        answer = ANSWERS.get(text.strip().lower())
        if answer is not None:
            return answer
        typer.echo(f"  {text.strip()!r}: answer c, r, s or q", err=True)


__all__ = ["app"]
