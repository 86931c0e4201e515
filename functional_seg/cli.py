"""The ``fseg`` command line: train, eval, predict, prepare, summary, models.

Every subcommand is a thin shell over the library: it parses arguments into the library's
configs, calls one function and prints the result. Bad input (unknown model, missing data,
unreadable checkpoint, malformed option) ends with one line ``fseg: error: ...`` on stderr and
exit status 2; a diverged training run exits with 1 and names the epoch and step.

    fseg train --model segnet --model-cfg widths=16,32,64,64 --size 64 --epochs 2   # synthetic data
    fseg train --data DIR --epochs 20 --size 128 --batch-size 64 --out runs/segnet
    fseg eval --checkpoint runs/segnet/best.safetensors --data DIR --split test [--json]
    fseg predict --checkpoint runs/segnet/best.safetensors pet.jpg --out preds/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_kv", "parse_value"]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """ArgumentDefaultsHelpFormatter shows a default only beside help text: give every option some."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
        elif action.help is None and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "_"  # a placeholder: _DefaultsFormatter prints only the default


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's default after its help, unless the help already says it or there is none to say."""

    def _get_help_string(self, action):
        text = "" if action.help == "_" else (action.help or "")
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (no usage dump) and shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"fseg: error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------------------------
# Small parsers


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, '8,16,32' -> (8, 16, 32), else str."""
    if "," in text:
        return tuple(parse_value(part) for part in text.split(",") if part != "")
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(value.strip())
    return out


def parse_sweep(text: str | None) -> dict[str, list[float]]:
    """'lr=1e-3,3e-4' or 'lr=1e-3,3e-4;loss_weight=0.5,1' -> {name: [values]}."""
    if not text:
        return {}
    out = {}
    for part in text.replace(" ", ";").split(";"):
        if not part:
            continue
        key, sep, values = part.partition("=")
        try:
            vals = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise CliError(f"--sweep values must be numbers, got {part!r}") from None
        if not sep or not vals:
            raise CliError(f"--sweep expects name=v1,v2,..., got {part!r}")
        out[key] = vals
    return out


def _device(name: str):
    """The resolved ``--device``; on the CPU, freed memory is kept for the next batch (``runtime``)."""
    from .runtime import resolve_device, reuse_freed_cpu_memory

    try:
        device = resolve_device(name)
    except ValueError as err:
        raise CliError(f"--device: {err}") from None
    if device.type == "cpu":
        reuse_freed_cpu_memory()
    return device


def _flag(value: str) -> bool | str:
    value = value.lower()
    if value in ("auto",):
        return "auto"
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def _make_model(name: str, cfg_items: list[str] | None, *, num_classes: int | None = None):
    """The model with its --model-cfg; ``num_classes`` (the data's) fills in an unset num_classes."""
    from . import models  # noqa: F401  (registers the zoo)
    from .models import create_model

    cfg = parse_kv(cfg_items, "--model-cfg")
    model = create_model(name, **cfg)  # validated before any data is read
    if num_classes is not None and "num_classes" not in cfg and model.num_classes != num_classes:
        model = create_model(name, **cfg, num_classes=num_classes)
    return model


# The built-in dataset: enough images that a small SegNet learns visibly in 3 CPU epochs at 64 px
# (about 0.6 mean IoU), generated in seconds.
SYNTHETIC_TRAINVAL, SYNTHETIC_TEST = 256, 64


def _synthetic_root(arg: str | None) -> Path:
    from .data import make_synthetic_dataset

    default = Path(tempfile.gettempdir()) / f"functional_seg-synthetic-{SYNTHETIC_TRAINVAL}-{SYNTHETIC_TEST}"
    root = Path(arg) if arg else Path(os.environ.get("FSEG_SYNTHETIC_DIR", default))
    if not (root / "annotations" / "test.txt").exists():
        print(f"generating the synthetic dataset in {root}", file=sys.stderr)
        make_synthetic_dataset(root, n_trainval=SYNTHETIC_TRAINVAL, n_test=SYNTHETIC_TEST, seed=0)
    return root


def _prepare(root, split, size, args, *, progress=None):
    from .data import prepare

    return prepare(root, split, size, policy=args.policy, cache_dir=args.cache_dir, workers=args.workers,
                   strict=not getattr(args, "skip_bad", False), progress=progress)


# ----------------------------------------------------------------------------------------------
# Commands


def _split_data(root: Path, args):
    """(train, val, test, val_note): val carved from the training split unless --val-split names one."""
    from .data import overlap

    train = _prepare(root, args.train_split, args.size, args)
    if args.limit:
        train = train.repeat(min(args.limit, len(train)))
    if args.val_split == "carve":
        train, val = train.carve(args.val_fraction, args.seed)
        note = f"{len(val)} images carved from {args.train_split} (seed {args.seed})"
    elif args.val_split == "none":
        val, note = None, "none"
    else:
        val = _prepare(root, args.val_split, args.size, args)
        note = args.val_split
        if args.val_split == args.test_split:
            note += " (best.safetensors is then selected on the test split: its score is no longer unbiased)"
    test = _prepare(root, args.test_split, args.size, args) if args.test_split != "none" else None
    for name, other in (("validation", val), ("test", test)):
        shared = overlap(train, other) if other is not None else []
        if shared:
            warnings.warn(f"{len(shared)} of the {len(other)} {name} images are also training images "
                          f"(e.g. {shared[0]}): their scores overstate what the model learned", stacklevel=2)
    return train, val, test, note


def _fit_config(args, model):
    from .data import augment_preset
    from .train import FitConfig, OptimizerConfig

    loss_cfg = parse_kv(args.loss_cfg, "--loss-cfg")
    try:
        from .losses import get_loss

        get_loss(args.loss, **loss_cfg)
    except TypeError as err:
        raise CliError(str(err)) from None
    optimizer = OptimizerConfig(
        name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        nesterov=args.nesterov, clip_norm=args.clip_norm, schedule=args.schedule, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, power=args.power, step_size=args.step_size, gamma=args.gamma)
    return FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, loss=args.loss, loss_cfg=loss_cfg, optimizer=optimizer,
        augment=augment_preset(args.augment), seed=args.seed, ensemble=args.ensemble, sweep=parse_sweep(args.sweep),
        precision=args.precision, device=str(_device(args.device)), compile=args.compile,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, max_steps=args.max_steps,
        accumulate=args.accumulate, ema=args.ema, sync_bn=args.sync_bn, bucket=args.bucket == "flat")


