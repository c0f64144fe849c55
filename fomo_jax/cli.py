"""fomo-jax: continual CLIP pretraining (FoMo-in-Flux) from one command.

usage: fomo-jax COMMAND [flags]

commands:
{commands}

`fomo-jax COMMAND --help` lists a command's flags. `--config` takes a config file
(`configs/fif_synth.py:smoke`) or the name of a packaged config, `NAME[:ARG]` (ARG goes to
its get_config), and `--config.KEY=VALUE` overrides any field of it. Work directories
default to `runs/...` under the current folder.

packaged configs: {configs}

  fomo-jax run                                             # the default experiment (fif_synth)
  fomo-jax run --config=fif_synth:smoke --workdir=W        # seconds, for checks
  fomo-jax eval --config=fif_synth:smoke --model=W/model   # any model on the config's test sets
  fomo-jax compare runs/a runs/b --out=runs/a_vs_b
  fomo-jax prepare --data_root=/data/fif                   # images -> record shards, once
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from fomo_jax import configs

PROG = "fomo-jax"
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: `define(flag_values, argv)` defines its flags on a FlagValues of its own
    (so that commands can share flag names and `main` can run more than once in a process) and
    returns the function `app.run` calls with the positional arguments left after parsing;
    None for a command that parses its own arguments (plot-schedule: argparse)."""

    summary: str
    usage: str
    define: Callable[[flags.FlagValues, list[str]], Callable[[list[str]], None]] | None


# --- --config: a file or a packaged name ---------------------------------------------------


def resolve_config_args(args: list[str]) -> list[str]:
    """Rewrite `--config=NAME[:ARG]` / `--config NAME[:ARG]` to the packaged file's path, which
    is what config_flags loads; paths stay as given, and anything else is refused by name."""
    out, args = [], list(args)
    while args:
        arg = args.pop(0)
        match = re.fullmatch(r"(--?config)(=(.*))?", arg)
        shadowed = re.match(r"--?config\.(\w+\.)*(update|get|items|keys|values|lock)(=|$)", arg)
        if shadowed:  # config_flags would find ConfigDict's method of that name, not the key
            raise ValueError(
                f"{arg.split('=')[0]}: a key named {shadowed.group(2)!r} cannot be set alone "
                "from the command line (ConfigDict has a method of that name); set its whole "
                'group, e.g. --config.mixture=\'{"pretraining": 0, "update": 1, "buffer": 0}\''
            )
        if match is None:
            out.append(arg)
        elif match.group(2) is not None:
            out.append(f"{match.group(1)}={configs.resolve(match.group(3))}")
        elif args:  # the value is the next argument
            out += [arg, configs.resolve(args.pop(0))]
        else:
            raise ValueError(f"{arg} needs a value: a config file or one of {configs.names()}")
    return out


def define_config(fv: flags.FlagValues, argv: list[str], about: str) -> flags.FlagHolder:
    """The `--config` flag (default: the packaged fif_synth) with `--config.KEY=VALUE`
    overrides; `argv` must be the resolved command line (config_flags scans it for them)."""
    # config_flags loads the default when it defines the flag (the packaged configs import
    # JAX); --help only names it.
    asks_help = any(arg in HELP_FLAGS for arg in argv)
    return config_flags.DEFINE_config_file(
        "config",
        None if asks_help else configs.resolve("fif_synth"),
        f"{about} A config file (path[:ARG]) or a packaged config: "
        f"{', '.join(configs.names())} (NAME[:ARG]). --config.KEY=VALUE overrides a field. "
        "(default: fif_synth)",
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,
    )


def load_config(args: list[str]):
    """The config that `--config` flags give, without running anything (notebooks, tests):
    `load_config(["--config=fif_synth:smoke", "--config.num_tasks=3"])`."""
    argv = [PROG, *resolve_config_args(args)]
    fv = flags.FlagValues()
    holder = define_config(fv, argv, "Config.")
    fv(argv)
    return holder.value


def config_name(fv: flags.FlagValues) -> str:
    """'fif_synth', 'fif_synth_smoke', 'my_config': the parsed --config's run name."""
    return configs.run_name(fv["config"].config_filename)


