"""`mobilevlm`: the library from a shell. `ask` answers one question, `eval` scores a question file, `build` prepares
artifacts (GGUF, ONNX, engines), `bench` times the pipeline against the plain baselines, `demo` and `train` run and
make the shipped demo model."""

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING

from mobilevlm_ros.choices import (
    AMX_SETTINGS,
    AUTO,
    IMAGE_MODES,
    LANGUAGE_BACKENDS,
    MMPROJ_TYPES,
    PRECISIONS,
    QUANTS,
    VISION_BACKENDS,
    vision_precision,
)
from mobilevlm_ros.demo.recipe import Recipe
from mobilevlm_ros.errors import ConfigError, MobileVLMError, PromptError

if TYPE_CHECKING:
    from mobilevlm_ros.runtime.vlm import MobileVLM

logger = logging.getLogger("mobilevlm")

# `mobilevlm build --vision`: the artifact each vision backend runs.
VISION_ARTIFACTS = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}


def _ask(args: argparse.Namespace) -> int:
    from mobilevlm_ros.model.preprocess import load_image_file
    from mobilevlm_ros.model.prompt import check_question

    check_question(args.question)  # an empty question or a bad backend choice fails before anything is read
    vision_precision(args.vision, args.precision)
    image = load_image_file(args.image)
    vlm = _load_model(args)
    answer = vlm.ask(image, args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                     mode="crop" if args.roi else args.mode, roi=tuple(args.roi) if args.roi else None)
    sys.stdout.write(answer + "\n")
    return 0


