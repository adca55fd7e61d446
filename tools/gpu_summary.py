"""
The closing summary of tools/gpu_run.sh: each GPU figure against its goal, read from the JSON
files that the script's steps wrote into one folder.

    python -m tools.gpu_summary runs/gpu       # prints the table, writes runs/gpu/summary.md

The files, by step (a missing or partial file is reported as such, never guessed around):
  1. gsm8k.json        bench.py on GSM8K test in one batch: verified tokens per pass (goal >= 2)
  2. b1.json           bench.py at batch 1: wall-clock speedup over static k=1 / tokens per
                       pass (goal >= 0.85: a pass of a small model costs about the same for 1 or
                       k tokens, so the speedup should be nearly the tokens per pass)
  3. b16.json          bench.py at batch 16: tokens/s over static k=1's (goal >= 1.5)
  4. decode.json, decode_compile.json   tools.bench_decode: ours against transformers generate
  5. train.json, train_compile.json     tools.bench_train: an MTP step against a plain one
  6. b1_t07.json, b16_t07.json          steps 2 and 3 when sampling at temperature 0.7
"""
import json
import os
import sys

GOALS = {"tokens_per_pass": 2.0, "pass_efficiency": 0.85, "batch16": 1.5}

# -----------------------------------------------------------------------------
# Reading what the steps wrote


def load(folder, name):
    """The JSON object in folder/name, or None if the step wrote none (or a broken one)."""
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def endings(folder):
    """{step name: how it ended}, from the steps.tsv that gpu_run.sh writes as each step ends."""
    try:
        with open(os.path.join(folder, "steps.tsv")) as f:
            return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    except OSError:
        return {}


def partial(bench):
    """bench.py rewrites its table after every strategy; a stopped run's header says so."""
    return "partial" in bench.get("header", "")


def speed_rows(bench):
    """bench.py's results for ConfAdapt 0.9 and the verified rules, in bench's order."""
    return [r for r in bench["results"]
            if r["strategy"] == "ConfAdapt tau=0.9" or r["strategy"].startswith("verified")]


# -----------------------------------------------------------------------------
# The figures, each against its goal: (figure, value, goal, met)


def met(value, goal):
    """Against the value as printed (two decimals), so that the table never contradicts itself."""
    return "yes" if round(value, 2) >= goal else "no"


def fidelity_note(r):
    """Accuracy, and the columns that rank strategies where accuracy cannot: same as k=1, teacher NLL."""
    notes = [f"accuracy {100 * r['acc']:.1f}%"]
    if r.get("same_as_k1") is not None:
        notes.append(f"same as k=1 {100 * r['same_as_k1']:.1f}%")
    if r.get("teacher_nll") is not None:
        notes.append(f"teacher NLL {r['teacher_nll']:.3f}")
    return ", ".join(notes)


def tokens_per_pass(bench, where):
    """Step 1: every verified rule's tokens per pass (its output is static k=1's) against the
    goal; the other rows for reference."""
    g = GOALS["tokens_per_pass"]
    return [(f"{where}: {r['strategy']}, tokens per pass ({fidelity_note(r)})", f"{r['eff_k']:.2f}",
             *((f">= {g:g}", met(r["eff_k"], g)) if r["strategy"].startswith("verified") else ("-", "-")))
            for r in bench["results"]]


def pass_efficiency(bench, where):
    """Step 2: wall-clock speedup over static k=1 divided by tokens per pass."""
    g = GOALS["pass_efficiency"]
    return [(f"{where}: {r['strategy']}, speedup {r['speedup']:.2f}x / {r['eff_k']:.2f} tokens per pass",
             f"{r['speedup'] / r['eff_k']:.2f}", f">= {g:g}", met(r["speedup"] / r["eff_k"], g))
            for r in speed_rows(bench)]


def batch_throughput(bench, where):
    """Step 3: tokens/s over static k=1's tokens/s, the batch decoded together."""
    g = GOALS["batch16"]
    return [(f"{where}: {r['strategy']}, tokens/s over static k=1's ({r['eff_k']:.2f} tokens per pass)",
             f"{r['speedup']:.2f}", f">= {g:g}", met(r["speedup"], g)) for r in speed_rows(bench)]


def decode_rows(runs, where):
    """Step 4: each of our engines' tokens/s over transformers generate's (no goal set)."""
    hf = next((r for r in runs["rows"] if r["run"] == "transformers generate"), None)
    return [(f"{where}: {r['run']}, {r['tokens_per_s']:.1f} tokens/s"
             + (" over transformers generate" if hf else " (no transformers row)"),
             f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-", "-", "-")
            for r in runs["rows"] if r["run"].startswith("ours")]


def train_row(res, where):
    """Step 5: MTP step time over a plain next-token step's (equal MFU would give the FLOPs ratio)."""
    return [(f"{where}: MTP / NTP step time ({res['mtp_ms']:.1f} / {res['ntp_ms']:.1f} ms; "
             f"model-FLOPs ratio {res['flops_ratio']:.2f})", f"{res['ratio']:.2f}", "-", "-")]


STEPS = [  # (file, how to read it, where it comes from)
    ("gsm8k.json", tokens_per_pass, "1. GSM8K bench"),
    ("b1.json", pass_efficiency, "2. batch 1"),
    ("b16.json", batch_throughput, "3. batch 16"),
    ("decode.json", decode_rows, "4. batch-1 k=1"),
    ("decode_compile.json", decode_rows, "4. batch-1 k=1"),
    ("train.json", train_row, "5. training step, k drawn"),
    ("train_compile.json", train_row, "5. training step, k drawn, compiled"),
    ("b1_t07.json", pass_efficiency, "6. batch 1, temperature 0.7"),
    ("b16_t07.json", batch_throughput, "6. batch 16, temperature 0.7"),
]
OPTIONAL = {"b1_t07.json", "b16_t07.json"}


def summary(folder):
    """[(figure, value, goal, met)] for every step's file in `folder`."""
    rows, ended = [], endings(folder)
    for name, read, where in STEPS:
        res = load(folder, name)
        if res is None:
            how = ended.get(name[:-len(".json")], f"no {name}")
            if name not in OPTIONAL:
                rows.append((f"{where}: not measured ({how})", "-", "-", "-"))
            continue
        if "results" in res and partial(res):
            where += " (partial: the run stopped early)"
        rows += read(res, where)
    return rows


def markdown(rows):
    lines = ["| figure | value | goal | met |", "| --- | ---: | ---: | :---: |"]
    return "\n".join(lines + [f"| {' | '.join(r)} |" for r in rows]) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python -m tools.gpu_summary FOLDER (the --out of tools/gpu_run.sh)",
              file=sys.stderr)
        sys.exit(2)
    md = markdown(summary(argv[0]))
    with open(os.path.join(argv[0], "summary.md"), "w") as f:
        f.write(md)
    print(md, end="")


if __name__ == "__main__":
    main()