def cmd_train(args) -> int:
    from .core.files import jsonable, write_json
    from .metrics import format_table
    from .train import ConsoleLog, evaluate, evaluate_ensemble, fit

    model = _make_model(args.model, args.model_cfg)
    if args.size % model.stride:
        raise CliError(f"--size {args.size} must be divisible by the model's stride {model.stride}")
    config = _fit_config(args, model)
    cache_hooks = _compile_cache_hooks(args, config)  # a bad --compile-cache file stops us before any write
    root = Path(args.data) if args.data else _synthetic_root(args.synthetic)
    train_data, val_data, test_data, val_note = _split_data(root, args)
    model = _make_model(args.model, args.model_cfg, num_classes=train_data.num_classes)
    out_dir = Path(args.out or Path("runs") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    record["data_root"] = str(root)
    print(f"training {model.name} on {len(train_data)} images at {args.size}px ({config.device}, {args.epochs} "
          f"epochs, batch {args.batch_size}), validating on {val_note} -> {out_dir}", file=sys.stderr)
    from .train.curves import CurvesPlot

    hooks = [ConsoleLog(progress=not args.no_progress), CurvesPlot(out_dir), *cache_hooks]
    result = fit(model, train_data, val_data, config, out_dir=out_dir, resume=args.resume, args=record, hooks=hooks)
    final = result["final"]
    names = result["preprocess"].class_names
    test = None
    if test_data is not None:  # once, at the end, with the selected weights
        from .data import Loader
        from .models import load_model

        chosen = result["best_checkpoint"] or result["checkpoint"]
        _, params, state, _ = load_model(chosen, device=config.device)
        loader = Loader(test_data, args.batch_size, device=config.device, shuffle=False, drop_last=False)
        evaluate_fn = evaluate_ensemble if config.members else evaluate
        test = {"split": args.test_split, "checkpoint": chosen,
                "summary": evaluate_fn(model, params, state, loader, preprocess=result["preprocess"])}
        write_json(out_dir / "test.json", test)
    if args.json:
        print(json.dumps(jsonable({**{k: v for k, v in result.items() if k not in ("train_state", "preprocess")},
                                   "test": test}), indent=2))
        return 0
    if not final:
        print(f"nothing to do: {out_dir} is already at step {result['step']}")
        return 0
    print(f"epoch {final.get('epoch')}  step {final.get('step')}  train loss {_fmt(final.get('train_loss'))}  "
          f"{_fmt(final.get('images_per_s'), '.1f')} images/s")
    for title, vals in (("validation", final.get("val")), (f"test ({args.test_split})", test and test["summary"])):
        for i, summary in enumerate(vals if isinstance(vals, list) else [vals] if vals else []):
            member = ""
            if isinstance(vals, list):
                member = " member " + str(i) + " (" + ", ".join(
                    f"{k}={v[i]:g}" for k, v in (final.get("hparams") or {}).items()) + ")"
            print(f"\n{title}{member}")
            print(format_table(summary, names))
            print(f"series custom IoU: {summary['series_custom_iou']:.4f}")
    print(f"\ncheckpoints: {result['checkpoint']}"
          + (f", {result['best_checkpoint']} (best validation mean IoU {result['best_mean_iou']:.4f}, epoch "
             f"{result['best_epoch']})" if result.get("best_checkpoint") else ""))
    return 0


def _compile_cache_hooks(args, config) -> list:
    """``--compile-cache FILE``: preload it now (before anything compiles), save to it after epoch 1."""
    if not args.compile_cache:
        return []
    from .compile_cache import CompileCacheError, SaveArtifacts, load_artifacts
    from .runtime import resolve_compile

    if not resolve_compile(config.compile, config.device):
        warnings.warn(f"--compile-cache {args.compile_cache} is unused: this run does not compile "
                      "(--compile off, or auto on the CPU)", RuntimeWarning, stacklevel=2)
        return []
    try:
        if load_artifacts(args.compile_cache):
            print(f"compile cache: preloaded {args.compile_cache}", file=sys.stderr)
    except CompileCacheError as err:
        raise CliError(f"--compile-cache: {err}") from None
    return [SaveArtifacts(args.compile_cache)]


def _fmt(x, spec=".4f") -> str:
    if isinstance(x, list):
        return "[" + ", ".join(format(v, spec) for v in x) + "]"
    return format(x, spec) if x is not None else "-"


def _load(args):
    from .models import load_model

    device = _device(args.device)
    weights = getattr(args, "weights", "params")
    model, params, state, meta = load_model(args.checkpoint, device=device, weights=weights)
    k = meta.get("ensemble") or 0
    if getattr(args, "member", None) is not None and not k:
        raise CliError(f"--member {args.member}: {args.checkpoint} holds one model, not an ensemble")
    if k and args.member is not None and not 0 <= args.member < k:
        raise CliError(f"--member {args.member} out of range: the checkpoint holds {k} members")
    return device, model, params, state, meta, k


def _member(tree, i: int):
    from .core.tree import tree_map

    return tree_map(lambda t: t[i], tree)


def cmd_eval(args) -> int:
    import dataclasses as dc

    from .core.files import dumps
    from .data import Loader
    from .metrics import format_table
    from .predict import preprocess_of
    from .train import evaluate

    device, model, params, state, meta, k = _load(args)
    pre = preprocess_of(meta)
    if args.size:
        pre = dc.replace(pre, size=args.size)
    args.policy = pre.policy  # as the model was trained
    data = _prepare(Path(args.data), args.split, int(pre.size), args)
    names = tuple(getattr(data, "class_names", pre.class_names))
    if len(names) != model.num_classes:
        raise CliError(f"{args.data} has {len(names)} classes ({', '.join(names)}) but {args.checkpoint} "
                       f"predicts {model.num_classes}")
    loader = Loader(data, args.batch_size, device=device, shuffle=False, drop_last=False)
    members = [args.member] if args.member is not None else (range(k) if k else [None])
    results = []
    for i in members:
        p, s = (params, state) if i is None else (_member(params, i), _member(state, i))
        summary = evaluate(model, p, s, loader, preprocess=pre, class_names=names, progress=True)
        results.append({"member": i, **summary} if i is not None else summary)
    if args.json:
        print(dumps(results if k and args.member is None else results[0], indent=2))
        return 0
    print(f"{args.checkpoint}: {meta['model']} on {args.split} ({len(data)} images at {pre.size}px, "
          f"{pre.precision})")
    for summary in results:
        if k:
            print(f"\nmember {summary['member']}")
        print(format_table(summary, names))
        print(f"series custom IoU: {summary['series_custom_iou']:.4f}")
    return 0


def _weights_kwargs(args) -> dict:
    return {"weights": args.weights} if getattr(args, "weights", "params") == "ema" else {}


def cmd_predict(args) -> int:
    from .predict import Predictor, format_result, load_for_inference, predict_files

    device = _device(args.device)
    model, params, state, preprocess, meta = load_for_inference(
        args.checkpoint, device=device, member=args.member, **_weights_kwargs(args))
    if args.size:
        preprocess = dataclasses.replace(preprocess, size=args.size)
    predictor = Predictor(model, params, state, preprocess, device=device, tile=args.tile,
                          tile_overlap=args.tile_overlap, tta=args.tta, batch_size=args.batch_size,
                          precision=args.precision)

    def show(result) -> None:
        print(format_result(result, predictor.class_names), file=sys.stderr if result.error else sys.stdout,
              flush=True)

    results = predict_files(predictor, args.images, args.out, overlay=not args.no_overlay, on_result=show)
    if not results:
        raise CliError(f"no images found in {', '.join(args.images)}")
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"fseg: error: {failed} of {len(results)} images failed; the other {len(results) - failed} "
              f"were written to {args.out}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from .export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, format=args.format, member=args.member,
                               **_weights_kwargs(args))
    if result.note:
        print(f"note: {result.note}")
    shape = "[N, 3, H, W], H and W multiples of the stride" if result.dynamic_hw else \
        f"[N, 3, {result.example_size}, {result.example_size}]"
    print(f"{args.checkpoint} -> {result.path} ({result.format}; input float32 RGB in [0, 1] {shape}; "
          "output logits [N, C, H, W])")
    return 0


