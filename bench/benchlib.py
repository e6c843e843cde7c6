"""What the bench scripts share: printing a result block and appending it to BENCHMARKS.md."""

from pathlib import Path


def publish(text: str, append: Path | None) -> None:
    """Print a Markdown result block; with --append FILE, also add it to the end of that file."""
    print(text)
    if append:
        with Path(append).open("a", encoding="utf-8") as f:
            f.write("\n" + text)
