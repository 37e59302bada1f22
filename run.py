#!/usr/bin/env python3
"""Generate text with a Grok-1-architecture model, or plan and describe one.

    python run.py                                   # the small model shipped in checkpoints/small
    python run.py --prompt "Once upon a time" --temperature 0 --max-new-tokens 40
    python run.py --checkpoint checkpoints/grok-1 --preset grok-1 \\
        --tokenizer checkpoints/grok-1/tokenizer.model --mesh 1x8          # the real release

User mistakes (missing files, a tokenizer that does not belong to the checkpoint, a mesh that does
not match the devices, bad sampling values, flags that do nothing together) end with a one-line
message and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import stat
import sys
import time
from typing import Any, Iterator, Optional, Sequence

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CHECKPOINT = os.path.join(REPO, "checkpoints", "small")
DEFAULT_PROMPT = "The function returns"
RELEASE_HINT = ("put the release's ckpt-0/ folder (from the official torrent or the model hub "
                "repository xai-org/grok-1) in checkpoints/grok-1/ and run with "
                "--checkpoint checkpoints/grok-1 --preset grok-1")
EXIT_USAGE = 2
TO_CONTEXT_END = "max"       # --max-new-tokens max: generate up to the end of the context
STDIN_PROMPT = "-"           # --prompt -: the prompt is standard input
SERVER_PACKAGES = ("starlette", "uvicorn")   # what --serve needs beyond the library (extra `serve`)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless it has no default or already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return help_text
        return f"{help_text} (default: %(default)s)"


class UserError(Exception):
    """A mistake in the command line or the files it names: reported in one line, no traceback."""


# ---- command line -----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", description=__doc__.split("\n\n")[0],
        epilog="Research and planning: --plan (memory and sharding plan of a preset over a mesh), "
               "--describe (parameter table), --trace (router and attention statistics of a prompt).",
        formatter_class=HelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", default=None, metavar="DIR",
                       help="folder holding ckpt-0/ (and config.json unless --preset is given); "
                            "default: the small model shipped in checkpoints/small")
    model.add_argument("--tokenizer", default=None, metavar="FILE",
                       help="SentencePiece model; default: CHECKPOINT/tokenizer.model")
    model.add_argument("--preset", default=None, metavar="NAME",
                       help="use a built-in config (e.g. grok-1) instead of CHECKPOINT/config.json")
    model.add_argument("--mesh", default=None, metavar="SPEC",
                       help="device mesh DATAxMODEL (e.g. 1x8), DATAxEXPERTxMODEL or axis=size,...; "
                            "its sizes must multiply to the number of devices; default: one device")
    model.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                       help="run on N CPU devices of this machine, to try a --mesh without accelerators "
                            "(like XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    model.add_argument("--compilation-cache", default=None, metavar="DIR",
                       help="folder of JAX's persistent compilation cache, so that a second run compiles "
                            "nothing (default: $GROK1_COMPILATION_CACHE, else ~/.cache/grok1/jax)")
    model.add_argument("--no-compilation-cache", action="store_true",
                       help="compile everything afresh and store nothing")
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="compute dtype; auto = what grok1.load picks: float32 on CPU, bfloat16 on "
                            "GPU/TPU (--plan: bfloat16, as on the accelerators it plans for)")

    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help=f"prompt to continue, or {STDIN_PROMPT}: read it from standard input; repeat "
                          f"for several (default: {DEFAULT_PROMPT!r})")
    gen.add_argument("--max-new-tokens", type=max_new_tokens, default=100, metavar="N",
                     help=f"tokens to generate per prompt, or {TO_CONTEXT_END!r}: up to the end of the "
                          f"context; a prompt longer than the context loses its oldest tokens to make room "
                          f"for them, and more than the room left is lowered to it (with a note)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]; 1 = off")
    gen.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 = off")
    # Defaults chosen by measurement on the shipped model (docs/TRAINING.md, "Default sampling").
    gen.add_argument("--frequency-penalty", type=float, default=0.2,
                     help="in [-2, 2]: lower each generated token's logit by this times its count so far")
    gen.add_argument("--presence-penalty", type=float, default=0.0,
                     help="in [-2, 2]: lower the logit of every token generated so far by this")
    gen.add_argument("--seed", type=int, default=None,
                     help="random seed of the sampler, for repeatable samples; default: fresh "
                          "randomness for every prompt")
    gen.add_argument("--no-stream", action="store_true",
                     help="print each completion when done (prompts run as one batch) instead of "
                          "token by token")
    gen.add_argument("--interactive", action="store_true",
                     help="read prompts from standard input, one per line, until EOF or an empty line")
    gen.add_argument("--quiet", action="store_true",
                     help="no progress bar, no prompt echo, no tokens/s report: only the generated text")

    server = p.add_argument_group("server")
    server.add_argument("--serve", action="store_true",
                        help="serve the model over HTTP with the OpenAI API (grok1/server/) until "
                             "Ctrl-C or SIGTERM")
    server.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on")
    server.add_argument("--port", type=int, default=8000, help="--serve: port to listen on (0: any free one)")
    server.add_argument("--api-key", default=None, metavar="KEY",
                        help="--serve: requests to /v1/* need the header 'Authorization: Bearer KEY' (401 "
                             "without it); default: $GROK1_API_KEY if set, which keeps the key out of ps")
    server.add_argument("--metrics-need-key", action="store_true",
                        help="--serve: /metrics needs the API key too (by default only /v1/* does; "
                             "/health never)")
    research = p.add_argument_group("research and planning")
    research.add_argument("--plan", action="store_true",
                          help="print the memory and sharding plan of --preset (or the checkpoint's "
                               "config) over --mesh, using forced CPU devices; loads no weights")
    research.add_argument("--batch", type=int, default=1, help="--plan: batch size to plan for")
    research.add_argument("--context", type=int, default=None,
                          help="--plan: context length to plan for; --perplexity: tokens per window "
                               "(default: the config's sequence_len)")
    research.add_argument("--perplexity", default=None, metavar="FILE",
                          help="perplexity and bits per byte of a text file (- : standard input) in "
                               "windows of --context, cut as llama.cpp's llama-perplexity cuts them")
    research.add_argument("--stride", type=int, default=None, metavar="N",
                          help="--perplexity: slide the window N tokens at a time instead (every token "
                               "scored once, with at least context - N tokens before it)")
    research.add_argument("--describe", action="store_true",
                          help="print the parameter table of --preset or the checkpoint's config")
    research.add_argument("--trace", action="store_true",
                          help="run --prompt once and print router and attention statistics per layer")
    research.add_argument("--plot", default=None, metavar="IMAGE",
                          help="--trace: also plot the expert load to this image, in the format its "
                               "extension names (.png, .svg, .pdf, ...; needs matplotlib)")
    research.add_argument("--json", action="store_true",
                          help="machine-readable output for --plan, --describe, --perplexity, generation "
                               "(a list of completions, as --no-stream runs them) and --interactive (one "
                               "completion per line)")
    return p


def max_new_tokens(text: str) -> Optional[int]:
    """--max-new-tokens: an integer, or TO_CONTEXT_END (None: up to the end of the context)."""
    if text == TO_CONTEXT_END:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or {TO_CONTEXT_END!r} (up to the end of the context), got {text!r}") from None


# What each flag is for: the mode flags (--plan, --describe, --trace, --interactive, --serve, or none of
# them: generation) a flag has an effect in. Flags not listed work in every mode.
MODES = ("plan", "describe", "trace", "interactive", "serve", "perplexity", "generate")
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "frequency_penalty",
                  "presence_penalty", "seed")
FLAG_MODES: dict[str, tuple[str, ...]] = {
    "tokenizer": ("trace", "interactive", "serve", "perplexity", "generate"),
    "dtype": ("plan", "trace", "interactive", "serve", "perplexity", "generate"),
    "prompt": ("trace", "generate"),
    **{name: ("interactive", "generate") for name in SAMPLING_FLAGS},
    "no_stream": ("generate",),
    "quiet": ("trace", "interactive", "serve", "perplexity", "generate"),
    "host": ("serve",),
    "port": ("serve",),
    "api_key": ("serve",),
    "metrics_need_key": ("serve",),
    "batch": ("plan",),
    "context": ("plan", "perplexity"),
    "stride": ("perplexity",),
    "plot": ("trace",),
    "json": ("plan", "describe", "interactive", "perplexity", "generate"),
    "cpu_devices": ("plan", "trace", "interactive", "serve", "perplexity", "generate"),
    # The plan compiles afresh on purpose: it reports compile times.
    "compilation_cache": ("trace", "interactive", "serve", "perplexity", "generate"),
    "no_compilation_cache": ("trace", "interactive", "serve", "perplexity", "generate"),
}


def given_flags(argv: Optional[Sequence[str]]) -> set[str]:
    """The destinations of the flags the command line names (not those left at their default)."""
    explicit = parser()
    for action in explicit._actions:
        action.default = argparse.SUPPRESS
    return set(vars(explicit.parse_args(argv)))


def check_flags_go_together(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse a flag that would be ignored: two modes at once, or a flag its mode does not use."""
    option = {a.dest: a.option_strings[0] for a in parser()._actions if a.option_strings}
    modes = [m for m in MODES[:-1] if getattr(args, m)]
    if len(modes) > 1:
        raise UserError(f"{option[modes[0]]} and {option[modes[1]]} do not go together: run one at a time")
    mode = modes[0] if modes else "generate"
    for name in sorted(given & set(FLAG_MODES), key=list(option).index):
        if mode not in FLAG_MODES[name]:
            uses = ["generation" if m == "generate" else option[m] for m in FLAG_MODES[name]]
            doing = "generation" if mode == "generate" else option[mode]
            raise UserError(f"{option[name]} has no effect with {doing}; it goes with {' or '.join(uses)}")
    if mode in ("plan", "describe") and {"checkpoint", "preset"} <= given:
        raise UserError(f"--checkpoint has no effect with {option[mode]} --preset: the preset's config "
                        f"is used; drop one of them")