def default_workdir(name: str) -> str:
    """`./runs/<name>` under the current folder (never the package's folder)."""
    return os.path.abspath(os.path.join("runs", name))


def _prepare_runtime() -> None:
    from fomo_jax import runtime

    runtime.quiet_checkpoint_logs()
    runtime.enable_compilation_cache()


def _no_positional(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"{argv[0]}: unexpected arguments {argv[1:]}")


# --- run --------------------------------------------------------------------------------------


def _define_run(fv, argv):
    config = define_config(fv, argv, "Experiment config.")
    workdir = flags.DEFINE_string(
        "workdir", None, "Where outputs go (default: runs/<config name> here).", flag_values=fv
    )
    coordinator = flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 in a multi-process run (with "
        "--num_processes and --process_id); unset: TPU pods and SLURM are detected, else one "
        "process", flag_values=fv,
    )  # fmt: skip
    processes = flags.DEFINE_integer("num_processes", None, "Processes of the run.",
                                     flag_values=fv)  # fmt: skip
    process = flags.DEFINE_integer("process_id", None, "This process's index (0: the writer).",
                                   flag_values=fv)  # fmt: skip

    def main(args):
        _no_positional(args)
        from fomo_jax import distributed

        distributed.initialize(coordinator.value, processes.value, process.value)
        run_job(config.value, workdir.value or default_workdir(config_name(fv)))

    return main


def run_job(config, workdir: str) -> None:
    """The continual stream (configs with job="continual") or the pretraining job."""
    _prepare_runtime()
    if config.get("job", "pretrain") == "continual":  # fif_synth, fif
        from fomo_jax.continual import runner
        from fomo_jax.continual import workdir as workdir_lib

        try:
            runner.run(config, workdir)
        except workdir_lib.Preempted as stop:  # SIGTERM: checkpointed; the same command resumes
            logging.warning("%s; exit status %d", stop, workdir_lib.EXIT_PREEMPTED)
            sys.exit(workdir_lib.EXIT_PREEMPTED)
        return
    from fomo_jax.train import pretrain  # clip_synth: pretraining only

    results = pretrain.train(config, workdir)
    logging.info("results (%s/results.json):", workdir)
    for key, value in results.items():
        print(f"  {key:28s} {value:.4g}" if isinstance(value, float) else f"  {key:28s} {value}")


# --- eval -------------------------------------------------------------------------------------


def _define_eval(fv, argv):
    config = define_config(fv, argv, "Config whose test sets (and model settings) are used.")
    model = flags.DEFINE_string(
        "model",
        None,
        "The model: an HF CLIP directory, an OpenCLIP file, a run's model/ directory, or a run "
        "directory with --step. Required.",
        flag_values=fv,
        required=True,
    )
    step = flags.DEFINE_integer(
        "step", None, "A checkpoint step of the run directory given as --model.", flag_values=fv
    )
    workdir = flags.DEFINE_string(
        "workdir",
        None,
        "Where eval.json goes (default: runs/eval_<model name>[_step<N>] here).",
        flag_values=fv,
    )

    def main(args):
        _no_positional(args)
        from fomo_jax.continual import eval_job

        _prepare_runtime()
        out = workdir.value or default_workdir(eval_name(model.value, step.value))
        name = configs.short(fv["config"].config_filename)
        eval_job.evaluate_model(config.value, model.value, out, step=step.value, config_name=name)
        print(f"wrote {os.path.join(out, 'eval.json')}")

    return main


def eval_name(model: str, step: int | None) -> str:
    """'eval_<run>' for a run's model/, 'eval_<file stem>' for a file, plus '_step<N>'."""
    path = os.path.normpath(os.path.abspath(model))
    name = os.path.basename(path)
    if name == "model":  # a run's exported model: name it after the run
        name = os.path.basename(os.path.dirname(path))
    name = os.path.splitext(name)[0] + ("" if step is None else f"_step{step}")
    return "eval_" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


# --- sweep ------------------------------------------------------------------------------------


