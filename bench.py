"""
Accuracy vs acceleration vs wall clock for every decoding strategy (the paper's Table 1 layout).

    python bench.py --ckpt runs/mtp-synth/ckpt --data synthetic --baseline checkpoints/synth-teacher
    python bench.py --ckpt runs/smol/ckpt --data gsm8k --limit 200 --teacher checkpoints/smollm2-135m-instruct
    python bench.py --ckpt DIR --device cuda --static-k 1,2,3 --tau 0.9,0.8 --batch 16
    python bench.py --ckpt DIR --temperature 0.7 --samples 4 --static-k 1 --tau 0.9

A strategy is a decoding rule (decode.RULE_FLAGS: each flag takes a comma-separated list), verified
or not, or the step-0 checkpoint at k=1 (--baseline). For each: accuracy (the last number of
the answer, and strict "####"/"The answer is" extraction, against the number after "####" in the
data's answer), tokens per forward pass (effective k), the time of one pass (CUDA events on the
GPU), tokens/s and its speedup over static k=1 in the same process, fidelity to static k=1's
outputs, and the mean per-token NLL of the outputs under --teacher (the paper's validation
metric). --batch N decodes N problems per pass (fast/batch.py). --temperature T > 0: every
strategy samples, --samples S outputs per problem (output s of problem i draws from
row_seed(--seed, i, s), whatever --batch is), and a last column gives each row's accuracy minus
static k=1's, paired per problem. Writes OUT.md, OUT.json and (with matplotlib) OUT.png.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass

import torch

from compat.tokenizers import TokenizerError, check_vocab, load_tokenizer, same_tokenizer
from data import DataError, gsm8k, load_dataset, plain_prompt
from decode import (ENGINES, RULE_FLAGS, ConfAdapt, DecodeError, PassTimer, Rule, Static,
                    add_sampling_args, check_engine, check_output_path, check_request,
                    default_k_max, label, load_for_decoding, make_engine, resolve_device, row_seed,
                    untrained)
from display.pareto import pareto_plot
from display.progress import progress_printer
from fast.batch import generate_batch
from fast.lean import Lean
from model import CheckpointError, Transformer

# -----------------------------------------------------------------------------
# Prompts: zero-shot Q/A for our own models, chat, or the paper's few-shot chain of thought

N_SHOTS = 8


def strip_calculator(answer):
    """GSM8K answers carry <<48/2=24>> calculator notes; exemplars read better without them."""
    return re.sub(r"<<[^>]*>>", "", answer)


def fewshot_prefix(n_shots=N_SHOTS):
    """Fixed exemplars: the first n_shots problems of GSM8K *train* (never the test split)."""
    shots = []
    for row in gsm8k("train")[:n_shots]:
        reasoning, number = strip_calculator(row["answer"]).split("####")
        reasoning = " ".join(reasoning.split())
        shots.append(f"Q: {row['question']}\nA: Let's think step by step. {reasoning} "
                     f"The answer is {number.strip()}.\n\n")
    return "".join(shots)


def make_prompter(fmt, tok):
    """question -> prompt token ids."""
    if fmt == "qa":
        return lambda q: tok.encode(plain_prompt(q))
    if fmt == "chat":
        if not tok.chat:
            raise DecodeError("--format chat: this tokenizer has no chat format")
        return tok.prompt
    prefix = fewshot_prefix()
    return lambda q: tok.encode(prefix + f"Q: {q}\nA: Let's think step by step.")


def cut_answer(text):
    """The model's answer ends where it starts a new question."""
    return text.split("Q:")[0]


def new_question(tok):
    """generate_batch's stop_fn for few-shot prompts: a row stops once it starts a new "Q:"."""
    return lambda ids: "Q:" in tok.decode(ids[-8:])


# -----------------------------------------------------------------------------
# Reading the answers: GSM8K's "#### <number>", the model's last number or its "The answer is"

NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gold_answer(answer):
    """The number after '####' in a GSM8K answer (or an answer that is a number alone); None if
    there is none, and then no output can be scored right."""
    gold = answer.split("####")[-1].strip().replace(",", "")
    return gold if NUMBER.fullmatch(gold) else None


