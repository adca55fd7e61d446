"""
Built-in grade-school math word problems in GSM8K's format ({"question", "answer"}, the answer
ending in "#### <number>"), fully determined by a seed: the embedded default's training data
and its held-out test set, no file needed. data.load_dataset("synthetic", ...) reads them.
"""
import random

NAMES = [("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dan", "he"), ("Emma", "she"),
         ("Finn", "he"), ("Grace", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"),
         ("Lily", "she"), ("Max", "he"), ("Nora", "she"), ("Omar", "he"), ("Ruby", "she"), ("Sam", "he")]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "cards",
         "stamps", "beads", "oranges", "toys"]
GAINS = [("buys", "buying"), ("finds", "finding"), ("gets", "getting"), ("picks up", "picking up")]
LOSSES = [("gives away", "giving away"), ("loses", "losing"), ("sells", "selling"), ("uses", "using")]
THINGS = ["book", "game", "ball", "kite", "hat", "puzzle"]


def _chain(r):
    """Start amount, then 2-4 gains or losses, one line of arithmetic for each."""
    (name, he), item = r.choice(NAMES), r.choice(ITEMS)
    have = r.randint(10, 60)
    q = [f"{name} has {have} {item}."]
    a = [f"{name} starts with {have} {item}."]
    for step in range(r.randint(2, 4)):
        then = "Then " + he if step else he.capitalize()
        if r.random() < 0.5 or have < 10:
            n = r.randint(2, 40)
            verb, ing = r.choice(GAINS)
            q.append(f"{then} {verb} {n} more.")
            a.append(f"After {ing} {n}, {name} has {have} + {n} = {have + n} {item}.")
            have += n
        else:
            n = r.randint(2, have - 1)
            verb, ing = r.choice(LOSSES)
            q.append(f"{then} {verb} {n}.")
            a.append(f"After {ing} {n}, {name} has {have} - {n} = {have - n} {item}.")
            have -= n
    q.append(f"How many {item} does {name} have now?")
    return q, a, have


def _boxes(r):
    (name, he), item = r.choice(NAMES), r.choice(ITEMS)
    g, n = r.randint(2, 9), r.randint(2, 12)
    t = g * n
    e = r.randint(1, t - 1)
    q = [f"{name} buys {g} boxes of {item}.", f"Each box holds {n} {item}.",
         f"{he.capitalize()} gives away {e} of them.", f"How many {item} does {name} have left?"]
    a = [f"{g} boxes of {n} {item} hold {g} * {n} = {t} {item}.",
         f"After giving away {e}, {name} has {t} - {e} = {t - e} {item} left."]
    return q, a, t - e


def _change(r):
    (name, _), thing = r.choice(NAMES), r.choice(THINGS)
    p = r.randint(2, 12)
    k = r.randint(2, min(9, 100 // p))
    bill = 100 if p * k > 50 else r.choice([50, 100])
    q = [f"A {thing} costs {p} dollars.", f"{name} buys {k} of them and pays with a {bill} dollar bill.",
         f"How much change does {name} get?"]
    a = [f"{k} of them cost {k} * {p} = {k * p} dollars.",
         f"The change is {bill} - {k * p} = {bill - k * p} dollars."]
    return q, a, bill - k * p


def _compare(r):
    (x, _), (y, _), (z, _) = r.sample(NAMES, 3)
    item = r.choice(ITEMS)
    n, m = r.randint(2, 12), r.randint(2, 5)
    b = n * m
    d = r.randint(1, b - 1)
    c = b - d
    q = [f"{x} has {n} {item}.", f"{y} has {m} times as many {item} as {x}.",
         f"{z} has {d} fewer {item} than {y}.", f"How many {item} do they have together?"]
    a = [f"{y} has {n} * {m} = {b} {item}.", f"{z} has {b} - {d} = {c} {item}.",
         f"Together they have {n} + {b} + {c} = {n + b + c} {item}."]
    return q, a, n + b + c


def _share(r):
    (name, _), item = r.choice(NAMES), r.choice(ITEMS)
    n, each = r.randint(2, 9), r.randint(2, 12)
    t, e = n * each, r.randint(2, 20)
    q = [f"{name} shares {t} {item} equally among {n} friends.",
         f"Then each friend gets {e} more {item}.", f"How many {item} does each friend have?"]
    a = [f"Each friend gets {t} / {n} = {each} {item}.",
         f"With {e} more, each friend has {each} + {e} = {each + e} {item}."]
    return q, a, each + e


def _savings(r):
    (name, he), thing = r.choice(NAMES), r.choice(THINGS)
    w, s = r.randint(2, 9), r.randint(2, 12)
    t = w * s
    spend = r.randint(1, t - 1)
    q = [f"{name} saves {s} dollars every week for {w} weeks.",
         f"Then {he} spends {spend} dollars on a {thing}.", f"How much money does {name} have left?"]
    a = [f"{name} saves {w} * {s} = {t} dollars.",
         f"After spending {spend}, {name} has {t} - {spend} = {t - spend} dollars left."]
    return q, a, t - spend


TEMPLATES = [_chain, _boxes, _change, _compare, _share, _savings]


def synthetic_problems(n, seed=0):
    """n grade-school math problems in GSM8K's format, fully determined by seed."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a, result = r.choice(TEMPLATES)(r)
        rows.append({"question": " ".join(q), "answer": "\n".join(a) + f"\n#### {result}"})
    return rows


# test problems come from a seed range training never uses
SYNTHETIC_TEST_SEED = 1_000_003
SYNTHETIC_TRAIN = 50_000      # training problems (seed 0); the first 200 of the test seed are the test set