def _define_sweep(fv, argv):
    from fomo_jax.continual import sweep

    config = define_config(fv, argv, "Experiment config shared by every run of the sweep.")
    own = sweep.define_flags(fv)

    def main(args):
        _no_positional(args)
        values = [own[name].value for name in ("workdir", "schedules", "methods")]
        sweep.main(config.value, *values)

    return main


# --- compare ----------------------------------------------------------------------------------


def _define_compare(fv, argv):
    runs = flags.DEFINE_list(
        "runs", [], "Run directories (also accepted as positional arguments).", flag_values=fv
    )
    out = flags.DEFINE_string(
        "out",
        None,
        "Where the table and figures go (default: runs/comparison here).",
        flag_values=fv,
    )

    def main(args):
        run_dirs = list(args[1:]) + list(runs.value)
        if not run_dirs:
            sys.exit(f"{args[0]}: name the run directories to compare")
        from fomo_jax.continual import compare

        destination = out.value or default_workdir("comparison")
        compare.compare_runs(run_dirs, destination)
        print(f"compared {len(run_dirs)} runs in {destination}")

    return main


# --- merge ------------------------------------------------------------------------------------


def _define_merge(fv, argv):
    def required(define, name, about):
        return define(name, None, about + " Required.", flag_values=fv, required=True)

    base = required(flags.DEFINE_string, "base", "The anchor model (θ0): a checkpoint path.")
    models = required(flags.DEFINE_list, "models", "Models to merge, comma-separated.")
    out = required(flags.DEFINE_string, "out", "Where the merged model goes.")
    method = required(
        flags.DEFINE_string,
        "method",
        "A merge function of fomo_jax.merging (e.g. interpolation, slerp, task_arithmetic, "
        "ties, dare_ties, magmax, model_stock).",
    )
    kwargs = flags.DEFINE_string(
        "kwargs",
        "",
        "The merge function's options: key=value,... (values read as JSON where they parse: "
        "numbers, true/false, [lists]; strings otherwise), e.g. prune_fraction=0.2 or "
        "weights=[0.3,0.7]; seed=N for the randomised merges.",
        flag_values=fv,
    )
    option = flags.DEFINE_multi_string(
        "option", [], "One option as key=value (repeatable); the same as --kwargs.", flag_values=fv
    )

    def main(args):
        _no_positional(args)
        try:
            merge_kwargs = parse_kwargs(",".join([*option.value, kwargs.value]))
        except ValueError as error:
            sys.exit(f"{args[0]}: {error}")
        from fomo_jax import merge_job

        _prepare_runtime()
        path = merge_job.merge_checkpoints(
            base.value, models.value, out.value, method=method.value, **merge_kwargs
        )
        print(f"wrote {path}")

    return main


