"""The ``fseg`` command line: train, eval, predict, prepare, summary, models.

Every subcommand is a thin shell over the library: its flags are generated from the library's
configs (``FitConfig``, ``OptimizerConfig``, ``DataConfig``: ``core.settings``), it calls one
function and prints what the library formats. Bad input (unknown model, missing data, unreadable
checkpoint, malformed option) ends with one line ``fseg: error: ...`` on stderr and exit status 2;
a diverged training run exits with 1 and names the epoch and step.

    fseg train --model segnet --model-cfg widths=16,32,64,64 --size 64 --epochs 2   # synthetic data
    fseg train --data DIR --epochs 20 --size 128 --batch-size 64 --out runs/segnet
    fseg eval --checkpoint runs/segnet/best.safetensors --data DIR --split test [--json]
    fseg predict --checkpoint runs/segnet/best.safetensors pet.jpg --out preds/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

from .core.settings import SettingError, add_arguments, flag_of, from_arguments, parse_kv

__all__ = ["main", "build_parser"]


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
# Settings from flags


def _settings(cls, args, **overrides):
    """``cls`` from the flags given; a bad value is one line naming its flag."""
    try:
        return from_arguments(cls, args, **overrides)
    except SettingError as err:
        raise CliError(f"{_flag_name(err.field)}: {err.message}") from None


def _flag_name(field: str) -> str:
    return {"name": "--optimizer"}.get(field, flag_of(field))


def _runtime(args, **settings):
    from .runtime import resolve_runtime

    try:
        return resolve_runtime(getattr(args, "device", "auto"), getattr(args, "precision", "auto"), **settings)
    except ValueError as err:
        raise CliError(f"--device: {err}") from None


def _model_cfg(args) -> dict:
    from .models import check_cfg

    cfg = parse_kv(args.model_cfg, "--model-cfg")
    check_cfg(args.model, **cfg)  # validated before any data is read
    return cfg


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_train(args) -> int:
    from .compile_cache import CompileCacheError, compile_cache_hooks
    from .core.files import dumps
    from .data.splits import split_data, synthetic_root
    from .models import create_model
    from .train import ConsoleLog, FitConfig, fit
    from .train.build import check_input_size
    from .train.curves import CurvesPlot
    from .train.log import format_fit_result

    config = _settings(FitConfig, args)
    cfg = _model_cfg(args)
    compiles = _runtime(args, compile=config.compile).compile
    try:
        cache_hooks = compile_cache_hooks(args.compile_cache, compiles)  # a bad file stops us before any write
    except CompileCacheError as err:
        raise CliError(f"--compile-cache: {err}") from None
    root = args.data or synthetic_root(args.synthetic)
    splits = split_data(root, config.data, seed=config.seed)
    model = create_model(args.model, **{"num_classes": splits.num_classes, **cfg})
    check_input_size(model, config.data.size)
    _report_weights(model)
    out = Path(args.out or Path("runs") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    print(f"training {model.name} on {len(splits.train)} images at {config.data.size}px, validating on "
          f"{splits.val_note} -> {out}", file=sys.stderr)
    hooks = [ConsoleLog(progress=not args.no_progress), CurvesPlot(out), *cache_hooks]
    result = fit(model, splits, config, out_dir=out, resume=args.resume, args=record, hooks=hooks)
    if not result.is_main:
        return 0
    if args.json:
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                  if f.name not in ("train_state", "preprocess")}
        print(dumps(fields, indent=2))
    else:
        print(format_fit_result(result))
    return 0


def _report_weights(model) -> None:
    """Resolve and check a pretrained encoder's weights now: a missing or mismatched file is one line
    before any training, and the user sees where the weights come from."""
    from .models import check_encoder_weights

    source = check_encoder_weights(model)
    if source is not None:
        print(f"encoder weights: {source.spec} ({source.kind}, {source.path}); input normalised with mean "
              f"{tuple(round(v, 4) for v in source.mean)}, std {tuple(round(v, 4) for v in source.std)}",
              file=sys.stderr)


def cmd_fetch_weights(args) -> int:
    from .models import fetch_encoder_weights

    path = fetch_encoder_weights(args.encoder, args.weights)
    print(f"{args.encoder} {args.weights} -> {path}")
    return 0


def cmd_audit(args) -> int:
    from .audit import audit
    from .data import prepare
    from .models import create_model
    from .train import ConsoleLog, FitConfig

    config = _settings(FitConfig, args)
    cfg = _model_cfg(args)
    data = prepare(Path(args.data), args.split, config.data.size, progress=True, **config.data.prepare_kwargs())
    model = create_model(args.model, **{"num_classes": len(data.class_names), **cfg})
    _report_weights(model)
    out = Path(args.out or Path("runs") / f"audit-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"auditing {len(data)} images of {args.data} ({args.split}) with {args.folds} folds of {model.name} "
          f"at {config.data.size}px -> {out}", file=sys.stderr)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    result = audit(model, data, config, folds=args.folds, out_dir=out, resume=args.resume, method=args.method,
                   tta=args.tta, top=args.top, hooks=[ConsoleLog(progress=not args.no_progress)], args=record)
    if result is None:  # a rank other than 0 under torchrun
        return 0
    print(f"most suspicious first ({result.method}; files: {', '.join(result.files.values())}):")
    for rank, i in enumerate(result.order[:args.show], start=1):
        print(f"{rank:4d}  {result.names[i]:<32} score {result.image_score[i]:.4f}  "
              f"issues {result.issue_fraction[i]:.1%}  agreement {result.agreement[i]:.1%}  fold {result.folds[i]}")
    return 0


def cmd_eval(args) -> int:
    from .core.files import dumps
    from .models import load_checkpoint
    from .train.log import format_evaluation

    runtime = _runtime(args)
    member = "all" if args.member is None else args.member
    loaded = load_checkpoint(args.checkpoint, device=runtime.device, weights=args.weights, member=member)
    if args.size:
        loaded = dataclasses.replace(loaded, preprocess=dataclasses.replace(loaded.preprocess, size=args.size))
    pre = loaded.preprocess
    data_cfg = _settings(_data_config(), args, size=pre.size, policy=pre.policy)
    label = f"{args.data} ({args.split})"
    if args.full_res:
        from .train.full_res import evaluate_full_res

        result = evaluate_full_res(loaded, Path(args.data), args.split, runtime=runtime,
                                   binary_255=data_cfg.binary_255, strict=not data_cfg.skip_bad, tile=args.tile,
                                   tile_overlap=args.tile_overlap, batch_size=args.batch_size,
                                   boundary_ratio=args.boundary_ratio, workers=data_cfg.workers or 2,
                                   data_label=label)
        where = "at full resolution (each image at its own size, scored against its original mask)"
    else:
        from .data import prepare
        from .train.evaluation import evaluate_checkpoint

        data = prepare(Path(args.data), args.split, data_cfg.size, progress=True, **data_cfg.prepare_kwargs())
        result = evaluate_checkpoint(loaded, data, runtime=runtime, batch_size=args.batch_size, progress=True,
                                     data_label=label, boundary_ratio=args.boundary_ratio)
        where = f"at {result['resolution']}, the prepared images and masks"
    if args.reliability:
        from .reliability import save_summary_diagrams

        title = f"{Path(args.checkpoint).name} on {args.split}"
        save_summary_diagrams(args.reliability, result["summary"], title=title)
    if args.json:
        print(dumps(result, indent=2))
        return 0
    header = (f"{args.checkpoint}: {loaded.meta['model']} on {args.split}, {result['images']} images {where} "
              f"({runtime.precision})")
    print(format_evaluation(result, result["class_names"], header=header))
    return 0


def _data_config():
    from .data.splits import DataConfig

    return DataConfig


def cmd_predict(args) -> int:
    from .models import load_checkpoint
    from .predict import Predictor, format_result, predict_files

    runtime = _runtime(args)
    # --uncertainty runs every member of an ensemble (their disagreement is the point); otherwise the best one
    member = args.member if args.member is not None else "all" if args.uncertainty else "auto"
    loaded = load_checkpoint(args.checkpoint, device=runtime.device, weights=args.weights, member=member)
    if args.size:
        loaded = dataclasses.replace(loaded, preprocess=dataclasses.replace(loaded.preprocess, size=args.size))
    predictor = Predictor.from_checkpoint(loaded, runtime, tile=args.tile, tile_overlap=args.tile_overlap,
                                          tta=args.tta, batch_size=args.batch_size, uncertainty=args.uncertainty)

    def show(result) -> None:
        print(format_result(result, predictor.class_names), file=sys.stderr if result.error else sys.stdout,
              flush=True)

    report = predict_files(predictor, args.images, args.out, overlay=not args.no_overlay, on_result=show)
    if report.skipped:
        print(f"fseg: skipped {len(report.skipped)} PNG file(s) that fseg wrote (earlier outputs, marked "
              "Software: functional_seg)", file=sys.stderr)
    results, failed = report.results, report.failed
    if not results:
        raise CliError(f"no images found in {', '.join(args.images)}")
    if failed:
        print(f"fseg: error: {failed} of {len(results)} images failed; the other {len(results) - failed} "
              f"were written to {args.out}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from .export import export_checkpoint

    member = "auto" if args.member is None else args.member
    result = export_checkpoint(args.checkpoint, args.out, format=args.format, member=member, weights=args.weights)
    if result.note:
        print(f"note: {result.note}")
    shape = "[N, 3, H, W], H and W multiples of the stride" if result.dynamic_hw else \
        "[N, 3, {}, {}]".format(*result.example_size if isinstance(result.example_size, tuple)
                                else (result.example_size,) * 2)
    print(f"{args.checkpoint} -> {result.path} ({result.format}; input float32 RGB in [0, 1] {shape}; "
          "output logits [N, C, H, W])")
    return 0


def cmd_prepare(args) -> int:
    from .data import prepare

    cfg = _settings(_data_config(), args)
    data = prepare(Path(args.data), args.split, cfg.size, progress=True, **cfg.prepare_kwargs())
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
    from .models import create_model

    model = create_model(args.model, **parse_kv(args.model_cfg, "--model-cfg"))
    s = summary_mod.summarize(model, input_size=(args.size, args.size), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(s.totals(), indent=2, default=str))
    else:
        print(summary_mod.format_summary(s))
    return 0


def cmd_models(args) -> int:
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


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _size(value: str) -> int | tuple[int, int]:
    """S or HxW, positive (``data.splits.parse_size``)."""
    from .data.splits import parse_size

    try:
        size = parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if min(size if isinstance(size, tuple) else (size,)) < 1:
        raise argparse.ArgumentTypeError(f"expected S or HxW in positive pixels, got {value!r}")
    return size


def _member(value: str) -> int | str:
    if value in ("all", "auto"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, auto or a member index, got {value!r}") from None


_CACHE_FLAGS = ("cache_dir", "workers", "skip_bad", "binary_255")
_WEIGHTS_HELP = ("auto: the raw or EMA weights, whichever validated higher (recorded in the checkpoint); params: "
                 "the trained weights; ema: their moving average (runs trained with --ema)")


def _add_train(sub) -> None:
    from .train.config import FitConfig

    t = sub.add_parser("train", help="train a model (the built-in synthetic dataset unless --data is given)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR",
                     help="dataset root: Oxford-IIIT Pet, images/ + masks/, or Pascal VOC layout")
    src.add_argument("--synthetic", metavar="DIR", nargs="?", const="",
                     help="train on the built-in synthetic dataset (generated into DIR or a temp dir); the default")
    t.add_argument("--model", default="segnet", help="registered model name (fseg models)")
    t.add_argument("--model-cfg", nargs="*", metavar="KEY=VALUE", help="model cfg overrides, e.g. widths=16,32,64,64")
    add_arguments(t, FitConfig)  # its DataConfig's flags too
    t.add_argument("--compile-cache", metavar="FILE", default=None,
                   help="with compilation: preload compiled code from FILE if it exists, and write this run's "
                        "to it after the first epoch (carries a warm start to a fresh machine)")
    t.add_argument("--out", metavar="RUN_DIR", default=None, help="run directory (default runs/<model>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.safetensors")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar or in-epoch lines (the per-epoch lines stay)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_train)


def _add_audit(sub) -> None:
    from .options import AUDIT_METHODS, TTA_MODES
    from .train.config import FitConfig

    a = sub.add_parser("audit", help="find likely label errors: K-fold models in one vmapped run score every mask "
                                     "out of sample")
    a.add_argument("--data", required=True, metavar="DIR", help="dataset root (any layout fseg train reads)")
    a.add_argument("--split", default="trainval", help="the split to audit")
    a.add_argument("--folds", type=_positive_int, default=5, help="K: member k never learns from fold k's labels")
    a.add_argument("--method", default="self_confidence", choices=AUDIT_METHODS,
                   help="the per-pixel label-quality score")
    a.add_argument("--tta", default="flip", choices=TTA_MODES,
                   help="flip: score with the mean of each image's and its mirror's out-of-sample probabilities")
    a.add_argument("--top", type=int, default=16, help="images on the contact sheet audit_top.png")
    a.add_argument("--show", type=int, default=20, help="ranked images printed")
    a.add_argument("--model", default="segnet", help="registered model name (fseg models)")
    a.add_argument("--model-cfg", nargs="*", metavar="KEY=VALUE", help="model cfg overrides")
    add_arguments(a, FitConfig, skip=("ensemble", "sweep", "val_split", "val_fraction", "test_split", "test_limit",
                                      "train_split"))
    a.add_argument("--out", metavar="RUN_DIR", default=None, help="run directory (default runs/audit-<model>-<time>)")
    a.add_argument("--resume", action="store_true", help="continue the K-fold training in RUN_DIR, then score")
    a.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch lines stay)")
    a.set_defaults(func=cmd_audit)


def _add_eval(sub) -> None:
    from .data.splits import DataConfig

    e = sub.add_parser("eval", help="evaluate a checkpoint on a split and print the metric table")
    e.add_argument("--checkpoint", required=True, metavar="FILE")
    e.add_argument("--data", required=True, metavar="DIR")
    e.add_argument("--split", default="test")
    e.add_argument("--size", type=_size, default=None, metavar="S",
                   help="S or HxW (default: the training size); the prepared images' size, or with --full-res "
                        "the size whole images are fitted to before their logits are resized back")
    e.add_argument("--full-res", action="store_true",
                   help="score every image at its own size against its original mask file (the protocol papers "
                        "report) instead of the prepared, resized split; an ensemble is scored as its mean "
                        "prediction")
    e.add_argument("--tile", type=_positive_int, default=None, metavar="T",
                   help="with --full-res: sliding windows of side T instead of whole images")
    e.add_argument("--tile-overlap", type=float, default=0.25, help="with --tile: fraction of T windows share")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--device", default="auto")
    e.add_argument("--member", type=_member, default=None,
                   help="one member of an ensemble checkpoint, or auto (the best validated); default: all")
    e.add_argument("--weights", default="auto", choices=("auto", "params", "ema"), help=_WEIGHTS_HELP)
    e.add_argument("--boundary-ratio", type=float, default=0.02,
                   help="Boundary IoU's band width as a fraction of the image diagonal (the reference's 0.02)")
    e.add_argument("--reliability", metavar="PNG", default=None,
                   help="also draw the reliability diagram (calibration per confidence bin) to this file")
    e.add_argument("--json", action="store_true")
    add_arguments(e, DataConfig, only=_CACHE_FLAGS)
    e.set_defaults(func=cmd_eval)


def _add_predict(sub) -> None:
    from .options import TTA_MODES

    p = sub.add_parser("predict", help="write predicted masks and overlays for images or folders of images")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files and/or folders (every image in a folder, sorted, not recursive)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/<name>_mask.png (palette PNG, pixel = class index) and <name>_overlay.png, "
                        "never over a file fseg did not write (its PNGs are marked; marked inputs are skipped); "
                        "<name> keeps each input's path relative to the inputs' common folder (a/cat.jpg and "
                        "b/cat.jpg -> a/cat_mask.png, b/cat_mask.png), plus _<suffix> when two inputs in one "
                        "folder share a stem (cat.jpg, cat.png -> cat_jpg, cat_png)")
    p.add_argument("--size", type=_size, default=None, metavar="S",
                   help="S or HxW: the size whole images are fitted to (default: the training size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--member", type=_member, default=None,
                   help="member of an ensemble checkpoint (default: auto, the best validated; all with "
                        "--uncertainty)")
    p.add_argument("--weights", default="auto", choices=("auto", "params", "ema"), help=_WEIGHTS_HELP)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images (or tiles) per forward pass")
    p.add_argument("--tile", type=_positive_int, default=None, metavar="T",
                   help="sliding-window inference at the image's own scale in T x T windows (large images)")
    p.add_argument("--tile-overlap", type=float, default=0.25, help="fraction of a tile its neighbours share")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="flip: average the logits with those of the horizontally flipped image")
    p.add_argument("--no-overlay", action="store_true", help="write the masks (and uncertainty maps) only")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <name>_entropy.png (predictive entropy) and, for an ensemble checkpoint, "
                        "<name>_mutual_info.png (the members' disagreement), 16-bit PNGs in units of 1e-4 nats "
                        "(value / 10000 = nats), and <name>_uncertainty.png (entropy heat map over the image); "
                        "runs every member of an ensemble, needs an ensemble or --tta flip")
    p.set_defaults(func=cmd_predict)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="export a checkpoint to ONNX or a torch.export program (.pt2)")
    x.add_argument("--checkpoint", required=True, metavar="FILE")
    x.add_argument("--format", required=True, choices=("onnx", "pt2"))
    x.add_argument("--out", required=True, metavar="FILE")
    x.add_argument("--weights", default="auto", choices=("auto", "params", "ema"), help=_WEIGHTS_HELP)
    x.add_argument("--member", type=_member, default=None,
                   help="member of an ensemble checkpoint (default: auto, the best validated)")
    x.set_defaults(func=cmd_export)


def _add_prepare(sub) -> None:
    from .data.splits import DataConfig

    r = sub.add_parser("prepare", help="decode, resize and cache a split")
    r.add_argument("--data", required=True, metavar="DIR")
    r.add_argument("--split", default="trainval")
    add_arguments(r, DataConfig, only=("size", "policy", *_CACHE_FLAGS))
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_prepare)


def _add_summary(sub) -> None:
    s = sub.add_parser("summary", help="layer table, parameters and mult-adds of a model")
    s.add_argument("--model", default="segnet")
    s.add_argument("--model-cfg", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--size", type=_positive_int, default=128)
    s.add_argument("--batch-size", type=_positive_int, default=1)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fseg", description="functional_seg: semantic segmentation the JAX way on torch.func")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for add in (_add_train, _add_audit, _add_eval, _add_predict, _add_export, _add_prepare, _add_summary):
        add(sub)
    f = sub.add_parser("fetch-weights", help="download an encoder's pretrained weights into the local cache (the "
                                             "one command that uses a network; loading never does)")
    f.add_argument("encoder", help="a timm model name or torchvision:<name>, e.g. resnet34")
    f.add_argument("--weights", default="imagenet", help="'imagenet' or a timm pretrained tag")
    f.set_defaults(func=cmd_fetch_weights)
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
    except SettingError as err:  # a setting refused past parsing (e.g. a split the dataset lacks): name its flag
        print(f"fseg: error: {_flag_name(err.field)}: {' '.join(err.message.split())}", file=sys.stderr)
        return 2
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
