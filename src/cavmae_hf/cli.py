"""
The `cavmae` command line.

    cavmae classify VIDEO... --model DIR [--top-k 5] [--json]
    cavmae embed VIDEO... --model DIR [--output index.safetensors] [--json]
    cavmae retrieve QUERY... --model DIR --index index.safetensors [--top-k 5] [--json]
    cavmae reconstruct VIDEO --model DIR [--output reconstruction.png] [--json]
    cavmae convert --checkpoint X.pth --output DIR [...]
    cavmae demo [...]

Exit codes: 0 success, 2 bad usage or input (unreadable media, wrong shapes, missing files), 1 anything unexpected.
Errors from inputs print one line to stderr; `--debug` shows the traceback instead.
"""

import argparse
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .configuration_cav_mae import CavMaeError

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE = 0, 1, 2


class UsageError(CavMaeError):
    """The command line asks for something that cannot be done (bad combination of options, missing files)."""


def _input_errors() -> tuple:
    """Exception types that mean "bad input", reported in one line with exit code 2."""
    from .media import MediaError
    from .modeling_cav_mae import CavMaeInputError

    return (UsageError, MediaError, CavMaeInputError, ValueError, FileNotFoundError, IsADirectoryError, OSError)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------
def _progress(iterable, total: int, description: str, args):
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=description, unit="clip", disable=True if args.quiet else None, file=sys.stderr
    )


def _check_files(paths) -> list[str]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"{path} is a directory, not a file.")
        if not path.is_file():
            raise UsageError(f"File not found: {path}")
    return [str(path) for path in paths]


def _check_model_dir(model: str):
    """A local directory must hold a CAV-MAE config.json; anything else must look like a Hub id (owner/name)."""
    from .pipelines import read_config

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"{model} is not a saved model directory (no config.json).")
        read_config(path)  # CheckpointLoadError: unreadable, or another model type
        return
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UsageError(f"Model directory not found: {model}")


def _check_architecture(model: str, expected: str, purpose: str):
    """Refuse a local checkpoint saved as another class (its head or decoder would be random)."""
    from transformers import AutoConfig

    from .pipelines import read_config

    local = Path(model).expanduser().is_dir()
    architectures = (read_config(model) if local else AutoConfig.from_pretrained(model)).architectures or []
    if local and expected not in architectures:
        raise UsageError(
            f"{model} is saved as {', '.join(architectures) or 'an unknown class'}; "
            f"{purpose} needs a {expected} checkpoint."
        )


def _check_device(device: str):
    """A device string torch knows, and a device this machine has (torch's own errors would exit as unexpected)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from None
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }.get(parsed.type)
    if available is not None and not available():
        raise UsageError(f"--device {device}: no {parsed.type} device is available on this machine.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")


def _check_counts(args):
    """Options that count something must be at least 1 (one `error:` line, exit code 2)."""
    for option in ("top_k", "num_frames", "batch_size", "dpi"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {value}.")


def _dtype(args):
    import torch

    return None if args.dtype == "auto" else getattr(torch, args.dtype)


def _pipeline(task: str, args):
    from .pipelines import cav_mae_pipeline

    _check_model_dir(args.model)
    _check_device(args.device)
    return cav_mae_pipeline(task, args.model, device=args.device, dtype=_dtype(args))


def _print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _report(args, value, lines) -> int:
    """Print `value` as JSON with --json, else the human-readable `lines`; returns the command's exit code."""
    if args.json:
        _print_json(value)
    else:
        for line in lines:
            print(line)
    return EXIT_OK


def _grouped_lines(results: list[dict], title: str, entries: str, entry_line):
    """Text output of per-input results: each `result[title]`, then `entry_line(entry)` for its `result[entries]`."""
    for result in results:
        yield result[title]
        for entry in result[entries]:
            yield entry_line(entry)