def parse_kwargs(text: str) -> dict:
    """'prune_fraction=0.2,weights=[0.5,0.5],name=x' -> {'prune_fraction': 0.2, ...}: commas
    inside brackets belong to the value."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    kwargs = {}
    for item in filter(None, (i.strip() for i in items)):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--kwargs: {item!r} is not key=value")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


# --- prepare ----------------------------------------------------------------------------------


def _define_prepare(fv, argv):
    def define(kind, name, default, about):
        return getattr(flags, f"DEFINE_{kind}")(name, default, about, flag_values=fv)

    data_root = define(
        "string",
        "data_root",
        None,
        "A benchmark's data root (the released FiF layout, or fif_synth): its splits' images "
        "go into <out>/00_records/, where runs read them.",
    )
    tfds = define("string", "tfds", None, "A prepared TFDS dataset's name (needs --out).")
    image_folder = define("string", "image_folder", None, "A folder <class>/<image> (needs --out).")
    out = define(
        "string",
        "out",
        None,
        "Output folder. With --data_root: a data root (default: the data root itself; another "
        "folder gets the info JSONs, streams and a link to the pool and replaces the data root "
        "in --config.data.root). Otherwise: the shards' folder (e.g. for "
        "--config.data.pretraining_pool).",
    )
    datasets = define("list", "datasets", None, "--data_root: only these datasets.")
    info_dir = define("string", "info_dir", None, "--data_root: info JSONs (default 00_info).")
    classnames_dir = define(
        "string", "classnames_dir", None, "--data_root: class lists (default: info_dir)."
    )
    split = define("string", "split", "train", "--tfds: the split (any TFDS split spec).")
    tfds_dir = define("string", "tfds_data_dir", None, "--tfds: TFDS's data_dir.")
    image_key = define("string", "image_key", "image", "--tfds: the image feature.")
    label_key = define("string", "label_key", "label", "--tfds: the label feature ('' none).")
    text_key = define("string", "text_key", None, "--tfds: a text feature to use as caption.")
    template = define(
        "string",
        "template",
        "A photo of a {}.",
        "--tfds / --image_folder: the caption made from a class name when there is no text.",
    )
    image_size = define(
        "integer", "image_size", 224, "Shorter side of the stored images (0: as they are)."
    )
    quality = define("integer", "quality", 95, "JPEG quality of the stored images.")
    per_shard = define("integer", "records_per_shard", None, "Records per shard (1000).")
    workers = define("integer", "workers", None, "Encoding threads (default: CPU count).")
    skip_bad = define(
        "bool", "skip_bad", False, "Leave out missing or undecodable images (listed)."
    )

    def main(args):
        _no_positional(args)
        given = [f for f in (data_root, tfds, image_folder) if f.value]
        if len(given) != 1:
            sys.exit(f"{args[0]}: give exactly one of --data_root, --tfds, --image_folder")
        from fomo_jax.data import prepare, records

        options = dict(
            image_size=image_size.value or None,
            quality=quality.value,
            records_per_shard=per_shard.value,
            num_workers=workers.value,
            skip_bad=skip_bad.value,
        )
        if data_root.value:
            done = prepare.prepare_benchmark(
                data_root.value,
                out.value,
                datasets=datasets.value,
                info_dir=info_dir.value,
                classnames_dir=classnames_dir.value,
                progress=print,
                **options,
            )
            root = out.value or data_root.value
            print(f"prepared {len(done)} splits; runs read them with --config.data.root={root}")
            return
        if not out.value:
            sys.exit(f"{args[0]}: --tfds and --image_folder need --out")
        if tfds.value:
            source = records.from_tfds(
                tfds.value,
                split.value,
                tfds_dir.value,
                image_key=image_key.value,
                label_key=label_key.value or None,
                text_key=text_key.value,
                template=template.value,
            )
        else:
            source = prepare.from_image_folder(image_folder.value, template=template.value)
        result = records.convert(source, out.value, **options)
        print(f"{result.manifest['num_records']} records -> {out.value}")

    return main


# --- plot-schedule ----------------------------------------------------------------------------


def plot_schedule(args: list[str]) -> int:
    """`python -m fomo_jax.schedules` (argparse) under this command's name."""
    from fomo_jax import schedules

    program, sys.argv[0] = sys.argv[0], f"{PROG} plot-schedule"  # argparse's usage line
    try:
        schedules.main(args)
    finally:
        sys.argv[0] = program
    return 0


