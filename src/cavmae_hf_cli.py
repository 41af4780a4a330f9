"""
The arguments of the `cavmae` command line, and its entry point. Standard library only: importing `cavmae_hf`
registers its classes with Transformers, which loads torch and Transformers (seconds), so `--help`, `--version`
and usage errors are answered here, before the package is imported; the commands themselves are in `cavmae_hf.cli`.

    cavmae classify VIDEO... --model DIR [--top-k 5] [--json]
    cavmae embed VIDEO... --model DIR [--output index.safetensors] [--json]
    cavmae retrieve QUERY... --model DIR --index index.safetensors [--top-k 5] [--json]
    cavmae reconstruct VIDEO --model DIR [--output reconstruction.png] [--json]
    cavmae convert --checkpoint X.pth --output DIR [--json] [...]
    cavmae demo [...]

Exit codes: 0 success; 2 bad usage or input (every error the package raises on purpose, a `CavMaeError`: missing
or unreadable files, wrong checkpoint kinds, bad options); 1 anything else (an internal error). Errors print one
line on stderr; `--debug` shows the traceback instead.
"""

import argparse
import sys
from collections import namedtuple
from pathlib import Path

__version__ = "0.1.0"  # the package's (setup.cfg and cavmae_hf.__version__ read it here)
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2
PROG = "cavmae"


# ----------------------------------------------------------------------------------------------------------------
# Option types
# ----------------------------------------------------------------------------------------------------------------
def mask_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a mask ratio must be in [0, 1), got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Options of each subcommand
# ----------------------------------------------------------------------------------------------------------------
def _add_model_options(parser, frames: bool = True, batch: bool = True, video_options: str | None = "first"):
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
    if video_options:
        _add_video_options(parser, video_options)
    if batch:
        parser.add_argument("--batch-size", type=int, default=1, help="clips per model call (default: 1)")


# cavmae_hf.media's FRAME_SELECTIONS, FRAME_TRANSFORMS, AUDIO_PRECISIONS (written out: parsing imports no torch)
VIDEO_OPTION_CHOICES = {
    "frame_selection": ("decode_order", "timestamp"),
    "frame_transform": ("reference_jpeg", "none"),
    "audio_precision": ("int16", "float32"),
}


def _add_video_options(parser, default: str):
    """How video files are decoded (`cavmae_hf.media.load_video`); the first choices reproduce the reference's
    preprocessing scripts, the data the released checkpoints were trained on. `default`: "first", or "index" (the
    options the index was built with)."""
    helps = {
        "frame_selection": "which frames: the reference scripts' OpenCV frame indices, or by timestamp",
        "frame_transform": "frames as the reference scripts wrote them (224 px JPEG at quality 75), or untouched",
        "audio_precision": "audio resampled to 16-bit samples as the reference's WAV files, or kept in float32",
    }
    for name, choices in VIDEO_OPTION_CHOICES.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            choices=choices,
            help=f"{helps[name]} (default: {choices[0] if default == 'first' else 'as the index was built'})",
        )


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
    _add_model_options(parser, batch=False, video_options="index")
    parser.add_argument("--top-k", type=int, default=5, help="results per query (default: 5)")
    parser.add_argument("--query-modality", choices=["audio", "visual"], help="which embedding of the query to use")
    parser.add_argument("--target-modality", choices=["audio", "visual"], help="which embeddings of the index to match")