def extract_flexible(text):
    """The last number in the text (GSM8K 'flexible-extract')."""
    nums = NUMBER.findall(text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def extract_strict(text):
    """The number after '#### ' or 'The answer is ' (GSM8K 'strict-match')."""
    m = re.search(r"(?:####|The answer is)\s*\$?(-?[\d,]*\.?\d+)", text)
    return m.group(1).replace(",", "") if m else None


def same_number(a, b):
    try:
        return a is not None and b is not None and float(a) == float(b)
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# Running one strategy over the problems


def mean_se(xs):
    """Mean and standard error of a list of numbers (0/1 for accuracy)."""
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else 0.0
    return m, se


@torch.no_grad()
def teacher_nlls(teacher, pairs, scored=None, budget=2**30):
    """Summed NLL of each output under the teacher, and its token count, for a list of (prompt
    ids, output ids) pairs. Several pairs share a forward: right-padded, which changes nothing
    before the padding in a causal model, with logits read at the output positions only, in
    chunks of rows whose fp32 logits fit `budget` bytes. scored: a dict memo across calls (the
    verified rows repeat static k=1's outputs)."""
    scored = {} if scored is None else scored
    todo = list({(tuple(p), tuple(o)) for p, o in pairs if o and (tuple(p), tuple(o)) not in scored})
    todo.sort(key=lambda po: len(po[0]) + len(po[1]))     # similar lengths pad less
    width = max((len(o) for _, o in todo), default=1)
    rows = max(1, budget // (4 * width * teacher.cfg.vocab_size))
    for i in range(0, len(todo), rows):
        chunk = todo[i:i + rows]
        L = max(len(p) + len(o) for p, o in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        at = torch.zeros(len(chunk), width, dtype=torch.long)     # the logit predicting out[j]
        for r, (p, o) in enumerate(chunk):
            x[r, :len(p) + len(o)] = torch.tensor(p + o)
            at[r, :len(o)] = torch.arange(len(p) - 1, len(p) + len(o) - 1)
        logits = teacher(x.to(teacher.device), out_idx=at.to(teacher.device)).float()
        target = x.gather(1, (at + 1).clamp(max=L - 1)).to(teacher.device)
        nll = logits.logsumexp(-1) - logits.gather(-1, target[..., None]).squeeze(-1)
        for r, (p, o) in enumerate(chunk):
            scored[p, o] = (float(nll[r, :len(o)].sum()), len(o))
    return [scored[tuple(p), tuple(o)] if o else (0.0, 0) for p, o in pairs]


def first_difference(a, b):
    """Index of the first token where two outputs differ (the shorter length if one is a prefix
    of the other), None if they are the same."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fidelity(outputs, reference):
    """How many outputs are token-identical to the reference (the same model's static k=1), and
    the mean index of the first differing token over those that are not."""
    diffs = [first_difference(o, r) for o, r in zip(outputs, reference, strict=True)]
    differ = [d for d in diffs if d is not None]
    return {"same_as_k1": 1 - len(differ) / len(diffs),
            "first_diff": statistics.mean(differ) if differ else None}


def sampling_of(args):
    """generate_batch's sampling arguments for the options (none: greedy)."""
    if not args.temperature:
        return {}
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def per_problem(xs, samples):
    """Each problem's mean over its `samples` consecutive outputs."""
    return [statistics.mean(xs[i:i + samples]) for i in range(0, len(xs), samples)]


@dataclass(frozen=True)
class Strategy:
    """One row of the table: a model decoded with a rule, verified or not; baseline: the
    step-0 checkpoint (--baseline), not the student."""
    model: Transformer
    rule: Rule
    verify: bool = False
    baseline: bool = False

    @property
    def name(self):
        if self.baseline:
            return "baseline k=1 (step 0)"
        beyond = untrained(self.rule, self.model.cfg)    # more candidates than it was trained for?
        return label(self.rule, self.verify) + (" (beyond trained k_max)" if beyond else "")


def decode_items(strategy, tok, batch, prompts, args, engines, timer):
    """generate_batch on one batch of (problem index, sample index, problem): each output draws
    from row_seed(--seed, problem, sample), so a problem's samples do not depend on --batch."""
    model = strategy.model
    key = (id(model), len(prompts))           # one engine (cache, CUDA graphs) per shape
    if key not in engines:
        engines[key] = make_engine(model, len(prompts), args.engine, args.capacity)
    stop_fn = new_question(tok) if args.format == "fewshot" else None
    return generate_batch(model, prompts, strategy.rule, max_new_tokens=args.max_new,
                          stop_ids=tok.stop_ids, stop_fn=stop_fn, timer=timer,
                          verify=strategy.verify, engine=engines[key],
                          seed=[row_seed(args.seed, i, s) for i, s, _ in batch], **sampling_of(args))


def run_strategy(strategy, tok, problems, prompter, args, teacher, progress, engines, scored):
    """One strategy on every problem, --samples outputs each: accuracy (the mean over a
    problem's samples, then over problems, with its standard error), speed, teacher NLL."""
    timer = PassTimer(strategy.model.device)
    flex, strict, eff_k, nll, n_tok = [], [], [], 0.0, 0
    tokens, wall_ms, step_ms, steps, setup_ms = 0, 0.0, 0.0, 0, 0.0
    samples, outputs, confirmed, rejected, judged = [], [], 0, 0, []
    items = [(i, s, row) for i, row in enumerate(problems) for s in range(args.samples)]
    for start in range(0, len(items), args.batch):
        batch = items[start:start + args.batch]
        prompts = [prompter(row["question"]) for _, _, row in batch]
        outs, st = decode_items(strategy, tok, batch, prompts, args, engines, timer)
        outputs += outs
        tokens += st["tokens"]
        wall_ms += st["wall_ms"]                # less CUDA-graph captures (setup_ms)
        setup_ms += st["setup_ms"]
        step_ms += sum(st["ms"][1:])           # decoding passes; the first one is the prefill
        steps += len(st["ms"]) - 1
        for j, ((_, _, row), ids, out, rs) in enumerate(zip(batch, prompts, outs, st["rows"]),
                                                         start):
            text = cut_answer(tok.decode(out))
            gold = gold_answer(row["answer"])
            flex.append(float(same_number(extract_flexible(text), gold)))
            strict.append(float(same_number(extract_strict(text), gold)))
            eff_k.append(rs["effective_k"])
            confirmed, rejected = confirmed + rs["confirmed"], rejected + rs["rejected"]
            if teacher is not None:      # the output as scored: cut where the answer ends
                judged.append((ids, tok.encode(text) if text != tok.decode(out) else out))
            if j < 3:
                samples.append(text)
            progress(j + 1)
    if teacher is not None:
        for total, n in teacher_nlls(teacher, judged, scored):
            nll, n_tok = nll + total, n_tok + n
    wall_s = wall_ms / 1000
    acc, acc_se = mean_se(per_problem(flex, args.samples))
    sacc, sacc_se = mean_se(per_problem(strict, args.samples))
    rule = strategy.rule
    return {"strategy": strategy.name, "rule": rule.name, "family": rule.family,
            "verify": strategy.verify, "baseline": strategy.baseline, "n": len(problems),
            "acc": acc, "acc_se": acc_se, "strict": sacc,
            "strict_se": sacc_se, "eff_k": statistics.mean(eff_k),
            "eff_k_std": statistics.pstdev(eff_k), "tokens": tokens, "decode_s": wall_s,
            "ms_per_pass": step_ms / max(1, steps), "tokens_per_s": tokens / wall_s,
            "capture_s": setup_ms / 1000,
            "teacher_nll": nll / n_tok if n_tok else None, "samples": samples,
            "confirmed": confirmed, "rejected": rejected, "outputs": outputs,
            "correct": [int(c) for c in flex]}    # per output, a problem's samples together


# -----------------------------------------------------------------------------
# Output: markdown table, JSON, Pareto plot


def table(results, header, sampled=False):
    """The markdown table; sampled: one more column, the accuracy's difference from static k=1
    (paired per problem). The fidelity columns are for greedy decoding: '-' when sampled."""
    lines = [header, "",
             "| strategy | accuracy (flex) | strict | effective k | ms/pass | tokens/s | "
             "wall-clock speedup | teacher NLL | same as k=1 | first diff |"
             + (" accuracy - k=1 (paired) |" if sampled else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
             + (" --- |" if sampled else "")]
    for r in results:
        nll = f"{r['teacher_nll']:.3f}" if r.get("teacher_nll") is not None else "-"
        same = f"{100 * r['same_as_k1']:.1f}%" if r.get("same_as_k1") is not None else "-"
        diff = f"{r['first_diff']:.1f}" if r.get("first_diff") is not None else "-"
        paired = f"{100 * r['acc_diff']:+.1f} ± {100 * r['acc_diff_se']:.1f} |" \
            if r.get("acc_diff") is not None else "- |"
        lines.append(f"| {r['strategy']} | {100 * r['acc']:.1f} ± {100 * r['acc_se']:.1f} | "
                     f"{100 * r['strict']:.1f} ± {100 * r['strict_se']:.1f} | "
                     f"{r['eff_k']:.2f} ± {r['eff_k_std']:.2f} | {r['ms_per_pass']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {nll} | {same} | {diff} |"
                     + (f" {paired}" if sampled else ""))
    return "\n".join(lines) + "\n"


def paired_difference(correct, reference, samples):
    """Accuracy minus a reference's, with its standard error, paired per problem: the mean over
    problems of (a problem's mean over its samples - the reference's on the same problem)."""
    return mean_se([a - b for a, b in zip(per_problem(correct, samples),
                                          per_problem(reference, samples), strict=True)])


def write_results(results, header, args, out):
    """Speedups and, against static k=1, fidelity (greedy: the same tokens?) or the accuracy
    difference (sampling: the same distribution?), then OUT.md and OUT.json; returns the table.
    Nothing until static k=1 is done (only the --baseline row runs before it)."""
    k1 = next((r for r in results if r["rule"] == Static(1).name and not r["verify"]
               and not r["baseline"]), None)
    if k1 is None:
        return None
    for r in results:
        r["speedup"] = r["tokens_per_s"] / k1["tokens_per_s"]
        if not r["baseline"] and not args.temperature:   # against the student's own k=1 output
            r.update(fidelity(r["outputs"], k1["outputs"]))
        elif not r["baseline"] and r is not k1:
            r["acc_diff"], r["acc_diff_se"] = paired_difference(r["correct"], k1["correct"],
                                                                args.samples)
    md = table(results, header, sampled=bool(args.temperature))
    try:
        with open(out + ".md", "w") as f:
            f.write(md)
        with open(out + ".json", "w") as f:
            json.dump({"header": header, "args": vars(args),    # outputs: big, and only for fidelity
                       "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]},
                      f, indent=1)
    except OSError as e:                # checked before the work, so: a full disk, a folder gone
        print(f"error: could not write {out}.md and .json: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    return md


# -----------------------------------------------------------------------------
# The command line: the strategies asked for, checked and sized before any decoding

# the values each rule flag of decode.RULE_FLAGS runs by default (a flag not here: none)
DEFAULT_RULES = {"--static-k": "1,2,3,4,5", "--tau": "0.99,0.95,0.9,0.8,0.7,0.6"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="accuracy vs acceleration vs wall clock")
    p.add_argument("--ckpt", required=True, help="the MTP checkpoint to evaluate")
    p.add_argument("--baseline", help="the step-0 checkpoint, evaluated at k=1 (optional)")
    p.add_argument("--teacher", help="checkpoint whose per-token NLL of the outputs is reported")
    p.add_argument("--data", default="synthetic", help="synthetic | gsm8k | a test .jsonl")
    p.add_argument("--limit", type=int, default=200,
                   help="number of test problems (synthetic: the 200 held-out ones, then more from "
                        "the same held-out stream)")
    for flag, (kind, _, help) in RULE_FLAGS.items():
        p.add_argument(flag, default=DEFAULT_RULES.get(flag, ""),
                       help=f"{help}: a comma-separated list of values")
    p.add_argument("--taus", dest="tau", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # older --tau
    p.add_argument("--k-max", type=int, help="ConfAdapt candidates per pass (default: checkpoint's)")
    p.add_argument("--format", choices=["auto", "qa", "chat", "fewshot"], default="auto",
                   help="auto: qa for synthetic, fewshot (8-shot CoT) for gsm8k")
    p.add_argument("--max-new", type=int, default=None,
                   help="most new tokens per problem (default: 256, or what the context leaves "
                        "after the longest prompt if that is less)")
    p.add_argument("--batch", type=int, default=1,
                   help="problems decoded together, one forward pass per step for all of them")
    p.add_argument("--no-verified", action="store_true",
                   help="skip the verified rows (static k_max and every other rule, output == static k=1)")
    p.add_argument("--lean", action="store_true",
                   help="add a lean row (candidates follow recent acceptance) after each rule but static k")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one) | cpu | cuda")
    p.add_argument("--dtype", default="fp32",
                   help="fp32 | bf16 (bf16: a wide pass and a one-token pass round differently, so "
                        "near-tie tokens can flip; verified rows then only warn when they differ)")
    p.add_argument("--engine", default="eager", choices=ENGINES,
                   help="eager | graphs (CUDA graphs) | compile (torch.compile + CUDA graphs) | "
                        "static (the graphs' cache layout, uncaptured)")
    add_sampling_args(p, "sampling seed: output s of problem i draws from row_seed(seed, i, s)")
    p.add_argument("--samples", type=int, default=1,
                   help="outputs per problem when sampling; accuracy is their mean")
    p.add_argument("--out", default=None, help="output prefix (default: bench_<data> in the ckpt's parent)")
    return p.parse_args(argv)


def rules_asked(a):
    """The rules of the rule flags' comma-separated values, static k=1 (the reference) first."""
    asked = [Static(1)]
    for flag, (kind, make, _) in RULE_FLAGS.items():
        values = getattr(a, flag[2:].replace("-", "_"))
        try:
            rules = [make(kind(v), a) for v in values.split(",") if v.strip()]
        except ValueError:
            raise DecodeError(f"{flag} takes comma-separated {kind.__name__} values, got {values!r}")
        asked += [r for r in rules if r not in asked]
    return asked


def strategies_for(a, model, baseline):
    """The table's rows: the step-0 baseline, every rule asked for (static k first, a lean row
    after each other rule with --lean), then verified: static k_max and every other rule."""
    rules = rules_asked(a)
    statics = [r for r in rules if isinstance(r, Static)]
    others = [x for r in rules if not isinstance(r, Static) for x in ([r, Lean(r)] if a.lean else [r])]
    strategies = [Strategy(model, r) for r in statics + others]
    if not a.no_verified and model.cfg.mtp_token_id is not None:
        k_max = Static(a.k_max or default_k_max(model.cfg))
        strategies += [Strategy(model, r, verify=True) for r in [k_max] + others]
    if baseline is not None:
        strategies.insert(0, Strategy(baseline, Static(1), baseline=True))
    return strategies


def size_run(a, model, strategies, problems, prompter):
    """Check every strategy now (bad settings fail before an hour of decoding) and set
    a.max_new and a.capacity (the static cache of --engine graphs) from the longest prompt."""
    if a.samples < 1 or (a.samples > 1 and not a.temperature):
        raise DecodeError("--samples must be >= 1, and above 1 only with --temperature > 0 "
                          "(greedy decoding gives the same output every time)")
    check_engine(a.engine, model.device)
    # the sampling options as given: greedy, a top-k or top-p is an error; the most candidates read
    widest = max(check_request(s.model, [0], s.rule, a.temperature, a.top_k, a.top_p)
                 for s in strategies)
    longest = max(len(prompter(row["question"])) for row in problems)
    context = min(s.model.cfg.max_seq_len for s in strategies)
    if longest >= context:
        shorter = ("a shorter --format (qa or chat instead of the 8-shot fewshot)"
                   if a.format == "fewshot" else "shorter questions")
        raise DecodeError(f"the longest prompt ({longest} tokens, --format {a.format}) leaves no room "
                          f"for an answer in the model's context ({context}): use {shorter}")
    if a.max_new is None:
        a.max_new = max(1, min(256, context - longest))
    if longest + a.max_new > context:
        raise DecodeError(f"the longest prompt ({longest} tokens) + --max-new {a.max_new} "
                          f"exceeds the model's context ({context}): lower "
                          "--max-new or use a shorter --format")
    # the longest prompt, then every pass's slots. One prompt caches its real tokens only; a
    # batch shares slots, and each pass adds the widest row's new tokens (at most `widest`,
    # one pass per committed token at worst)
    grown = a.max_new if a.batch == 1 else widest * (a.max_new + 1)
    a.capacity = longest + grown + 2 * widest


def same_tokens_as(path, flag, tok, a):
    """--teacher and --baseline read and write the token ids of --ckpt's tokenizer: theirs must
    be the same one (another would score, or decode, other text than the ids say)."""
    try:
        theirs = load_tokenizer(path)
    except TokenizerError as e:
        raise DecodeError(f"{flag}: {e}") from None
    if not same_tokenizer(theirs, tok):
        raise DecodeError(f"{flag} {path} has another tokenizer than --ckpt {a.ckpt}: its numbers "
                          "would be about other text; give a checkpoint of the same tokenizer")


def load(a):
    """(model, tokenizer, problems, prompter, teacher, baseline, strategies) for the options."""
    check_output_path(a.out + ".md", "--out")
    a.device = resolve_device(a.device)
    model = load_for_decoding(a.ckpt, a.device, a.dtype)
    tok = load_tokenizer(a.ckpt)
    check_vocab(tok, model.cfg, a.ckpt)
    for path, flag in ((a.teacher, "--teacher"), (a.baseline, "--baseline")):
        if path:
            same_tokens_as(path, flag, tok, a)
    if a.limit < 1 or a.batch < 1 or (a.max_new is not None and a.max_new < 1):
        raise DecodeError("--limit, --batch and --max-new must be >= 1")
    problems = load_dataset(a.data, "test", a.limit)
    unread = sum(gold_answer(row["answer"]) is None for row in problems)
    if unread:
        print(f"warning: {unread} of {len(problems)} answers in {a.data} do not end in '#### N': no "
              "number to score against, so accuracy cannot be read for them (counted wrong)",
              file=sys.stderr)
    a.format = a.format if a.format != "auto" else ("fewshot" if a.data == "gsm8k" else "qa")
    prompter = make_prompter(a.format, tok)
    teacher = load_for_decoding(a.teacher, a.device) if a.teacher else None   # fp32: the judge
    baseline = load_for_decoding(a.baseline, a.device, a.dtype) if a.baseline else None
    for path, m in ((a.teacher, teacher), (a.baseline, baseline)):
        if m is not None:
            check_vocab(tok, m.cfg, path)
    strategies = strategies_for(a, model, baseline)
    size_run(a, model, strategies, problems, prompter)
    return model, tok, problems, prompter, teacher, strategies


def report(results, md, a, device, out):
    """The table, the plot and the JSON line; exit 2 if a verified output differs from static
    k=1 in fp32 (in bf16 a wide pass and a one-token pass may round a near tie differently)."""
    print(md)
    print(f"wrote {out}.md and {out}.json")
    pareto_plot(results, out + ".png")
    best = max((r for r in results if r["family"] == ConfAdapt.family and not r["verify"]),
               key=lambda r: r["eff_k"], default=None)
    line = {"bench": a.data, "n": results[0]["n"], "device": device, "batch": a.batch,
            "results": {r["strategy"]: [round(r["acc"], 4), round(r["eff_k"], 3),
                                        round(r["speedup"], 3)] for r in results},
            "max_confadapt_eff_k": best and round(best["eff_k"], 3)}
    if a.temperature:
        line["sampling"] = {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
                            "seed": a.seed, "samples": a.samples}
    print(json.dumps(line))
    # fidelity is a greedy check: sampled outputs differ, only their distribution is k=1's
    broken = [r for r in results if r["verify"] and r.get("same_as_k1", 1) < 1]
    for r in broken:
        n = round((1 - r["same_as_k1"]) * r["n"])
        line = (f"{r['strategy']}: {n} of {r['n']} outputs differ from static k=1 (first at token "
                f"{r['first_diff']:.1f} on average)")
        print(("warning (bf16): " if a.dtype == "bf16" else "error: ") + line, file=sys.stderr)
    if broken and a.dtype != "bf16":
        sys.exit(2)


def main(argv=None):
    a = parse_args(argv)
    out = a.out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.ckpt)),
                                        f"bench_{os.path.basename(a.data)}")
    try:
        model, tok, problems, prompter, teacher, strategies = load(a)
    except (DecodeError, CheckpointError, TokenizerError, DataError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    header = (f"{a.data}, {len(problems)} problems, format {a.format}, checkpoint {a.ckpt}, "
              f"device {device}, {a.dtype}, engine {a.engine}, batch {a.batch}, " + (
                  f"temperature {a.temperature}, top-k {a.top_k}, top-p {a.top_p}, seed {a.seed}, "
                  f"{a.samples} samples per problem" if a.temperature else "greedy"))

    # warm-up, discarded: the first passes pay for allocation, kernel selection and (--engine
    # graphs) the k=1 pass's capture; its engine is the one the first batch then uses
    first = [prompter(row["question"]) for row in problems[:a.batch]]
    engines = {(id(model), len(first)): make_engine(model, len(first), a.engine, a.capacity)}
    generate_batch(model, first, Static(1), max_new_tokens=16, engine=engines[id(model), len(first)])

    n = len(problems) * a.samples              # outputs per strategy
    progress = progress_printer(len(strategies) * n, n)
    results, scored = [], {}                  # scored: the teacher's NLL of each output, once
    for i, strategy in enumerate(strategies):
        results.append(run_strategy(strategy, tok, problems, prompter, a, teacher,
                                    lambda j: progress(i, strategy.name, j), engines, scored))
        if len(results) < len(strategies):      # a killed run keeps the strategies done so far
            write_results(results, header + f" (partial: {len(results)} of {len(strategies)} "
                          "strategies)", a, out)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    report(results, write_results(results, header, a, out), a, device, out)


if __name__ == "__main__":
    main()