def check_plot_path(path: str) -> None:
    """--plot's folder exists and its extension names an image format, checked before the trace."""
    from grok1.inspect import plot_format
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--plot: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--plot: folder {folder} is not writable")
    try:
        plot_format(path)
    except (ValueError, ImportError) as e:
        raise UserError(f"--plot: {e}") from None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    check_flags_go_together(args, given_flags(argv))
    args.checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if args.plan and args.mesh is None:
        raise UserError("--plan needs --mesh (e.g. --mesh 1x8)")
    if args.interactive and args.prompt:
        raise UserError("--interactive reads prompts from standard input; drop --prompt")
    if args.prompt and not all(args.prompt):
        raise UserError("--prompt is empty: give the text to continue")
    if (args.prompt or []).count(STDIN_PROMPT) > 1:
        raise UserError(f"--prompt {STDIN_PROMPT} reads standard input, which holds one prompt: give "
                        f"--prompt {STDIN_PROMPT} once")
    if args.plot:
        check_plot_path(args.plot)
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.context is not None and args.context < 1:
        raise UserError(f"--context must be >= 1, got {args.context}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise UserError(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    if args.no_compilation_cache and args.compilation_cache:
        raise UserError("--compilation-cache and --no-compilation-cache contradict each other; give one")
    return args


def mesh_shape(spec: str) -> dict[str, int]:
    """The mesh axis sizes of --mesh. Importing jax here is fine: XLA_FLAGS is only read when
    the first backend starts."""
    from grok1.mesh import parse_mesh_spec
    try:
        return parse_mesh_spec(spec)
    except ValueError as e:
        raise UserError(f"--mesh: {e}") from None


def force_cpu_devices(spec: str, count: Optional[int] = None) -> None:
    """--plan lays out abstract CPU devices: ask XLA for as many as the mesh has (or --cpu-devices),
    before jax starts."""
    from grok1.runtime.devices import force_cpu_devices as force
    force(count or math.prod(mesh_shape(spec).values()))


def start_jax(args: argparse.Namespace) -> None:
    """What must happen before JAX's first computation: --cpu-devices, the compilation cache, and
    joining the cluster when a launcher or scheduler started this as one of several processes
    (then process 0 alone prints; see grok1/distributed.py)."""
    from grok1 import distributed
    from grok1.runtime import compile_cache
    from grok1.runtime.devices import force_cpu_devices as force

    if args.cpu_devices is not None:
        force(args.cpu_devices)
    if not args.no_compilation_cache:
        try:
            compile_cache.enable(args.compilation_cache)
        except OSError as e:
            raise UserError(f"--compilation-cache: cannot use {e.filename}: {e.strerror}") from None
    try:
        distributed.join_cluster()
    except ValueError as e:
        raise UserError(str(e)) from None


def check_mesh_covers_the_cluster(spec: Optional[str]) -> None:
    """Several processes only make sense as one mesh over all their devices."""
    import jax
    if jax.process_count() > 1 and spec is None:
        raise UserError(f"this run has {jax.process_count()} processes and {jax.device_count()} devices: "
                        f"pass --mesh over all of them (e.g. --mesh 1x{jax.device_count()})")


def listen(args: argparse.Namespace):
    """--serve's listening socket, opened before the model loads so a busy port fails at once;
    None on processes other than 0 of a cluster, which follow process 0's engine instead."""
    from grok1.runtime.processes import is_main_process
    server = server_module()
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must lie in [0, 65535], got {args.port}")
    # A bad key fails before the model loads.
    if args.metrics_need_key and not (args.api_key or os.environ.get(server.API_KEY_ENV)):
        raise UserError(f"--metrics-need-key needs --api-key KEY (or {server.API_KEY_ENV} in the environment)")
    try:
        server.api_key_from(args.api_key)
    except ValueError as e:
        raise UserError(str(e).replace("api_key must", "--api-key must", 1)) from None
    if not is_main_process():
        return None
    try:
        return server.bind(args.host, args.port)
    except OSError as e:
        raise UserError(f"--serve: cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None


def server_module() -> Any:
    """grok1.server, or a UserError saying what to install when the `serve` extra is missing
    (`pip install -e .` alone brings the library's dependencies, not the server's)."""
    try:
        import grok1.server as server
        import uvicorn  # noqa: F401  (grok1.server imports it only when serving starts)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in SERVER_PACKAGES:
            raise
        raise UserError(f"--serve needs {e.name}, which is not installed: python3 -m pip install -e "
                        f"\".[serve]\" in {REPO} (or python3 -m pip install -r requirements.txt)") from None
    return server


# ---- config, tokenizer, model -----------------------------------------------------------------

def model_config(args: argparse.Namespace):
    """The ModelConfig of --preset, else of CHECKPOINT/config.json."""
    from grok1.checkpoint import CheckpointError, read_config
    from grok1.config import PRESETS, ConfigError

    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UserError(f"unknown --preset {args.preset!r}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[args.preset]
    check_checkpoint_folder(args.checkpoint)
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise UserError(f"{args.checkpoint} has no config.json: pass the config.json that came with "
                        f"the checkpoint, or a --preset (grok-1 for the release)")
    try:
        return read_config(args.checkpoint)
    except (ConfigError, CheckpointError) as e:  # they name the file
        raise UserError(str(e)) from None


def looks_like_release(path: str, preset: Optional[str] = None) -> bool:
    """Whether the user is after the Grok-1 release (so the hint on where to put it helps)."""
    return preset == "grok-1" or os.path.basename(os.path.normpath(path)) == "grok-1"


def check_checkpoint_folder(path: str) -> None:
    """A one-line error when --checkpoint is not a checkpoint folder, saying what it is instead."""
    from grok1.checkpoint import CKPT_DIR, CheckpointError, checkpoint_dir, is_ckpt_folder
    try:
        checkpoint_dir(path)
    except CheckpointError as e:
        hint = f"; {RELEASE_HINT}" if looks_like_release(path) else ""
        raise UserError(f"--checkpoint: {e}{hint}") from None
    if is_ckpt_folder(path):  # config.json and tokenizer.model lie beside it, in the parent
        parent = os.path.dirname(os.path.normpath(path)) or "."
        raise UserError(f"--checkpoint: {path} is the {CKPT_DIR}/ folder itself; point at the folder "
                        f"that holds it: --checkpoint {parent}")


def load_tokenizer(args: argparse.Namespace, config):
    """(path, Tokenizer), checked to have exactly the checkpoint's vocabulary size."""
    from grok1.tokenizer import Tokenizer

    path = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.model")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found: {path} (give the tokenizer.model that belongs to the "
                        f"checkpoint with --tokenizer)")
    try:
        tokenizer = Tokenizer(path)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"tokenizer {path} has {tokenizer.vocab_size} pieces but the checkpoint's "
                        f"vocab_size is {config.vocab_size}: they do not belong together "
                        f"(pass the tokenizer.model that came with the checkpoint)")
    return path, tokenizer


def make_mesh(spec: Optional[str]):
    if spec is None:
        return None
    from grok1.mesh import make_mesh as build
    try:
        return build(spec)
    except ValueError as e:
        raise UserError(f"--mesh: {e}{cpu_devices_hint(spec)}") from None


def cpu_devices_hint(spec: str) -> str:
    """How to get the devices a mesh needs on one machine, when it is short of them."""
    import jax
    needed = math.prod(mesh_shape(spec).values())
    if jax.process_count() > 1 or jax.device_count() >= needed:
        return ""
    return f"; to try this mesh on this machine's CPU, pass --cpu-devices {needed}"


# The library's words for a setting left as None, and what the command line says instead.
CLI_WORDS = {"(or None: up to the context end)": f"(or {TO_CONTEXT_END}: up to the context end)",
             "(or None: a fresh seed)": "(or leave it out: a fresh seed)"}


def sampling(args: argparse.Namespace, config, tokenizer) -> dict[str, Any]:
    """Sampling settings, checked by the sampler; a bad value is a UserError naming the flag, in
    the command line's words (CLI_WORDS)."""
    from grok1.generation.settings import sampling_settings

    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, frequency_penalty=args.frequency_penalty,
                    presence_penalty=args.presence_penalty, seed=args.seed)
    try:
        sampling_settings(config, tokenizer, **settings)
    except ValueError as e:
        message = str(e)
        for name in settings:
            if message.startswith(name + " "):
                message = "--" + name.replace("_", "-") + message[len(name):]
        for library, cli in CLI_WORDS.items():
            message = message.replace(library, cli)
        raise UserError(message) from None
    return settings