def _add_model_options(parser, frames: bool = True, batch: bool = True):
    parser.add_argument("--model", required=True, help="model directory (save_pretrained / converted) or Hub id")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model dtype (default: as saved)",
    )
    if frames:
        parser.add_argument("--num-frames", type=int, default=10, help="frames sampled per video (default: 10)")
    if batch:
        parser.add_argument("--batch-size", type=int, default=1, help="clips per model call (default: 1)")


def _add_output_options(parser):
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


# ----------------------------------------------------------------------------------------------------------------
# classify
# ----------------------------------------------------------------------------------------------------------------
def run_classify(args) -> int:
    from .pipelines import CLASSIFICATION_TASK

    videos = _check_files(args.inputs)
    _check_counts(args)
    _check_model_dir(args.model)
    _check_architecture(args.model, "CavMaeForAudioVisualClassification", "classification")
    classifier = _pipeline(CLASSIFICATION_TASK, args)
    outputs = classifier(
        (video for video in videos), batch_size=args.batch_size, num_frames=args.num_frames, top_k=args.top_k
    )
    results = [
        {"input": video, "labels": labels}
        for video, labels in zip(videos, _progress(outputs, len(videos), "classifying", args))
    ]
    return _report(args, results, _grouped_lines(results, "input", "labels", _label_line))


def _label_line(entry: dict) -> str:
    return f"  {entry['score']:.4f}  {entry['label']}"


# ----------------------------------------------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------------------------------------------
def run_embed(args) -> int:
    from .pipelines import FEATURE_EXTRACTION_TASK
    from .retrieval import RetrievalIndex

    if args.output is None and not args.json:
        raise UsageError("Give --output FILE.safetensors (an index for `cavmae retrieve`), --json, or both.")
    if args.output is not None:
        from .retrieval import check_index_path

        check_index_path(args.output)  # before the clips are embedded
    sources = _check_files(args.inputs)
    _check_counts(args)
    extractor = _pipeline(FEATURE_EXTRACTION_TASK, args)
    outputs = extractor(
        (source for source in sources), batch_size=args.batch_size, num_frames=args.num_frames, return_tensors=True
    )
    clips = list(_progress(outputs, len(sources), "embedding", args))
    summary = {"clips": len(clips)}
    if args.output is not None:
        index = RetrievalIndex.from_clip_embeddings(
            sources, clips, metadata={"model": args.model, "num_frames": str(args.num_frames)}
        )
        index.save(args.output)
        summary.update(index=str(args.output), modalities=list(index.modalities), dim=index.dim)
    if args.json:
        summary["embeddings"] = [
            {
                "input": source,
                **{
                    name: clip[name].tolist()
                    for name in ("audio_embeds", "visual_embeds", "joint_embeds")
                    if name in clip
                },
            }
            for source, clip in zip(sources, clips)
        ]
    return _report(
        args, summary, [f"embedded {summary['clips']} clip(s)" + (f" into {args.output}" if args.output else "")]
    )


# ----------------------------------------------------------------------------------------------------------------
# retrieve
# ----------------------------------------------------------------------------------------------------------------
def run_retrieve(args) -> int:
    from .pipelines import FEATURE_EXTRACTION_TASK
    from .retrieval import RetrievalIndex, search

    queries = _check_files(args.inputs)
    _check_counts(args)
    index = RetrievalIndex.load(args.index)
    extractor = _pipeline(FEATURE_EXTRACTION_TASK, args)
    results = []
    for query in _progress(queries, len(queries), "searching", args):
        hits = search(
            index,
            extractor,
            query,
            top_k=args.top_k,
            query_modality=args.query_modality,
            target_modality=args.target_modality,
            num_frames=args.num_frames,
        )
        results.append({"query": query, "hits": [hit.to_dict() for hit in hits]})
    return _report(args, results, _grouped_lines(results, "query", "hits", _hit_line))


def _hit_line(hit: dict) -> str:
    return f"  {hit['rank']:>3}. {hit['score']:+.4f}  {hit['key']}"