def _reconstruct_options(parser):
    parser.add_argument("input", metavar="VIDEO", help="video file with an audio track")
    _add_model_options(parser, batch=False, video_options=None)
    parser.add_argument("--output", "-o", type=Path, default=Path("reconstruction.png"), help="PNG to write")
    parser.add_argument("--frame-index", type=int, help="which sampled frame to show (default: the middle one)")
    parser.add_argument("--audio-mask-ratio", type=mask_ratio, help="default: the model's (0.75)")
    parser.add_argument("--visual-mask-ratio", type=mask_ratio, help="default: the model's (0.75)")
    parser.add_argument("--audio-mask-mode", choices=["unstructured", "time", "freq", "tf"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    parser.add_argument("--dpi", type=int, default=100, help="PNG resolution; the figure is 15 x 7.5 inches")


def add_convert_options(parser):
    """The options of `cavmae convert` (and `python -m cavmae_hf.convert_original_checkpoint`)."""
    parser.add_argument("--checkpoint", required=True, help="original .pth file (flat state dict)")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--label-csv", help="CSV with index,mid,display_name for id2label (AudioSet's ships)")
    parser.add_argument("--num-mel-bins", type=positive_int, default=128)
    parser.add_argument(
        "--num-attention-heads", type=positive_int, help="encoder heads (default: 12 for the released 768-wide models)"
    )
    parser.add_argument(
        "--decoder-num-attention-heads",
        type=positive_int,
        help="decoder heads (default: 16 for the released 512-wide decoders)",
    )
    parser.add_argument(
        "--classification-mode",
        choices=("multimodal", "audio", "visual"),
        help="what a fine-tuned model pools (audio-only and visual-only fine-tuned checkpoints need it)",
    )
    parser.add_argument(
        "--problem-type",
        choices=("single_label_classification", "multi_label_classification"),
        help="default: multi-label for 527 (AudioSet) labels, single-label otherwise",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="a starting point that covers only part of the model: missing "
        "weights keep their initialisation, unknown keys are left out; both are listed",
    )


# A subcommand with its own options (`add_options(parser)`); `--json`, `--quiet` and `--debug` are common to all.
# (A namedtuple: dataclasses would import inspect, a tenth of the start-up time.)
Subcommand = namedtuple("Subcommand", ["name", "add_options", "help", "description"])


SUBCOMMANDS = (
    Subcommand(
        "classify",
        _classify_options,
        help="labels of videos (audio track + frames), audio files or images",
        description="Classify each input with an audio-visual classification model; prints the top labels.",
    ),
    Subcommand(
        "embed",
        _embed_options,
        help="pooled audio / visual embeddings; writes a retrieval index",
        description="Embed clips with a CAV-MAE model. --output writes a safetensors retrieval index for "
        "`cavmae retrieve`; --json prints the embeddings.",
    ),
    Subcommand(
        "retrieve",
        _retrieve_options,
        help="nearest clips of an index for videos, audio files or images",
        description="Search an index written by `cavmae embed`. By default a query is matched across modalities: "
        "its audio against the clips' frames (audio files, videos), its frames against the clips' audio (images).",
    ),
    Subcommand(
        "reconstruct",
        _reconstruct_options,
        help="mask and reconstruct a video's audio and a frame; writes a PNG",
        description="Masked reconstruction with a pretraining checkpoint: original / masked / reconstruction of "
        "one frame and of the spectrogram, as a PNG.",
    ),
    Subcommand(
        "convert",
        add_convert_options,
        help="convert an original CAV-MAE .pth checkpoint into a save_pretrained directory",
        description="Convert an original CAV-MAE .pth checkpoint (YuanGongND/cav-mae) into a save_pretrained "
        "directory with its config, feature extractor and model card; prints a summary (--json: as JSON).",
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# Parser and entry point
# ----------------------------------------------------------------------------------------------------------------
def _add_common_options(parser, default):
    parser.add_argument("--quiet", "-q", action="store_true", default=default, help="no progress bars")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="CAV-MAE (Contrastive Audio-Visual Masked Autoencoder): classify, embed, retrieve and reconstruct "
        "videos, convert original checkpoints.",
        epilog="Exit codes: 0 ok, 2 usage or input error, 1 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common_options(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, default=argparse.SUPPRESS)  # also accepted after the command
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    for command in SUBCOMMANDS:
        subparser = commands.add_parser(
            command.name, parents=[common], help=command.help, description=command.description
        )
        command.add_options(subparser)
    # the demo parses its own options (`cavmae demo --help`), once its module is imported
    commands.add_parser("demo", add_help=False, help="interactive demo (see `cavmae demo --help`)")
    return parser


def parse_arguments(argv=None) -> argparse.Namespace | int:
    """The parsed command line, or the exit code when argparse has answered already (`--help`, `--version`: 0;
    a usage error: 2). Arguments after `demo` are left in `passthrough` for the demo's own parser."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if rest and args.command != "demo":
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return EXIT_USAGE
    args.passthrough = rest
    return args


def main(argv=None) -> int:
    """Entry point of the `cavmae` console script; returns the exit code."""
    args = parse_arguments(argv)
    if isinstance(args, int):
        return args
    from cavmae_hf import cli  # the package: torch, Transformers and the registrations

    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