def cmd_prepare(args) -> int:
    data = _prepare(Path(args.data), args.split, args.size, args, progress=True)
    counts = data.class_counts().tolist()
    info = {"split": args.split, "images": len(data), "size": data.size, "cache": str(data.cache_path),
            "skipped": len(data.skipped), "classes": list(data.class_names),
            "class_pixels": dict(zip(data.class_names, counts))}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.split}: {len(data)} images at {data.size}px, cache {data.cache_path}"
              + (f", {len(data.skipped)} skipped" if data.skipped else ""))
        total = max(sum(counts), 1)
        print("  pixels: " + ", ".join(f"{n} {c / total:.1%}" for n, c in zip(data.class_names, counts)))
    return 0


def cmd_summary(args) -> int:
    from . import summary as summary_mod

    model = _make_model(args.model, args.model_cfg)
    s = summary_mod.summarize(model, input_size=(args.size, args.size), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(s.totals(), indent=2, default=str))
    else:
        print(summary_mod.format_summary(s))
    return 0


def cmd_models(args) -> int:
    from . import models  # noqa: F401
    from .models import create_model, list_models

    for name in list_models():
        if args.verbose:
            try:
                cfg = dataclasses.asdict(create_model(name).cfg)
            except Exception as err:  # a factory that needs arguments
                cfg = f"({err})"
            print(f"{name}: {cfg}")
        else:
            print(name)
    return 0