# ----------------------------------------------------------------------------------------------------------------
# reconstruct
# ----------------------------------------------------------------------------------------------------------------
def run_reconstruct(args) -> int:
    from .modeling_cav_mae import CavMaeForPreTraining
    from .pipelines import load_feature_extractor, load_model
    from .reconstruction import reconstruct_clip, render_reconstruction

    (video,) = _check_files([args.input])
    _check_counts(args)
    _check_model_dir(args.model)
    _check_device(args.device)
    _check_architecture(args.model, "CavMaeForPreTraining", "reconstruction (with the decoder)")
    if Path(args.model).expanduser().is_dir():
        model = load_model(args.model, CavMaeForPreTraining, dtype=_dtype(args))
    else:
        model = CavMaeForPreTraining.from_pretrained(args.model, dtype=_dtype(args))
    model = model.to(args.device).eval()
    extractor = load_feature_extractor(args.model, model.config)
    result = reconstruct_clip(
        model,
        video,
        feature_extractor=extractor,
        frame_index=args.frame_index,
        num_frames=args.num_frames,
        audio_mask_ratio=args.audio_mask_ratio,
        visual_mask_ratio=args.visual_mask_ratio,
        audio_mask_mode=args.audio_mask_mode,
        seed=args.seed,
    )
    output = render_reconstruction(result, args.output, dpi=args.dpi)
    summary = {
        "input": video,
        "output": str(output),
        "audio_mae_loss": result.audio_mae_loss,
        "visual_mae_loss": result.visual_mae_loss,
        "norm_pix_loss": result.norm_pix_loss,
    }
    return _report(
        args,
        summary,
        [f"wrote {output} (audio MSE {result.audio_mae_loss:.4f}, visual MSE {result.visual_mae_loss:.4f})"],
    )


def _mask_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a mask ratio must be in [0, 1), got {text}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# convert, demo: delegated
# ----------------------------------------------------------------------------------------------------------------
def run_convert(args) -> int:
    from .convert_original_checkpoint import main as convert_main

    return convert_main(args.passthrough)


def run_demo(args) -> int:
    if importlib.util.find_spec("cavmae_hf.demo") is None:
        print("error: the demo is not available in this installation (cavmae_hf.demo is missing).", file=sys.stderr)
        return EXIT_USAGE
    try:
        demo = importlib.import_module("cavmae_hf.demo")
    except ImportError as error:
        print(f"error: {_missing_demo_dependency(error)}", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog="cavmae demo", description=(demo.__doc__ or "").strip().split("\n")[0] or None
    )
    demo.add_arguments(parser)
    return int(demo.run(parser.parse_args(args.passthrough)) or 0)


def _missing_demo_dependency(error: ImportError) -> str:
    """One line naming the module the demo could not import and how to install the demo's dependencies."""
    match = re.search(r"No module named '([^']+)'", str(error))
    module = error.name or (match.group(1) if match else None)
    missing = f"without the module {module!r} ({_one_line(error)})" if module else f"({_one_line(error)})"
    return f'the demo cannot start {missing}. Install its dependencies with: pip install "cavmae-hf[demo]"'


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------
def _add_common_options(parser, default):
    parser.add_argument("--quiet", "-q", action="store_true", default=default, help="no progress bars")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks of errors")


def _add_inputs(parser, metavar: str):
    parser.add_argument("inputs", nargs="+", metavar=metavar, help="video, audio or image files")


def _classify_options(parser):
    _add_inputs(parser, "VIDEO")
    _add_model_options(parser)
    parser.add_argument("--top-k", type=int, default=5, help="labels per input (default: 5)")


def _embed_options(parser):
    _add_inputs(parser, "VIDEO")
    _add_model_options(parser)
    parser.add_argument("--output", "-o", type=Path, help="index file to write (.safetensors)")


def _retrieve_options(parser):
    _add_inputs(parser, "QUERY")
    parser.add_argument("--index", required=True, type=Path, help="index written by `cavmae embed --output`")
    _add_model_options(parser, batch=False)
    parser.add_argument("--top-k", type=int, default=5, help="results per query (default: 5)")
    parser.add_argument("--query-modality", choices=["audio", "visual"], help="which embedding of the query to use")
    parser.add_argument("--target-modality", choices=["audio", "visual"], help="which embeddings of the index to match")


