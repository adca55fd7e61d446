"""
The command line's rules that are not the method's: every number in range, a device and a
precision that exist, and the run options that exclude each other (--resume, --overwrite,
--minutes). distill.check_config runs these first, then checks the method's own settings.
The command line is built from distill.TrainConfig's fields (add_config_args), with a recipe's
settings as its defaults (parse_with_recipe).
"""
import argparse
import math
from dataclasses import fields


class ConfigError(ValueError):
    """Bad command-line input: the message says what and how to fix it."""


def option(name):
    """A TrainConfig field as its command-line flag: seq_len -> --seq-len."""
    return "--" + name.replace("_", "-")


def add_config_args(p, config, only=None):
    """One command-line option per field of the dataclass `config` (or per field named in
    `only`), its help from the field's metadata; a bool gives --x and --no-x."""
    for f in fields(config):
        if only is not None and f.name not in only:
            continue
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(option(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            p.add_argument(option(f.name), type=type(f.default), default=f.default,
                           help=f.metadata["help"])


def parse_with_recipe(p, recipes, argv=None):
    """p.parse_args(argv), the settings of --recipe (a key of `recipes`) taking the place of the
    defaults (an unknown recipe is refused later, by the config check)."""
    p.set_defaults(**recipes.get(p.parse_known_args(argv)[0].recipe, {}))
    return p.parse_args(argv)


def check_options(cfg):
    """Before anything is loaded. `not 0 <= x` and not `x < 0`: NaN compares false with
    everything, so only the first refuses it."""
    for name in ("steps", "seq_len", "micro_batch", "step_tokens", "log_every", "save_every"):
        if not getattr(cfg, name) >= 1:
            raise ConfigError(f"{option(name)} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("warmup", "cooldown", "regions", "threads", "minutes", "weight_decay", "grad_clip",
                 "lr"):
        x = getattr(cfg, name)
        if not 0 <= x < math.inf or (name == "lr" and x == 0):
            finite = " and finite" if isinstance(x, float) else ""
            raise ConfigError(f"{option(name)} must be {'> 0' if name == 'lr' else '>= 0'}{finite} "
                              f"(got {x})")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda (got {cfg.device!r})")
    if cfg.precision not in ("auto", "fp32"):
        raise ConfigError(f"--precision must be auto or fp32 (got {cfg.precision!r})")
    if cfg.plan:
        raise ConfigError("the memory plan is a tool of its own: python -m tools.plan_memory with "
                          "the same options (and --nproc, --gpu-mem)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one")
    if cfg.minutes:
        check_minutes(cfg)


def check_minutes(cfg):
    """--minutes plans a new run's length once, after its first --log-every steps: at most
    --steps, and never shorter than those steps plus the cool-down, nor than the warm-up plus
    the cool-down (training/run_dir.py, plan_steps). So --steps must hold both: a --minutes run
    never needs distill.fit_schedule, whose fit would change with the planned length (its first
    steps ran before the plan, and a resumed run is given the planned --steps)."""
    if cfg.resume:
        raise ConfigError("--minutes plans the length of a new run; a resumed run continues to "
                          "--steps: pass the step count the first run planned (its log says it)")
    if cfg.cooldown >= cfg.steps - cfg.log_every:
        raise ConfigError(f"--minutes plans the run's length after its first --log-every steps, and "
                          f"--cooldown {cfg.cooldown} would start before that in --steps {cfg.steps}: "
                          "give --steps as a cap well above the cool-down (e.g. 100000)")
    if cfg.warmup + cfg.cooldown > cfg.steps:
        raise ConfigError(f"--minutes needs --steps {cfg.steps} to hold --warmup {cfg.warmup} + "
                          f"--cooldown {cfg.cooldown}: give --steps as a cap well above them "
                          "(e.g. 100000)")


def regions_misfit(cfg, M):
    """Why --seq-len cannot hold its M regions (distill.n_regions) of up to k_max tokens, and
    each change that would fit: other --regions (more, when the paper's count rounds to none),
    --seq-len or --k."""
    N, k = cfg.seq_len, cfg.k
    fixes = []
    if cfg.regions:                     # M given: at most N // k regions fit
        what = f"--regions {M}"
        if N // k:
            fixes.append(f"--regions {N // k}" + " or fewer" * (N // k > 1))
        fixes.append(f"--seq-len >= {M * k}")
        most_k = N // M
    else:                               # the paper's M = N // (2 k_max) is 0: N < 2 k_max
        what = f"the paper's seq_len // (2 k_max) = {M} regions"
        if N >= k:
            fixes.append("--regions 1")
        fixes.append(f"--seq-len >= {2 * k}")
        most_k = N // 2
    if most_k >= 2:
        fixes.append(f"--k {most_k}" + " or less" * (most_k > 2))
    return (f"--seq-len {N} is too short for {what} of up to k={k} tokens: give "
            f"{', '.join(fixes[:-1])}{' or ' if len(fixes) > 1 else ''}{fixes[-1]}")
