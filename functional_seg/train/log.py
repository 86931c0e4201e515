"""What a run tells the person watching it: hooks that ``fit`` calls, and the console one.

A hook is any object with some of these methods (``fit`` calls those present):

    on_epoch_start(epoch, epochs, done, steps_per_epoch)   epoch counts from 0; done = steps already run
    on_log(step_in_epoch, mean_loss, images_per_s)         at log steps (a host sync happens there anyway)
    on_epoch_end(record, epochs)                           the metrics.jsonl record of the epoch
    close()                                                at the end, also after an error

``ConsoleLog`` draws a progress bar on a terminal and plain lines (no carriage returns) in a log
file, and always prints one line per epoch unless ``quiet``. ``format_fit_result`` and
``format_evaluation`` are what ``fseg train`` and ``fseg eval`` print at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

__all__ = ["ConsoleLog", "call_hooks", "epoch_line", "format_fit_result", "format_evaluation"]


def call_hooks(hooks: Iterable, name: str, *args) -> None:
    for hook in hooks:
        method = getattr(hook, name, None)
        if method is not None:
            method(*args)


def _fmt(x, spec=".4f") -> str:
    if isinstance(x, list):
        return "[" + ", ".join("-" if v is None else format(v, spec) for v in x) + "]"
    return "-" if x is None else format(x, spec)


def epoch_line(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"step {record['step']}", f"loss {_fmt(record['train_loss'])}"]
    val = record.get("val")
    if val:
        vals = val if isinstance(val, list) else [val]
        miou = [v["mean_iou"] for v in vals]
        acc = [v["pixel_accuracy"] for v in vals]
        parts += [f"val mIoU {_fmt(miou if len(vals) > 1 else miou[0])}",
                  f"pixel acc {_fmt(acc if len(vals) > 1 else acc[0])}"]
    parts.append(f"{record['images_per_s']:.1f} img/s")
    return "  ".join(parts)


class ConsoleLog:
    """Progress on stderr: a tqdm bar on a terminal, a plain line per quarter epoch elsewhere."""

    def __init__(self, *, progress: bool = True, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.progress = progress and not quiet
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._next_quarter = 0

    def on_epoch_start(self, epoch: int, epochs: int, done: int, steps_per_epoch: int) -> None:
        self._epoch, self._epochs, self._spe = epoch, epochs, steps_per_epoch
        self._next_quarter = (done * 4) // steps_per_epoch + 1
        if self.progress and self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                             leave=False, dynamic_ncols=True, file=self.stream)
        self._last = done

    def on_log(self, step_in_epoch: int, mean_loss: float, images_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(step_in_epoch - self._last)
            self._bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_s:.1f}")
        elif self.progress and step_in_epoch * 4 >= self._next_quarter * self._spe and step_in_epoch < self._spe:
            self._next_quarter = (step_in_epoch * 4) // self._spe + 1
            print(f"epoch {self._epoch + 1}/{self._epochs}  step {step_in_epoch}/{self._spe}  "
                  f"loss {mean_loss:.4f}  {images_per_s:.1f} img/s", file=self.stream, flush=True)
        self._last = step_in_epoch

    def on_epoch_end(self, record: dict, epochs: int) -> None:
        self.close()
        if not self.quiet:
            print(epoch_line(record, epochs), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _tables(title: str, summaries, class_names, labels=None) -> list[str]:
    from ..metrics import format_table

    many = isinstance(summaries, list)
    lines = []
    for i, summary in enumerate(summaries if many else [summaries]):
        head = title + (f" member {i}" + (f" ({labels[i]})" if labels and labels[i] else "") if many else "")
        lines += ["", head, format_table(summary, class_names)]
    return lines


def _member_labels(record: dict) -> list[str] | None:
    hparams = record.get("hparams") or {}
    if not hparams:
        return None
    k = len(next(iter(hparams.values())))
    return [", ".join(f"{n}={v[i]:g}" for n, v in hparams.items()) for i in range(k)]


def format_fit_result(result) -> str:
    """What ``fseg train`` prints when a run ends: the last epoch, validation and test tables, files."""
    final = result.final
    if not final:
        return f"nothing to do: {result.out_dir} is already at step {result.step}"
    names = result.preprocess.class_names
    lines = [f"epoch {final.get('epoch')}  step {final.get('step')}  train loss {_fmt(final.get('train_loss'))}  "
             f"{_fmt(final.get('images_per_s'), '.1f')} images/s"]
    labels = _member_labels(final)
    if final.get("val"):
        lines += _tables("validation", final["val"], names, labels)
    if result.test:
        chosen = ", ".join(sorted(set(result.test.get("weights") or ["params"])))
        where = f", at {result.test['resolution']}" if result.test.get("resolution") else ""
        lines += _tables(f"test ({result.test['split']}{where}, {chosen} weights of "
                         f"{result.selected_checkpoint.name})", result.test["summary"], names, labels)
        full = result.test.get("full_res")
        if full:  # an ensemble's mean prediction: one table
            lines += _tables(f"test ({result.test['split']}) at full resolution: {full['images']} images at their "
                             "own size against their original masks", full["summary"], names, None)
    best = ""
    if result.best_checkpoint:
        best = (f", {result.best_checkpoint} (best validation mean IoU {_fmt(result.best_mean_iou)}, "
                f"epoch {result.best_epoch})")
    lines += ["", f"checkpoints: {result.checkpoint}{best}"]
    return "\n".join(lines)


def format_evaluation(result: dict, class_names, *, header: str) -> str:
    """What ``fseg eval`` prints: a header line, then one table (per member of an ensemble)."""
    return "\n".join([header, *_tables(f"weights: {', '.join(result['weights'])}", result["summary"], class_names)])