COMMANDS = {
    "run": Command(
        "Run an experiment: the continual stream or the pretraining job its config names.",
        "fomo-jax run [--config=fif_synth[:smoke] | --config=FILE.py[:ARG]] "
        "[--config.KEY=VALUE ...] [--workdir=DIR]\n\nResumes from the last checkpoint when "
        "run again on the same work directory; a finished run is left as it is.",
        _define_run,
    ),
    "eval": Command(
        "Evaluate any model on the config's test sets (full sets, like a run's final).",
        "fomo-jax eval --model=PATH [--step=N] [--config=...] [--workdir=DIR]\n\nWrites "
        "<workdir>/eval.json: knowledge_accumulation, zero_shot_retention, geometric_mean and "
        "per_dataset.",
        _define_eval,
    ),
    "sweep": Command(
        "Run one experiment under several schedules or methods and compare them.",
        "fomo-jax sweep [--schedules=A,B | --methods=all | --methods=A,lora:rank=64] "
        "[--config=...] [--workdir=DIR]",
        _define_sweep,
    ),
    "compare": Command(
        "Compare run directories made separately: one table and the figures.",
        "fomo-jax compare RUN_DIR RUN_DIR ... [--out=DIR]\n\nRuns over different streams or "
        "datasets are compared on what they share, and the table says so.",
        _define_compare,
    ),
    "merge": Command(
        "Merge checkpoints offline with any merge function.",
        "fomo-jax merge --base=THETA0 --models=A,B --method=ties --kwargs=prune_fraction=0.2 "
        "--out=DIR",
        _define_merge,
    ),
    "prepare": Command(
        "Write a benchmark's images (or a TFDS dataset, an image folder) as record shards.",
        "fomo-jax prepare --data_root=DIR [--out=DIR] [--datasets=A,B] | --tfds=NAME --out=DIR "
        "| --image_folder=DIR --out=DIR\n\nRuns read a split's images from its shards under "
        "<data root>/00_records/ when they exist; rerun to resume.",
        _define_prepare,
    ),
    "plot-schedule": Command(
        "Plot learning-rate schedules over a stream.",
        "fomo-jax plot-schedule [--names=A,B] [--steps_per_task=N] [--num_tasks=N] [--out=FILE]",
        None,
    ),
}


# --- dispatch ---------------------------------------------------------------------------------


def top_help() -> str:
    commands = "\n".join(f"  {name:14s} {c.summary}" for name, c in COMMANDS.items())
    return __doc__.format(commands=commands, configs=", ".join(configs.names()))


def command_help(name: str, fv: flags.FlagValues) -> str:
    """The command's usage and its own flags (absl's --help lists those of __main__)."""
    usage, _, details = COMMANDS[name].usage.partition("\n\n")
    summary = textwrap.fill(f"{COMMANDS[name].summary} {details.strip()}", 100)
    lines = [f"usage: {usage}", "", summary, "", "flags:"]
    for flag in sorted({fv[n] for n in fv}, key=lambda f: f.name):
        shown = flag.name != "config" and flag.default is not None  # config: in its help
        default = f" (default: {flag.default_as_str})" if shown else ""
        text = f"--{flag.name}: {flag.help}{default}"
        lines.append(flags.text_wrap(text, length=100, indent="      ", firstline_indent="  "))
    lines.append("\nabsl flags such as --verbosity also apply (--helpfull lists them).")
    return "\n".join(lines)


def _flags_parser(fv: flags.FlagValues, name: str):
    """Parse the command's flags, then absl's own (logging, grain) from what is left."""

    def parse(argv):
        try:
            return flags.FLAGS(fv(argv, known_only=True))
        except flags.Error as error:
            sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
            sys.stderr.write(f"Pass --help to see the flags of {PROG} {name}.\n")
            sys.exit(1)

    return parse


def main(argv: list[str] | None = None) -> int:
    """`fomo-jax COMMAND [flags]`; the console script and `python -m fomo_jax.cli`."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in HELP_FLAGS:
        print(top_help(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    if argv[1] == "--version":
        from importlib import metadata

        print(f"{PROG} {metadata.version('fomo_jax')}")
        return 0
    name, args = argv[1], argv[2:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if COMMANDS[name].define is None:
        return plot_schedule(args)
    fv = flags.FlagValues()
    if any(arg in HELP_FLAGS for arg in args):
        COMMANDS[name].define(fv, [f"{PROG} {name}", "--help"])
        print(command_help(name, fv))
        if "--helpfull" in args:
            print(flags.FLAGS.get_help())
        return 0
    try:
        resolved = [f"{PROG} {name}", *resolve_config_args(args)]
    except ValueError as error:
        print(f"{PROG} {name}: {error}", file=sys.stderr)
        return 2
    command_main = COMMANDS[name].define(fv, resolved)
    app.run(command_main, argv=resolved, flags_parser=_flags_parser(fv, name))
    return 0  # app.run exits; reached only if it ever returns


if __name__ == "__main__":
    sys.exit(main())