# ----------------------------------------------------------------------------------------------
# The parser


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="where prepared tensors are cached (default: $XDG_CACHE_HOME/functional_seg, else "
                        "~/.cache/functional_seg; never inside the data folder)")
    p.add_argument("--policy", default="resize", choices=("resize", "pad"),
                   help="resize: stretch to S x S; pad: keep the aspect ratio and pad (ignored pixels)")
    p.add_argument("--workers", type=_positive_int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or inconsistent samples and summarise them in one warning "
                        "(default: stop, counting the bad files and naming the first few)")


def build_parser() -> argparse.ArgumentParser:
    from .options import OPTIMIZERS, SCHEDULES

    parser = _Parser(prog="fseg", description="functional_seg: semantic segmentation the JAX way on torch.func")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (synthetic data unless --data is given)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR",
                     help="dataset root: Oxford-IIIT Pet, images/ + masks/, or Pascal VOC layout")
    src.add_argument("--synthetic", metavar="DIR", nargs="?", const="",
                     help="train on the built-in synthetic dataset (generated into DIR or a temp dir); the default")
    t.add_argument("--train-split", default="trainval", help="split to train on")
    t.add_argument("--val-split", default="carve",
                   help="split evaluated after every epoch to select best.safetensors: 'carve' (a seeded "
                        "--val-fraction of the training split), a split name, or 'none'; naming the test split "
                        "selects the model on it")
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of the training split carved for validation")
    t.add_argument("--test-split", default="test", help="split evaluated once at the end with the selected "
                   "weights (written to RUN_DIR/test.json), or 'none'")
    t.add_argument("--model", default="segnet", help="registered model name (fseg models)")
    t.add_argument("--model-cfg", nargs="*", metavar="KEY=VALUE", help="model cfg overrides, e.g. widths=16,32,64,64")
    t.add_argument("--loss", default="ce", help="ce, soft_iou, soft_iou_log, dice, tversky, focal, ce_dice")
    t.add_argument("--loss-cfg", nargs="*", metavar="KEY=VALUE", help="loss keywords, e.g. label_smoothing=0.1")
    t.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="torchopt-based optimizer")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0, help="L2 (adam, sgd) or decoupled (adamw)")
    t.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    t.add_argument("--nesterov", action="store_true", help="sgd: Nesterov momentum")
    t.add_argument("--clip-norm", type=_positive_float, default=None, help="clip the global gradient norm")
    t.add_argument("--schedule", default="constant", choices=SCHEDULES, help="learning-rate schedule")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warmup of any schedule")
    t.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine/poly floor as a fraction of lr")
    t.add_argument("--power", type=float, default=1.0, help="poly schedule exponent")
    t.add_argument("--step-size", type=_positive_int, default=7, help="step schedule: epochs between decays")
    t.add_argument("--gamma", type=float, default=0.7, help="step schedule: decay factor")
    t.add_argument("--epochs", type=_positive_int, default=2, help="passes over the training split")
    t.add_argument("--batch-size", type=_positive_int, default=16,
                   help="images per optimizer step; under torchrun the GLOBAL batch, split over the processes")
    t.add_argument("--size", type=_positive_int, default=64, help="square input side S")
    t.add_argument("--augment", default="flip_jitter",
                   help="none, flip, flip_jitter (the series' recipe), flip_jitter_full, flip_jitter_crop")
    t.add_argument("--seed", type=int, default=0, help="the one seed: init, shuffling, augmentation, carve")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on cuda")
    t.add_argument("--compile", type=_flag, default="auto", help="auto (on for cuda), on, off")
    t.add_argument("--compile-cache", metavar="FILE", default=None,
                   help="with compilation: preload compiled code from FILE if it exists, and write this run's "
                        "to it after the first epoch (carries a warm start to a fresh machine)")
    t.add_argument("--out", metavar="RUN_DIR", default=None, help="run directory (default runs/<model>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.safetensors")
    t.add_argument("--ensemble", type=_positive_int, default=1, help="train K members in one vmapped step")
    t.add_argument("--sweep", default=None, metavar="NAME=V1,V2",
                   help="one value per ensemble member: lr=1e-3,3e-4 (or loss_weight=... with --loss ce_dice)")
    t.add_argument("--checkpoint-every", type=_positive_int, default=None, help="also checkpoint every N steps")
    t.add_argument("--log-every", type=_positive_int, default=10, help="steps between host syncs / progress updates")
    t.add_argument("--max-steps", type=_positive_int, default=None, help="stop after N steps in total")
    t.add_argument("--accumulate", type=_positive_int, default=1, metavar="K",
                   help="split each batch into K micro-batches (forward/backward each, one update): the memory "
                        "of batch/K images; --batch-size must be divisible by K")
    t.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999); saved in checkpoints, "
                        "scored as val_ema each epoch, used by eval/predict/export with --weights ema")
    t.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: batch norm uses the statistics of the whole global batch (world-size "
                        "invariant); without it each process normalises its slice and running statistics are averaged")
    t.add_argument("--bucket", default="flat", choices=("flat", "per-leaf"),
                   help="under torchrun: all-reduce gradients as one flat buffer or one collective per tensor")
    t.add_argument("--limit", type=_positive_int, default=None, help="train on the first N images only")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar or in-epoch lines (the per-epoch lines stay)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    _data_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a split and print the metric table")
    e.add_argument("--checkpoint", required=True, metavar="FILE")
    e.add_argument("--data", required=True, metavar="DIR")
    e.add_argument("--split", default="test")
    e.add_argument("--size", type=_positive_int, default=None, help="default: the training size")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--device", default="auto")
    e.add_argument("--member", type=int, default=None, help="one member of an ensemble checkpoint")
    e.add_argument("--weights", default="params", choices=("params", "ema"),
                   help="the trained weights or their moving average (runs trained with --ema)")
    e.add_argument("--json", action="store_true")
    _data_options(e)
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="write predicted masks and overlays for images or folders of images")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files and/or folders (every image in a folder, sorted, not recursive)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/<name>_mask.png (palette PNG, pixel = class index) and <name>_overlay.png; "
                        "<name> keeps each input's path relative to the inputs' common folder (a/cat.jpg and "
                        "b/cat.jpg -> a/cat_mask.png, b/cat_mask.png), plus _<suffix> when two inputs in one "
                        "folder share a stem (cat.jpg, cat.png -> cat_jpg, cat_png)")
    p.add_argument("--size", type=_positive_int, default=None, help="default: the training size")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--member", type=int, default=None, help="member of an ensemble checkpoint (default 0)")
    p.add_argument("--weights", default="params", choices=("params", "ema"),
                   help="the trained weights or their moving average (runs trained with --ema)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images (or tiles) per forward pass")
    p.add_argument("--tile", type=_positive_int, default=None, metavar="T",
                   help="sliding-window inference at the image's own scale in T x T windows (large images)")
    p.add_argument("--tile-overlap", type=float, default=0.25, help="fraction of a tile its neighbours share")
    p.add_argument("--tta", default="none", choices=("none", "flip"),
                   help="flip: average the logits with those of the horizontally flipped image")
    p.add_argument("--no-overlay", action="store_true", help="write the masks only")
    p.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="export a checkpoint to ONNX or a torch.export program (.pt2)")
    x.add_argument("--checkpoint", required=True, metavar="FILE")
    x.add_argument("--format", required=True, choices=("onnx", "pt2"))
    x.add_argument("--out", required=True, metavar="FILE")
    x.add_argument("--weights", default="params", choices=("params", "ema"))
    x.add_argument("--member", type=int, default=None, help="member of an ensemble checkpoint (default 0)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("prepare", help="decode, resize and cache a split")
    r.add_argument("--data", required=True, metavar="DIR")
    r.add_argument("--split", default="trainval")
    r.add_argument("--size", type=_positive_int, default=128)
    r.add_argument("--json", action="store_true")
    _data_options(r)
    r.set_defaults(func=cmd_prepare)

    s = sub.add_parser("summary", help="layer table, parameters and mult-adds of a model")
    s.add_argument("--model", default="segnet")
    s.add_argument("--model-cfg", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--size", type=_positive_int, default=128)
    s.add_argument("--batch-size", type=_positive_int, default=1)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("-v", "--verbose", action="store_true", help="with their default cfg")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _show_defaults(parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .checkpoint import CheckpointError
    from .train.rundir import TrainingDiverged

    # warnings (a skipped bad file, train/test overlap) print as one line, without source lines
    warnings.formatwarning = lambda message, *_a, **_k: f"fseg: warning: {' '.join(str(message).split())}\n"
    # torch's deprecation notes to its own code (e.g. inductor calling torch._prims_common.check while it
    # compiles): nothing a user of fseg can act on; those raised at our own calls still show
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"torch(\.|$)")

    try:
        return args.func(args)
    except TrainingDiverged as err:
        print(f"fseg: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fseg: interrupted", file=sys.stderr)
        return 130
    except (CliError, CheckpointError, ValueError) as err:
        # DataError, CheckpointError and RunDirError are ValueErrors whose messages name the file and the fix.
        print(f"fseg: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder, a file where a folder should be, ...
        where = f" {err.filename}" if err.filename else ""
        print(f"fseg: error: cannot use{where}: {err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