def _build(args: argparse.Namespace) -> int:
    if not (args.llm or args.vision or args.mmproj):
        raise PromptError("nothing to build: give --llm gguf, --vision onnx|tensorrt and/or --mmproj")
    if args.engine_path and (bool(args.vision) + args.mmproj != 1 or args.llm):
        raise ConfigError("--engine-path names one file: give it with one of --vision or --mmproj (and not --llm)")
    policy = "always" if args.rebuild else "if_missing"
    artifacts = []
    if args.llm:
        from mobilevlm_ros.export.gguf import llm_gguf_artifact

        artifacts += [llm_gguf_artifact(args.model, quant, args.engines_dir, policy) for quant in args.quant]
    if args.mmproj:
        from mobilevlm_ros.export.mmproj import mmproj_artifact

        artifacts.append(mmproj_artifact(args.model, args.mmproj_type, args.engines_dir, policy, path=args.engine_path))
    if args.vision:
        from pathlib import Path

        engines = Path(args.engines_dir) if args.engines_dir else None
        engine_path = Path(args.engine_path) if args.engine_path else None
        precision = vision_precision(VISION_ARTIFACTS[args.vision], args.precision)
        if args.calibration_dir and (args.vision, precision) != ("tensorrt", "int8"):
            raise ConfigError("--calibration-dir is for --vision tensorrt --precision int8 (ONNX int8 needs no calibration)")
        if args.vision == "onnx":
            from mobilevlm_ros.export.onnx import onnx_artifact

            artifacts.append(onnx_artifact(None, Path(args.model), engines, policy, precision=precision, path=engine_path))
        else:
            from mobilevlm_ros.export.tensorrt import calibration_batches, engine_artifact
            from mobilevlm_ros.model.checkpoint import load_checkpoint
            from mobilevlm_ros.tensorrt_support import tensorrt_unavailable_reason

            if precision == "int8" and not args.calibration_dir:
                raise ConfigError("a TensorRT int8 engine needs --calibration-dir DIR (sample camera images)")
            if reason := tensorrt_unavailable_reason():
                raise ConfigError(f"cannot build a TensorRT engine here: {reason}")
            calibration = []
            if args.calibration_dir:  # the image processor only: no weights are loaded for it
                processor = load_checkpoint(args.model, with_language_model=False, with_vision=False).image_processor
                calibration = calibration_batches(Path(args.calibration_dir), processor)
            # The graph is exported from the checkpoint's vision weights on the CPU; the GPU holds only TensorRT's build.
            artifacts.append(engine_artifact(None, Path(args.model), precision, engines, policy, max_batch=args.max_batch,
                                             workspace_bytes=args.workspace_mb << 20, calibration=calibration, path=engine_path))
    rows = []
    for artifact in artifacts:
        manifest = artifact.manifest
        details = manifest.get("details", {})
        detail = (", ".join(f"{k} {v}" for k, v in details.get("tensor_types", {}).items())
                  or ", ".join(f"{k} {v}" for k, v in details.items()))
        rows.append((str(artifact.path), f"{manifest['size'] / 1e6:.1f} MB", f"{manifest['build_seconds']:.1f} s",
                     "built" if artifact.built else "cached", detail))
    header = ("artifact", "size", "build time", "status", "details")
    sys.stdout.write(_table(header, rows))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mobilevlm_ros.bench import BenchOptions
    from mobilevlm_ros.bench.report import markdown, to_json
    from mobilevlm_ros.bench.run import run_bench

    options = BenchOptions(
        size=args.size, model=args.model, language=args.language, quant=args.quant, vs=tuple(args.vs), new_tokens=args.new_tokens,
        repeats=args.repeats, device=args.device, vision=args.vision, vision_dtype=args.vision_dtype, engines_dir=args.engines_dir,
        tiles=args.tiles, vision_precision=args.vision_precision, llama_amx=AMX_SETTINGS[args.llama_amx],
        **({"work_dir": args.work_dir} if args.work_dir else {}),
    )
    if options.new_tokens < 2 or options.repeats < 1:
        raise PromptError("--new-tokens must be at least 2 (decode speed needs two tokens) and --repeats at least 1")
    if options.tiles < 0:
        raise PromptError(f"--tiles must be 0 (off) or a tile budget, got {options.tiles}")
    if args.plot:  # before the minutes of the bench, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install matplotlib (or the package's 'bench' extra)") from None
    result = run_bench(options)
    table = markdown(result)
    sys.stdout.write(table)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(to_json(result), encoding="utf-8")
    if args.plot:
        from mobilevlm_ros.bench.plot import plot

        plot(result, args.plot)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from mobilevlm_ros.doctor import checks

    results = checks()
    sys.stdout.write(_table(("component", "usable", "detail"), [(c.component, "yes" if c.usable else "no", c.detail) for c in results]))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mobilevlm_ros.evaluate import evaluate, read_questions

    questions = read_questions(args.data)
    report, answers = evaluate(_load_model(args), questions, args.images, args.max_new_tokens, progress=sys.stderr.isatty())
    rows = [(kind, str(row["questions"]), f"{row['accuracy']:.3f}") for kind, row in report["by_kind"].items()]
    text = _table(("kind", "questions", "accuracy"), rows + [("all", str(report["questions"]), f"{report['accuracy']:.3f}")])
    if yes_no := report.get("yes_no"):
        names = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        text += "\n" + _table(("yes/no questions",) + names, [(str(yes_no["questions"]),) + tuple(f"{yes_no[n]:.3f}" for n in names)])
    sys.stdout.write(text)
    if args.json:
        answered = [{"image": q.image, "question": q.question, "answer": q.answer, "kind": q.kind, "prediction": a}
                    for q, a in zip(questions, answers, strict=True)]
        Path(args.json).write_text(json.dumps({"report": report, "answers": answered}, indent=2) + "\n", encoding="utf-8")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mobilevlm_ros.demo import DEMO_CHECKPOINT
    from mobilevlm_ros.demo.showcase import run_demo

    results = run_demo(args.model or DEMO_CHECKPOINT, args.out, args.per_kind)
    rows = [(r.sample.kind, r.sample.question, r.answer, r.sample.answer, "yes" if r.correct else "NO", f"{r.latency_s * 1e3:.0f}")
            for r in results]
    sys.stdout.write(_table(("kind", "question", "answer", "expected", "right", "latency (ms)"), rows))
    sys.stdout.write(f"\n{sum(r.correct for r in results)}/{len(results)} right; frames with answers in {args.out}/\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mobilevlm_ros.demo import DEMO_CHECKPOINT
    from mobilevlm_ros.demo.train import train

    recipe = Recipe(**{knob.name: getattr(args, knob.name) for knob in fields(Recipe)})
    out = train(args.out or DEMO_CHECKPOINT, recipe, device=args.device)
    sys.stdout.write(f"wrote {out}\n")
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint to load and on which backends."""
    parser.add_argument("--model", default=None, help="MobileVLM checkpoint directory (default: the shipped demo model)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--language", default="torch", choices=LANGUAGE_BACKENDS, help="language backend (default torch)")
    parser.add_argument("--quant", default="q4_k_s", choices=QUANTS, help="GGUF type for --language llamacpp (default q4_k_s)")
    parser.add_argument("--vision", default="torch", choices=VISION_BACKENDS, help="vision backend (default torch)")
    _add_precision_argument(parser, "--precision")
    parser.add_argument("--engines-dir", default=None, help="artifact cache (default: the package's engines/)")
    _add_llama_amx_argument(parser)


def _add_precision_argument(parser: argparse.ArgumentParser, flag: str) -> None:
    parser.add_argument(flag, default=AUTO, choices=(AUTO, *PRECISIONS),
                        help="vision precision: auto (default) = TensorRT fp16, onnxruntime fp32, ggml fp16; TensorRT also fp32 and "
                             "int8, onnxruntime int8, ggml fp32; torch runs the model's dtype")


def _add_llama_amx_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llama-amx", default="auto", choices=list(AMX_SETTINGS),
                        help="llama.cpp's AMX weight buffers: auto (default) uses them only on CPUs without AMX, since its AMX "
                             "matmul crashes on some Intel CPUs; on for builds where it works")


def _load_model(args: argparse.Namespace) -> "MobileVLM":
    from mobilevlm_ros.demo import DEMO_CHECKPOINT
    from mobilevlm_ros.runtime.vlm import MobileVLM

    return MobileVLM.from_pretrained(args.model or DEMO_CHECKPOINT, device=args.device, language=args.language, quant=args.quant,
                                     engines_dir=args.engines_dir, vision=args.vision, vision_precision=args.precision,
                                     llama_amx=AMX_SETTINGS[args.llama_amx])


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilevlm", description="MobileVLM on the edge: ask a camera image questions.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity (stderr)")
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="answer one question about one image")
    ask.add_argument("question", help="the question, e.g. 'What is on the table?'")
    _add_model_arguments(ask)
    ask.add_argument("--image", required=True, help="image file (any format PIL reads)")
    ask.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit in tokens")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ask.add_argument("--seed", type=int, default=None, help="sampling seed")
    ask.add_argument("--mode", default="overview", choices=IMAGE_MODES,
                     help="how the model sees the image: overview (default, as upstream), tiles, per_tile, crop (needs --roi)")
    ask.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "WIDTH", "HEIGHT"), default=None,
                     help="region of interest in pixels of the image, seen at full resolution (implies --mode crop)")
    ask.set_defaults(run=_ask)

    evaluate = commands.add_parser("eval", help="exact-match accuracy (and POPE yes/no metrics) on a question/answer JSON-lines file")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True, help='JSON lines: {"image": ..., "question": ..., "answer": ..., "kind": ...}')
    evaluate.add_argument("--images", required=True, help="directory the data's image names are relative to")
    evaluate.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit in tokens (default 16)")
    evaluate.add_argument("--json", default=None, help="also write the report and every answer as JSON to this file")
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="the shipped demo model answering questions about synthetic scenes (no ROS)")
    demo.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    demo.add_argument("--out", default="mobilevlm_demo", help="where the frames with question and answer drawn go")
    demo.add_argument("--per-kind", type=int, default=2, help="questions of each kind (default 2)")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train the tiny demo MobileVLM on the synthetic world (MobileVLM's recipe)")
    train.add_argument("--out", default=None, help="checkpoint directory to write (default: the package's demo checkpoint)")
    train.add_argument("--seed", type=int, default=0, help="seed of the world and the weights (default 0)")
    train.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default cpu: the shipped checkpoint's)")
    for knob in fields(Recipe):
        if knob.name != "seed":
            train.add_argument(f"--{knob.name.replace('_', '-')}", type=type(knob.default), default=knob.default,
                               help=f"(default {knob.default})")
    train.set_defaults(run=_train)

    build = commands.add_parser(
        "build", help="build artifacts (LLM as GGUF, vision as ONNX / TensorRT engine / mmproj GGUF) into the engines directory"
    )
    build.add_argument("--model", required=True, help="MobileVLM checkpoint directory")
    build.add_argument("--llm", choices=["gguf"], help="what to build for the language model")
    build.add_argument("--vision", choices=list(VISION_ARTIFACTS), help="what to build for the vision tower + projector")
    build.add_argument("--mmproj", action="store_true",
                       help="also write the vision tower + projector as an mmproj GGUF for llama.cpp's mtmd (the ggml vision backend)")
    build.add_argument("--mmproj-type", default="f16", choices=MMPROJ_TYPES, help="mmproj tensor type (default f16)")
    _add_precision_argument(build, "--precision")
    build.add_argument("--calibration-dir", default=None, help="TensorRT int8: a directory of sample images (jpg, png) to calibrate on")
    build.add_argument("--max-batch", type=int, default=8, help="TensorRT profile: largest batch of tiles (default 8)")
    build.add_argument("--workspace-mb", type=int, default=1024,
                       help="TensorRT builder workspace limit (default 1024 MB, fits an 8 GB Orin Nano)")
    build.add_argument("--quant", nargs="+", default=["q4_k_s"], choices=QUANTS, help="GGUF type(s) (default q4_k_s)")
    build.add_argument("--engines-dir", default=None, help="artifact cache (default: the package's engines/)")
    build.add_argument("--engine-path", default=None,
                       help="write the --vision or --mmproj artifact to this file (its manifest beside it) instead of the "
                            "artifact cache's name; the node's engine_path and from_pretrained(engine_path=) read it there")
    build.add_argument("--rebuild", action="store_true", help="rebuild even a valid cached artifact (engine build policy always)")
    build.set_defaults(run=_build)

    bench = commands.add_parser("bench", help="time image -> answer against the plain baselines; prints a Markdown table")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--size", default="1.7b", choices=["1.7b", "3b", "tiny"],
                        help="random-weight model of this architecture (default 1.7b)")
    source.add_argument("--model", default=None, help="a checkpoint directory instead of a random model")
    bench.add_argument("--language", default="llamacpp", choices=LANGUAGE_BACKENDS, help="our language backend (default llamacpp)")
    bench.add_argument("--quant", default="q4_k_s", choices=QUANTS, help="GGUF type (default q4_k_s)")
    bench.add_argument("--vision", default="torch", choices=VISION_BACKENDS,
                       help="our vision backend; other than torch, torch eager is timed beside it (default torch)")
    _add_precision_argument(bench, "--vision-precision")
    bench.add_argument("--vs", action="append", default=[], choices=["reference", "llamacpp-plain", "llamacpp-mtmd"],
                       help="baseline to time too (repeatable); llamacpp-mtmd: llama.cpp's own image pipeline (mtmd)")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens per answer, EOS suppressed (default 64)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline after a warm-up; medians reported (default 3)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--vision-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype of our vision tower and projector (with --language torch: of the whole model)")
    bench.add_argument("--work-dir", default=None,
                       help="where random checkpoints are written and reused (default ~/.cache/mobilevlm_ros/bench)")
    bench.add_argument("--engines-dir", default=None, help="artifact cache (default: <work-dir>/engines, or the package's for --model)")
    bench.add_argument("--tiles", type=int, default=0,
                       help="also time tiles mode with this tile budget on a 1920x1080 frame: vision for overview + tiles, "
                            "prompt tokens, TTFT")
    _add_llama_amx_argument(bench)
    bench.add_argument("--json", default=None, help="also write the results as JSON to this file")
    bench.add_argument("--markdown", default=None, help="also write the Markdown table to this file")
    bench.add_argument("--plot", default=None, metavar="FILE.png",
                       help="also draw stage times per pipeline and decode tok/s as a PNG (needs matplotlib)")
    bench.set_defaults(run=_bench)

    doctor = commands.add_parser("doctor", help="which backends can run here, and why not")
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except MobileVLMError as error:
        sys.stderr.write(f"mobilevlm {args.command}: error: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