def load_model(args: argparse.Namespace, config, tokenizer_path: str):
    import grok1
    from grok1.checkpoint import CheckpointError

    mesh = make_mesh(args.mesh)
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        return grok1.load(args.checkpoint, mesh=mesh, dtype=dtype, tokenizer=tokenizer_path,
                          config=config, progress=not args.quiet)
    except CheckpointError as e:
        release = "missing checkpoint file" in str(e) and looks_like_release(args.checkpoint, args.preset)
        raise UserError(f"{e} ({RELEASE_HINT})" if release else str(e)) from None


# ---- actions ----------------------------------------------------------------------------------

def run_plan(args: argparse.Namespace) -> None:
    from grok1.plan import format_plan, make_plan

    config = model_config(args)
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    try:
        plan = make_plan(config, args.mesh, batch=args.batch, context=args.context, dtype=dtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))


def run_describe(args: argparse.Namespace) -> None:
    from grok1.inspect import describe, format_description

    config = model_config(args)
    try:
        description = describe(config, args.mesh)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(description, indent=1) if args.json else format_description(description))


def run_trace(args: argparse.Namespace, model) -> None:
    from grok1.inspect import format_trace, plot_trace
    from grok1.generation.settings import encode_text

    for prompt in args.prompt or [DEFAULT_PROMPT]:
        try:
            trace = model.trace([encode_text(prompt, model.config, model.tokenizer)])
        except ValueError as e:  # e.g. a prompt longer than the context
            raise UserError(f"--trace: {e}") from None
        print(format_trace(trace))
        if args.plot:
            plot_trace(trace, args.plot)
            print(f"expert load plotted to {args.plot}", file=sys.stderr)


