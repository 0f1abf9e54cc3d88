"""What every notebook reads first (its size, ``DICO_NOTEBOOK_SIZE``, and where it may write), and running the
notebooks headless (needs ``nbclient``, in the ``dev`` extra)::

    python -m dico.analysis.notebook notebooks/*.ipynb --size tiny          # execute, keep nothing
    python -m dico.analysis.notebook notebooks/02_attention_locality.ipynb --out runs/notebooks   # full size, saved
    python -m dico.analysis.notebook notebooks/*.ipynb --clear              # clear outputs before committing
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SIZES = ("tiny", "full")


def checkout_root(start: str | Path | None = None) -> Path:
    """The dico checkout (the folder with ``cli.py`` and ``experiments/``) that the analyses run configs from:
    ``$DICO_ROOT``, else ``start`` or the current folder or one of their parents, else where the ``cli`` module
    is imported from. An installed wheel has no ``experiments/``: the error says how to point at a checkout."""
    import importlib.util

    env = os.environ.get("DICO_ROOT")
    candidates = [Path(env)] if env else []
    for base in (Path(start) if start else None, Path.cwd()):
        if base is not None:
            base = base.resolve()
            candidates += [base, *base.parents]
    spec = importlib.util.find_spec("cli")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).resolve().parent)
    for folder in candidates:
        if (folder / "cli.py").is_file() and (folder / "experiments").is_dir():
            return folder
    raise FileNotFoundError(
        "no dico checkout found (a folder with cli.py and experiments/): run from inside a clone of the repository "
        "or set DICO_ROOT=/path/to/the/clone"
    )


@dataclass(frozen=True)
class NotebookSettings:
    """``size``: ``"full"`` (the default: the analysis as documented, minutes on a CPU) or ``"tiny"`` (CI: the
    same code on models and budgets small enough for well under two minutes per notebook on a 2-core CPU).
    ``root``: the repository. ``workdir``: where runs made by the notebook go -- the repository root at full
    size, a temporary folder (or ``$DICO_NOTEBOOK_WORKDIR``) when tiny, so CI leaves nothing behind."""

    size: str
    root: Path
    workdir: Path

    @property
    def tiny(self) -> bool:
        return self.size == "tiny"

    def pick(self, tiny: object, full: object) -> object:
        """``tiny`` or ``full`` according to the size."""
        return tiny if self.tiny else full


def notebook_settings(seed: int = 0) -> NotebookSettings:
    """Read ``DICO_NOTEBOOK_SIZE`` (tiny | full, default full) and ``DICO_NOTEBOOK_WORKDIR``; seed torch.

    Tiny runs use one CPU thread: their models are too small to gain from more, and on a busy machine extra
    threads only wait for each other.
    """
    size = os.environ.get("DICO_NOTEBOOK_SIZE", "full").strip().lower() or "full"
    if size not in SIZES:
        raise ValueError(f"DICO_NOTEBOOK_SIZE must be one of {SIZES}, got {size!r}")
    workdir_env = os.environ.get("DICO_NOTEBOOK_WORKDIR")
    if workdir_env:
        workdir = Path(workdir_env)
    elif size == "tiny":
        workdir = Path(tempfile.mkdtemp(prefix="dico-notebook-"))
    else:
        workdir = checkout_root()
    workdir.mkdir(parents=True, exist_ok=True)
    if size == "tiny":
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    return NotebookSettings(size, checkout_root(), workdir)


def execute_notebook(
    path: str | Path,
    size: str = "tiny",
    out: str | Path | None = None,
    timeout: int = 600,
    env: Mapping[str, str] | None = None,
) -> Any:
    """Run a notebook top to bottom in a fresh ``python3`` kernel at ``size``; returns the executed notebook
    (and writes it to ``out``, a file or folder, if given). The kernel starts in the notebook's folder with the
    repository on ``PYTHONPATH``; ``env`` adds variables. Raises ``nbclient``'s ``CellExecutionError`` (naming the
    cell, with its traceback) on the first error. The notebook file itself is left as it is."""
    import nbformat
    from nbclient import NotebookClient

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    kernel_env = {**os.environ, **(env or {}), "DICO_NOTEBOOK_SIZE": size}
    root = str(checkout_root(path.parent))
    kernel_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    resources = {"metadata": {"path": str(path.parent)}}  # the kernel's working directory
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources)
    client.execute(env=kernel_env)
    if out is not None:
        target = Path(out)
        if target.suffix != ".ipynb":
            target = target / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
    return nb


def clear_outputs(path: str | Path) -> bool:
    """Remove the outputs and execution counts of a notebook file in place; returns whether it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
    nb.metadata.pop("widgets", None)
    if changed:
        nbformat.write(nb, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m dico.analysis.notebook",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--out", type=Path, help="folder for the executed copies (default: not saved)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--clear", action="store_true", help="only clear the notebooks' outputs in place")
    args = p.parse_args(argv)
    for path in args.notebooks:
        if args.clear:
            print(f"{path}: {'cleared' if clear_outputs(path) else 'no outputs'}")
            continue
        start = time.perf_counter()
        execute_notebook(path, args.size, args.out, args.timeout)
        print(f"{path}: ran at size {args.size} in {time.perf_counter() - start:.0f} s")
    return 0


__all__ = [
    "SIZES",
    "NotebookSettings",
    "checkout_root",
    "clear_outputs",
    "execute_notebook",
    "main",
    "notebook_settings",
]

if __name__ == "__main__":
    sys.exit(main())
