"""
The closing summary of tools/gpu_run.sh: each GPU figure with the step and command that measured
it and its unit, read from the JSON files that the script's steps wrote into one folder.

    python -m tools.gpu_summary runs/gpu       # prints the table, writes runs/gpu/summary.md

The files, by step (a missing or partial file is reported as such, never guessed around):
  1. gsm8k.json        bench.py on GSM8K test in one batch: tokens per pass of every strategy
                       (a verified rule's output is static k=1's), with accuracy, same as k=1 and
                       teacher NLL
  2. b1.json           bench.py at batch 1: wall-clock speedup over static k=1 (tokens/s over its
                       tokens/s), with tokens per pass
  3. b16.json          bench.py at batch 16: the same, 16 sequences decoded together
  4. decode.json, decode_compile.json   tools.bench_decode: ours against transformers generate
  5. train.json, train_compile.json     tools.bench_train: an MTP step against a plain one
  6. b1_t07.json, b16_t07.json          steps 2 and 3 when sampling at temperature 0.7
"""
import json
import os
import sys

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
    return [r for r in bench["results"] if r["verify"] or r["rule"] == "ConfAdapt tau=0.9"]


# -----------------------------------------------------------------------------
# The figures: (step, figure, value, unit)


def fidelity_note(r):
    """Accuracy, and the columns that rank strategies where accuracy cannot: same as k=1, teacher NLL."""
    notes = [f"accuracy {100 * r['acc']:.1f}%"]
    if r.get("same_as_k1") is not None:
        notes.append(f"same as k=1 {100 * r['same_as_k1']:.1f}%")
    if r.get("teacher_nll") is not None:
        notes.append(f"teacher NLL {r['teacher_nll']:.3f}")
    return ", ".join(notes)


def tokens_per_pass(bench, step):
    """Step 1: every strategy's tokens per pass, with its accuracy and fidelity."""
    return [(step, f"{r['strategy']} ({fidelity_note(r)})", f"{r['eff_k']:.2f}", "tokens per pass")
            for r in bench["results"]]


def speedups(bench, step):
    """Steps 2, 3 and 6: ConfAdapt 0.9's and the verified rules' tokens/s over static k=1's."""
    return [(step, f"{r['strategy']}, {r['eff_k']:.2f} tokens per pass, "
                   f"{r['tokens_per_s']:.1f} tokens/s", f"{r['speedup']:.2f}", "x static k=1's tokens/s")
            for r in speed_rows(bench)]


def decode_rows(runs, step):
    """Step 4: each of our engines' tokens/s over transformers generate's (its own tokens/s if
    there is no transformers row)."""
    hf = next((r for r in runs["rows"] if r["run"] == "transformers generate"), None)
    return [(step, f"{r['run']}, {r['tokens_per_s']:.1f} tokens/s",
             *((f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}", "x transformers generate's tokens/s")
               if hf else (f"{r['tokens_per_s']:.1f}", "tokens/s (no transformers row)")))
            for r in runs["rows"] if r["run"].startswith("ours")]


def train_row(res, step):
    """Step 5: MTP step time over a plain next-token step's (equal MFU would give the FLOPs ratio)."""
    return [(step, f"MTP / NTP step time ({res['mtp_ms']:.1f} / {res['ntp_ms']:.1f} ms; "
             f"model-FLOPs ratio {res['flops_ratio']:.2f})", f"{res['ratio']:.2f}", "x NTP step time")]


STEPS = [  # (file, how to read it, the step and command that wrote it)
    ("gsm8k.json", tokens_per_pass, "1. bench.py, GSM8K test in one batch"),
    ("b1.json", speedups, "2. bench.py, batch 1"),
    ("b16.json", speedups, "3. bench.py, batch 16"),
    ("decode.json", decode_rows, "4. tools.bench_decode, batch-1 k=1"),
    ("decode_compile.json", decode_rows, "4. tools.bench_decode, batch-1 k=1, compiled"),
    ("train.json", train_row, "5. tools.bench_train, k drawn"),
    ("train_compile.json", train_row, "5. tools.bench_train, k drawn, compiled"),
    ("b1_t07.json", speedups, "6. bench.py, batch 1, temperature 0.7"),
    ("b16_t07.json", speedups, "6. bench.py, batch 16, temperature 0.7"),
]
OPTIONAL = {"b1_t07.json", "b16_t07.json"}


def summary(folder):
    """[(step, figure, value, unit)] for every step's file in `folder`."""
    rows, ended = [], endings(folder)
    for name, read, step in STEPS:
        res = load(folder, name)
        if res is None:
            how = ended.get(name[:-len(".json")], f"no {name}")
            if name not in OPTIONAL:
                rows.append((step, f"not measured ({how})", "-", "-"))
            continue
        if "results" in res and partial(res):
            step += " (partial: the run stopped early)"
        rows += read(res, step)
    return rows


def markdown(rows):
    lines = ["| step | figure | value | unit |", "| --- | --- | ---: | --- |"]
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