class CompileClock:
    """What jax has spent on compiled programs since the process started, summed from
    jax.monitoring: `seconds` of tracing, lowering and compiling them (or reading them from the
    persistent compilation cache), and `cache_hits`, the programs read from that cache in
    `cache_seconds`. The speeds reported leave all of it out.

    Why events rather than timing: jax records its compile events on a cache hit too
    (backend_compile_duration spans `compile_or_get_cached`, and tracing and lowering run either
    way), so their seconds alone cannot tell a program read from the cache from one XLA compiled;
    jax records /jax/compilation_cache/cache_retrieval_time_sec only for a hit. Comparing the
    first call's time against later ones could not tell a cache read from a short compile either,
    and would depend on the machine's load."""

    seconds = 0.0
    cache_hits = 0
    cache_seconds = 0.0
    _listening = False

    @classmethod
    def now(cls) -> float:
        """`seconds` so far (listening from the first call on)."""
        if not cls._listening:
            import jax.monitoring
            jax.monitoring.register_event_duration_secs_listener(cls._record)
            cls._listening = True
        return cls.seconds

    @classmethod
    def mark(cls) -> tuple[float, int, float]:
        """The clock's readings now, for `since`."""
        return cls.now(), cls.cache_hits, cls.cache_seconds

    @classmethod
    def since(cls, mark: tuple[float, int, float]) -> tuple[float, int, float]:
        """(seconds, cache hits, seconds reading the cache) since `mark`."""
        seconds, hits, cache_seconds = mark
        return cls.now() - seconds, cls.cache_hits - hits, cls.cache_seconds - cache_seconds

    @classmethod
    def _record(cls, event: str, duration: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            cls.seconds += duration
        elif event == "/jax/compilation_cache/cache_retrieval_time_sec":
            cls.cache_hits += 1
            cls.cache_seconds += duration


def compile_words(work: tuple[float, int, float], elapsed: float) -> str:
    """What of `elapsed` seconds went to compiled programs (`CompileClock.since`), in words; ''
    when nothing was compiled or read from the compilation cache."""
    seconds, hits, cache_seconds = work
    # Programs traced in several threads at once can sum to more than the time that passed.
    compiling = min(seconds - cache_seconds, elapsed)
    words = [f"{compiling:.2f} s of it compiling"] if compiling >= 0.005 else []
    if hits:
        words.append(f"{hits} program{'s' if hits > 1 else ''} read from the compilation cache")
    return ", ".join(words)


def ending(finish_reason: str, stop_reason: Any, prompt_tokens: int, tokens: int, config) -> str:
    """Why a request ended, in words (README: "Why generation ends")."""
    if finish_reason == "stop":
        if stop_reason is None:
            return "ended at EOS"
        return f"ended at stop {'string' if isinstance(stop_reason, str) else 'token'} {stop_reason!r}"
    if prompt_tokens + tokens >= config.sequence_len:
        return "ended at the context end"
    return "ended at max-new-tokens"


def fit_notes(fitted, prompt_tokens: int, config, max_new_tokens: Optional[int] = None) -> list[str]:
    """One plain line per change made to fit a request into the context, from `fitted`: a
    settings.FittedPrompt or a Completion (both carry the two fields); `max_new_tokens` as asked."""
    notes = []
    if fitted.dropped_prompt_tokens:
        beside = "" if max_new_tokens is None else f" with --max-new-tokens {max_new_tokens}"
        notes.append(f"note: the prompt is longer than the {config.sequence_len}-token context allows"
                     f"{beside}: its first {fitted.dropped_prompt_tokens} tokens were dropped")
    if fitted.max_new_tokens_lowered_from is not None:
        room = config.sequence_len - prompt_tokens
        notes.append(f"note: --max-new-tokens {fitted.max_new_tokens_lowered_from} lowered to {room}: the "
                     f"room a {prompt_tokens}-token prompt leaves in the {config.sequence_len}-token context")
    return notes


def print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(note, file=sys.stderr, flush=True)


def prompt_as_run(prompt: str, prompt_ids: Sequence[int], dropped: int, model) -> str:
    """The prompt as the model saw it: `prompt` itself, or when its oldest `dropped` tokens were
    dropped to fit the context, the text of the ids it kept (`prompt_ids`, after their BOS)."""
    if not dropped:
        return prompt
    if model.config.add_bos and prompt_ids and prompt_ids[0] == model.config.bos_token:
        prompt_ids = prompt_ids[1:]
    return model.tokenizer.decode(prompt_ids)


def stream_one(model, prompt: str, settings: dict[str, Any], quiet: bool, echo: bool = True) -> None:
    """Print the prompt (unless quiet, or not `echo`: already on screen) as the model sees it and
    its continuation as it arrives, then the speed and why it ended."""
    from grok1.generation.settings import fit_prompt, sampling_settings

    fitted = fit_prompt(prompt, model.config, model.tokenizer,
                        sampling_settings(model.config, model.tokenizer, **settings))
    prompt_tokens = len(fitted.token_ids)
    print_notes(fit_notes(fitted, prompt_tokens, model.config, settings["max_new_tokens"]))
    if echo and not quiet:
        sys.stdout.write(prompt_as_run(prompt, fitted.token_ids, fitted.dropped_prompt_tokens, model))
        sys.stdout.flush()
    start, mark = time.perf_counter(), CompileClock.mark()
    first, count, last, compiled = None, 0, None, None
    for delta in model.stream(prompt, **settings):
        count += len(delta.token_ids)
        if first is None and delta.token_ids:
            first, compiled = time.perf_counter(), CompileClock.since(mark)
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        last = delta
    sys.stdout.write("\n")
    sys.stdout.flush()
    end = time.perf_counter()
    if quiet:
        return
    why = ending(last.finish_reason, last.stop_reason, prompt_tokens, count, model.config)
    if first is None:
        print(f"[no tokens: {why}]", file=sys.stderr, flush=True)
        return
    # The first token may wait for compilation; the rate after it is the decoding speed.
    rate = f"then {(count - 1) / (end - first):.1f} tokens/s" if count > 1 else "no more tokens"
    compilation = compile_words(compiled, first - start)
    compilation = f" ({compilation})" if compilation else ""
    print(f"[{count} tokens in {end - start:.2f} s: first after {first - start:.2f} s{compilation}, "
          f"{rate}; {why}]", file=sys.stderr, flush=True)


def run_generate(args: argparse.Namespace, model, settings: dict[str, Any]) -> None:
    prompts = args.prompt or [DEFAULT_PROMPT]
    if not (args.no_stream or args.json):
        for prompt in prompts:
            stream_one(model, prompt, settings, args.quiet)
        return
    generate_together(args, model, settings, prompts)


def generate_together(args: argparse.Namespace, model, settings: dict[str, Any], prompts: list[str],
                      json_lines: bool = False) -> None:
    """--no-stream and --json: `prompts` as one batch, printed when all are done; --json as a
    list of completions, or with `json_lines` (--interactive --json) one completion per line."""
    start, mark = time.perf_counter(), CompileClock.mark()
    completions = model.generate(prompts, **settings)
    seconds, compiled = time.perf_counter() - start, CompileClock.since(mark)
    for completion in completions:
        print_notes(fit_notes(completion, len(completion.prompt_token_ids), model.config,
                              settings["max_new_tokens"]))
    if args.json:
        records = [{"prompt": p, "text": c.text, "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "seed": c.seed, "dropped_prompt_tokens": c.dropped_prompt_tokens}
                   for p, c in zip(prompts, completions)]
        if json_lines:
            for record in records:
                print(json.dumps(record), flush=True)
        else:
            print(json.dumps(records, indent=1))
    else:
        for prompt, c in zip(prompts, completions):
            print(c.text if args.quiet else
                  prompt_as_run(prompt, c.prompt_token_ids, c.dropped_prompt_tokens, model) + c.text)
    if not args.quiet:
        endings = collections.Counter(
            ending(c.finish_reason, c.stop_reason, len(c.prompt_token_ids), len(c.token_ids), model.config)
            for c in completions)
        print(report(sum(len(c.token_ids) for c in completions), seconds, compiled[0],
                     ", ".join(f"{n} {why}" if len(completions) > 1 else why for why, n in endings.items()),
                     cache_hits=compiled[1], cache_seconds=compiled[2]),
              file=sys.stderr, flush=True)


def report(tokens: int, seconds: float, compile_seconds: float, why: str, cache_hits: int = 0,
           cache_seconds: float = 0.0) -> str:
    """The --no-stream stats line: the rate leaves compiling (and reading the compilation cache)
    out."""
    compiling = compile_words((compile_seconds, cache_hits, cache_seconds), seconds)
    compiling = f" ({compiling})" if compiling else ""
    running = max(seconds - compile_seconds, 1e-9)
    return f"[{tokens} tokens in {seconds:.2f} s{compiling}: {tokens / running:.1f} tokens/s; {why}]"


def read_prompts(tty: bool) -> Iterator[str]:
    """Prompts from standard input until EOF or an empty line. On a terminal, with line editing
    and history (readline) and a "prompt> " cue."""
    if tty:
        try:
            import readline  # noqa: F401  (input() gains line editing and history once imported)
        except ImportError:  # not on every platform (e.g. Windows)
            pass
    while True:
        if tty:
            try:
                line = input("prompt> ")
            except EOFError:
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        line = line.rstrip("\n")
        if not line.strip():
            return
        yield line


def run_interactive(args: argparse.Namespace, model, settings: dict[str, Any]) -> None:
    from grok1.runtime.processes import is_main_process, share_from_main

    main_process = is_main_process()
    tty = main_process and sys.stdin.isatty() and sys.stdout.isatty()
    prompts = read_prompts(tty) if main_process else iter(())
    while True:
        # Process 0 reads its stdin; every process then continues the same prompt (None: the end).
        prompt = share_from_main(next(prompts, None) if main_process else None)
        if prompt is None:
            return
        if args.json:
            generate_together(args, model, settings, [prompt], json_lines=True)
        else:
            # On a terminal the prompt is on screen already: the continuation follows on the next line.
            stream_one(model, prompt, settings, args.quiet, echo=not tty)


def read_stdin_prompt(args: argparse.Namespace) -> None:
    """--prompt -: replace it with standard input (read by process 0, shared with the others),
    without the line breaks it ends with."""
    from grok1.runtime.processes import is_main_process, share_from_main

    if STDIN_PROMPT not in (args.prompt or []):
        return
    read: dict[str, str] = {}
    if is_main_process():
        if sys.stdin.isatty():
            print("run.py: reading the prompt from standard input; end it with Ctrl-D", file=sys.stderr,
                  flush=True)
        try:
            read["text"] = sys.stdin.read().rstrip("\r\n")
        except UnicodeDecodeError as e:
            read["error"] = (f"--prompt {STDIN_PROMPT}: standard input is not {sys.stdin.encoding} text "
                             f"({e.reason})")
    read = share_from_main(read)
    if "error" in read:
        raise UserError(read["error"])
    if not read["text"]:
        raise UserError(f"--prompt {STDIN_PROMPT}: standard input is empty: pipe the text to continue "
                        f"into it")
    args.prompt = [read["text"] if prompt == STDIN_PROMPT else prompt for prompt in args.prompt]


def stdin_waiting() -> bool:
    """Whether standard input is a pipe or a file with data in it (not a terminal, /dev/null or an
    empty pipe, as under a process manager or a test)."""
    try:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return os.fstat(fd).st_size > os.lseek(fd, 0, os.SEEK_CUR)
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            import fcntl
            import termios
            waiting = fcntl.ioctl(fd, termios.FIONREAD, bytes(4))   # bytes ready to read
            return int.from_bytes(waiting, sys.byteorder) > 0
    except (AttributeError, OSError, ValueError, ImportError):   # no stdin, a test's stand-in, Windows
        pass
    return False


def note_unread_stdin(args: argparse.Namespace) -> None:
    """One line on stderr when input piped into standard input goes unread (it would otherwise be
    ignored silently), saying how to use it."""
    if args.interactive or STDIN_PROMPT in (args.prompt or []) or not stdin_waiting():
        return
    mode = next((m for m in ("plan", "describe", "trace", "serve") if getattr(args, m)), None)
    if mode is None:
        use = f"--prompt {STDIN_PROMPT} continues it, --interactive each of its lines"
    elif mode == "trace":
        use = f"--prompt {STDIN_PROMPT} traces it"
    else:
        use = f"--{mode} reads none"
    print(f"note: piped standard input is ignored; {use}", file=sys.stderr, flush=True)


# ---- --perplexity ---------------------------------------------------------------------------

def read_perplexity_text(path: str) -> str:
    """--perplexity FILE (or - : standard input) as text, or a one-line UserError."""
    name = "standard input" if path == STDIN_PROMPT else path
    try:
        if path == STDIN_PROMPT:
            text = sys.stdin.read()
        else:
            if os.path.isdir(path):
                raise UserError(f"--perplexity: {path} is a folder; give a text file")
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise UserError(f"--perplexity: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--perplexity: {name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"--perplexity: {name} is empty: give a text to score")
    return text


def run_perplexity(args: argparse.Namespace, model, text: str) -> None:
    """Perplexity and bits per byte of the text (grok1/perplexity.py), a progress bar on stderr."""
    from grok1.perplexity import perplexity
    from grok1.runtime.processes import is_main_process

    bar = None
    if sys.stderr.isatty() and not args.quiet and is_main_process():
        from tqdm import tqdm
        bar = tqdm(desc="scoring", unit=" windows", file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()

    def progress(windows: int, tokens: int) -> None:
        if bar is not None:
            bar.update(windows - bar.n)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tokens/s")
    try:
        result = perplexity(model, text, context=args.context, stride=args.stride, progress=progress)
    except ValueError as e:
        raise UserError(f"--perplexity: {e}") from None
    finally:
        if bar is not None:
            bar.close()
    if not is_main_process():
        return
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "tokens_per_second": result.tokens_per_second,
                          "windowing": "llama.cpp" if args.stride is None else "stride"}))
        return
    cut = (f"{result.windows} windows of {result.context}, second halves scored (as llama-perplexity)"
           if args.stride is None else f"{result.windows} windows of {result.context}, stride {args.stride}")
    print(f"perplexity {result.perplexity:.4f}  bits/byte {result.bits_per_byte:.4f}  "
          f"({result.scored_tokens} tokens scored of {result.text_tokens}, {cut}; "
          f"{result.tokens_per_second:.0f} tokens/s)")


def build_native_kernels() -> None:
    """On CPU, build (or load) grok1's native kernels now: their first build takes about 10 s and
    says so on stderr, a line that belongs before the generated text, not inside it."""
    import jax
    if jax.default_backend() == "cpu":
        from grok1.kernels import native
        native.available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        if args.plan:
            force_cpu_devices(args.mesh, args.cpu_devices)
        if args.mesh is not None:
            mesh_shape(args.mesh)  # a bad spec is a one-line error before anything loads
        if args.plan or args.describe:
            note_unread_stdin(args)
        if args.plan:
            run_plan(args)
            return 0
        if args.describe:
            run_describe(args)
            return 0
        check_checkpoint_folder(args.checkpoint)
        text = read_perplexity_text(args.perplexity) if args.perplexity else None
        start_jax(args)
        check_mesh_covers_the_cluster(args.mesh)
        note_unread_stdin(args)   # after joining a cluster: process 0 alone prints
        read_stdin_prompt(args)
        listening = listen(args) if args.serve else None
        config = model_config(args)
        tokenizer_path, tokenizer = load_tokenizer(args, config)
        settings = sampling(args, config, tokenizer)
        model = load_model(args, config, tokenizer_path)
        build_native_kernels()
        if args.trace:
            run_trace(args, model)
        elif args.perplexity:
            run_perplexity(args, model, text)
        elif args.interactive:
            run_interactive(args, model, settings)
        elif args.serve:
            serve = server_module().serve
            serve(model, sock=listening, model_name=os.path.basename(os.path.normpath(args.checkpoint)),
                  log_level="warning" if args.quiet else "info", api_key=args.api_key,
                  metrics_need_key=args.metrics_need_key)
        else:
            run_generate(args, model, settings)
        return 0
    except UserError as e:
        from grok1.runtime.processes import error_stream
        print(f"run.py: error: {e}", file=error_stream(), flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early, e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