def _reconstruct_options(parser):
    parser.add_argument("input", metavar="VIDEO", help="video file with an audio track")
    _add_model_options(parser, batch=False)
    parser.add_argument("--output", "-o", type=Path, default=Path("reconstruction.png"), help="PNG to write")
    parser.add_argument("--frame-index", type=int, help="which sampled frame to show (default: the middle one)")
    parser.add_argument("--audio-mask-ratio", type=_mask_ratio, help="default: the model's (0.75)")
    parser.add_argument("--visual-mask-ratio", type=_mask_ratio, help="default: the model's (0.75)")
    parser.add_argument("--audio-mask-mode", choices=["unstructured", "time", "freq", "tf"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    parser.add_argument("--dpi", type=int, default=100, help="PNG resolution; the figure is 15 x 7.5 inches")


@dataclass(frozen=True)
class _Command:
    """A subcommand that runs a model: `add_options` adds its own options, `--json` and the handler are common."""

    name: str
    handler: Callable[[argparse.Namespace], int]
    add_options: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str


def _model_commands() -> tuple[_Command, ...]:
    """The subcommands that run a model (built when the parser is, so that the handlers are looked up then)."""
    return (
        _Command(
            "classify",
            run_classify,
            _classify_options,
            help="labels of videos (audio track + frames), audio files or images",
            description="Classify each input with an audio-visual classification model; prints the top labels.",
        ),
        _Command(
            "embed",
            run_embed,
            _embed_options,
            help="pooled audio / visual embeddings; writes a retrieval index",
            description="Embed clips with a CAV-MAE model. --output writes a safetensors retrieval index for "
            "`cavmae retrieve`; --json prints the embeddings.",
        ),
        _Command(
            "retrieve",
            run_retrieve,
            _retrieve_options,
            help="nearest clips of an index for videos, audio files or images",
            description="Search an index written by `cavmae embed`. By default a query is matched across modalities: "
            "its audio against the clips' frames (audio files, videos), its frames against the clips' audio (images).",
        ),
        _Command(
            "reconstruct",
            run_reconstruct,
            _reconstruct_options,
            help="mask and reconstruct a video's audio and a frame; writes a PNG",
            description="Masked reconstruction with a pretraining checkpoint: original / masked / reconstruction of "
            "one frame and of the spectrogram, as a PNG.",
        ),
    )


def _add_model_command(commands, common, command: _Command):
    parser = commands.add_parser(command.name, parents=[common], help=command.help, description=command.description)
    command.add_options(parser)
    _add_output_options(parser)
    parser.set_defaults(handler=command.handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cavmae",
        description="CAV-MAE (Contrastive Audio-Visual Masked Autoencoder): classify, embed, retrieve and reconstruct "
        "videos, convert original checkpoints.",
        epilog="Exit codes: 0 ok, 2 usage or input error, 1 unexpected error.",
    )
    _add_common_options(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, default=argparse.SUPPRESS)  # also accepted after the command
    for command in _model_commands():
        _add_model_command(commands, common, command)

    convert = commands.add_parser(
        "convert", add_help=False, help="convert an original CAV-MAE .pth checkpoint (see `cavmae convert --help`)"
    )
    convert.set_defaults(handler=run_convert, passthrough_allowed=True)
    demo = commands.add_parser("demo", add_help=False, help="interactive demo (see `cavmae demo --help`)")
    demo.set_defaults(handler=run_demo, passthrough_allowed=True)
    return parser


def main(argv=None) -> int:
    """Entry point of the `cavmae` console script; returns the exit code."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    if rest and not getattr(args, "passthrough_allowed", False):
        parser.print_usage(sys.stderr)
        print(f"cavmae: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return EXIT_USAGE
    args.passthrough = rest
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return args.handler(args)
    except SystemExit as exit_:  # a delegated parser (convert, demo) exiting
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _input_errors() as error:
        if args.debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 - the last resort of a command line
        if args.debug:
            raise
        print(
            f"unexpected error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
