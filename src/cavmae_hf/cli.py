"""
The commands of the `cavmae` command line: `classify`, `embed`, `retrieve`, `reconstruct`, `convert`, `demo`.
Their arguments are parsed by `cavmae_hf_cli` (standard library only, so that `--help` answers at once), which
then calls [`run`]; [`main`] does both.

Exit codes: 0 success, 2 a `CavMaeError` (bad usage or input: unreadable media, wrong shapes, missing files, wrong
checkpoint kinds), 1 anything else (an internal error). Errors print one line to stderr; `--debug` shows the
traceback instead.
"""

import argparse
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import cavmae_hf_cli

from .configuration_cav_mae import CavMaeError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = cavmae_hf_cli.EXIT_OK, cavmae_hf_cli.EXIT_INTERNAL, cavmae_hf_cli.EXIT_USAGE


class UsageError(CavMaeError):
    """The command line asks for something that cannot be done (bad combination of options, missing files)."""


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------
def _progress(iterable, total: int, description: str, args):
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=description, unit="clip", disable=True if args.quiet else None, file=sys.stderr
    )


def _check_files(paths) -> list[str]:
    """Every input before any model is loaded: the one file check of `cavmae_hf.media`."""
    from .media import check_file

    return [str(check_file(path)) for path in paths]


def _check_output_file(path: Path):
    """Before any work: `--output` names a file in an existing folder (else writing it would fail at the end)."""
    if path.is_dir():
        raise UsageError(f"--output {path} is a directory; give a file name.")
    if not path.parent.is_dir():
        raise UsageError(f"--output {path}: the directory {path.parent} does not exist.")


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
    _check_hub_model(model)


def _check_hub_model(model: str):
    """A Hub id must name a CAV-MAE model that Transformers can fetch (its OSError - not found, offline, gated - is
    the user's input, not a bug)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except OSError as error:
        raise UsageError(
            f"Model directory not found, and {model!r} could not be loaded from the Hugging Face Hub: "
            f"{_one_line(error)}"
        ) from None
    if config.model_type != "cav_mae":
        raise UsageError(f"{model} is a model of type {config.model_type!r}, not a CAV-MAE checkpoint.")


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


def _video_options(args) -> dict:
    """The decoding options given on the command line (`--frame-selection`, ...); the rest keep their defaults."""
    names = ("frame_selection", "frame_transform", "audio_precision")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


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
        (video for video in videos),
        batch_size=args.batch_size,
        num_frames=args.num_frames,
        top_k=args.top_k,
        **_video_options(args),
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
    from .retrieval import RetrievalIndex, index_metadata

    if args.output is None and not args.json:
        raise UsageError("Give --output FILE.safetensors (an index for `cavmae retrieve`), --json, or both.")
    if args.output is not None:
        from .retrieval import check_index_path

        check_index_path(args.output)  # before the clips are embedded
    sources = _check_files(args.inputs)
    _check_counts(args)
    extractor = _pipeline(FEATURE_EXTRACTION_TASK, args)
    outputs = extractor(
        (source for source in sources),
        batch_size=args.batch_size,
        num_frames=args.num_frames,
        return_tensors=True,
        **_video_options(args),
    )
    clips = list(_progress(outputs, len(sources), "embedding", args))
    summary = {"clips": len(clips)}
    if args.output is not None:
        metadata = index_metadata(args.model, args.num_frames, _video_options(args))
        index = RetrievalIndex.from_clip_embeddings(sources, clips, metadata=metadata)
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
            video_options=_video_options(args),
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
    _check_output_file(args.output)
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


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------
def run_convert(args) -> int:
    from .convert_original_checkpoint import convert_from_arguments

    summary = convert_from_arguments(args)
    lines = [
        f"wrote {summary['model_class']} ({summary['parameters']:,} parameters) to {summary['output']}; "
        f"{summary['unused_original_keys']} unused original key(s) left out"
    ]
    if args.partial:
        lines.append(f"kept their initialisation: {', '.join(summary['initialized_keys']) or 'none'}")
        lines.append(f"original keys left out: {', '.join(summary['ignored_original_keys']) or 'none'}")
    return _report(args, summary, lines)


# ----------------------------------------------------------------------------------------------------------------
# demo: delegated
# ----------------------------------------------------------------------------------------------------------------
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
# Running a parsed command line
# ----------------------------------------------------------------------------------------------------------------
def _handler(command: str):
    """The function of a subcommand (looked up when called, so that a replaced one is used)."""
    handlers = {
        "classify": run_classify,
        "embed": run_embed,
        "retrieve": run_retrieve,
        "reconstruct": run_reconstruct,
        "convert": run_convert,
        "demo": run_demo,
    }
    return handlers[command]


def run(args) -> int:
    """Run the command that `cavmae_hf_cli.parse_arguments` parsed; returns the exit code. A `CavMaeError` is one
    `error:` line and exit code 2; anything else is an internal error: one line and exit code 1 (with `--debug`,
    the traceback)."""
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return _handler(args.command)(args)
    except SystemExit as exit_:  # the demo's own parser exiting
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CavMaeError as error:
        if args.debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 - the last resort of a command line
        if args.debug:
            raise
        print(
            f"internal error: {type(error).__name__}: {_one_line(error)} (a bug: rerun with --debug for the "
            "traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def main(argv=None) -> int:
    """The `cavmae` command line on `argv` (default: `sys.argv[1:]`); returns the exit code."""
    return cavmae_hf_cli.main(argv)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
