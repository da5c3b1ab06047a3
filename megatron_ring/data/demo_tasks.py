"""Small reasoning tasks with step-by-step teacher solutions, one generator per domain.

Each generator is a function of a `random.Random` (never the global one), so the demo data is a
pure function of the seed. Solutions are algorithmic and always phrased the same way, so that a
tiny model distilled on a few thousand of them on CPU can visibly learn them.

A task is a dict: domain, kind, key (the question without its shuffled options: what held-out
disjointness is judged on), prompt, solution, and either answer (math: the number, science: the
letter) or the code fields of the released Ring-lite RL data (code_test_cases, code_language,
groundtruth, test_type, fn_name for function-call problems)."""

from __future__ import annotations

import json
import random
import string

LETTERS = "ABCD"


# ---------------------------------------------------------------- math

def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _math(kind: str, question: str, answer: int, steps: list[str], restate: str | None = None) -> dict:
    prompt = f"{'Solve' if kind == 'linear' else 'Compute'} {question}."
    closing = f"So {restate}={answer}. " if restate else ""
    solution = " ".join(steps) + f" {closing}\\boxed{{{answer}}}"
    return {"domain": "math", "kind": kind, "key": prompt, "prompt": prompt, "solution": solution,
            "answer": str(answer)}


def _carry_steps(columns: list[tuple[str, int]]) -> list[str]:
    """Right-to-left column steps "7+5=12, write 2 carry 1." for a list of (expression, value)
    columns; the last column is written out whole."""
    steps, carry = [], 0
    for i, (expr, value) in enumerate(columns):
        total = value + carry
        step = f"{expr}{f'+{carry}' if carry else ''}={total}"
        if i < len(columns) - 1:
            step += f", write {total % 10}" + (f" carry {total // 10}" if total >= 10 else "")
            carry = total // 10
        steps.append(step + ".")
    return steps


def addition(rng: random.Random, digits: int = 2) -> dict:
    a, b = _number(rng, digits), _number(rng, digits)
    columns = [(f"{x}+{y}", int(x) + int(y)) for x, y in zip(str(a)[::-1], str(b)[::-1])]
    return _math("add", f"{a}+{b}", a + b, _carry_steps(columns), f"{a}+{b}")


def multiplication(rng: random.Random, digits: int = 2) -> dict:
    """A one-digit factor times a `digits`-digit one, in either order in the question."""
    k, n = rng.randint(2, 9), _number(rng, digits)
    question = f"{k}*{n}" if rng.random() < 0.5 else f"{n}*{k}"
    columns = [(f"{k}*{d}", k * int(d)) for d in str(n)[::-1]]
    return _math("mul", question, k * n, _carry_steps(columns), question)


def subtraction(rng: random.Random, digits: int = 2) -> dict:
    """a-b with a > b, column by column with borrows ("12-7=5, write 5 borrow 1.")."""
    a, b = sorted(rng.sample(range(10 ** (digits - 1), 10 ** digits), 2), reverse=True)
    steps, borrow = [], 0
    pairs = list(zip(str(a)[::-1], str(b)[::-1]))
    for i, (x, y) in enumerate(pairs):
        x, y = int(x), int(y)
        last = i == len(pairs) - 1
        lend = not last and x - borrow < y
        top = x + 10 * lend
        result = top - y - borrow
        step = f"{top}-{y}{'-1' if borrow else ''}={result}"
        if not last:
            step += f", write {result}" + (" borrow 1" if lend else "")
        steps.append(step + ".")
        borrow = int(lend)
    return _math("sub", f"{a}-{b}", a - b, steps, f"{a}-{b}")


def linear_equation(rng: random.Random, digits: int = 2) -> dict:
    """ax+b=c or ax-b=c with a positive integer solution."""
    a, x = rng.randint(2, 9), rng.randint(1, max(2, 10 ** digits // 8))
    if rng.random() < 0.5:
        b = rng.randint(1, 10 ** digits // 5)
        c = a * x + b
        question, isolate = f"{a}x+{b}={c}", f"{a}x={c}-{b}={c - b}."
    else:
        b = rng.randint(1, min(10 ** digits // 5, a * x - 1))
        c = a * x - b
        question, isolate = f"{a}x-{b}={c}", f"{a}x={c}+{b}={c + b}."
    return _math("linear", question, x, [isolate, f"x={a * x}/{a}={x}."])


MATH_KINDS = ((addition, 0.3), (subtraction, 0.25), (multiplication, 0.2), (linear_equation, 0.25))


def math_task(rng: random.Random, digits: int = 2) -> dict:
    """`digits` is the difficulty knob: operand size in digits (2 gives 47+85, 7*86, 3x+5=20)."""
    make = rng.choices([m for m, _ in MATH_KINDS], [w for _, w in MATH_KINDS])[0]
    return make(rng, digits)


# ---------------------------------------------------------------- code

def _code(kind: str, prompt: str, reason: str, lines: list[str], tests: list[dict],
          fn_name: str | None = None) -> dict:
    program = "\n".join(lines) + "\n"
    task = {"domain": "code", "kind": kind, "key": prompt, "prompt": prompt,
            "solution": f"{reason}\n```python\n{program}```",
            "code_test_cases": tests, "code_language": "python", "groundtruth": program,
            "test_type": "function" if fn_name else "stdio"}
    if fn_name:
        task["fn_name"] = fn_name
    return task


def _stdio_tests(inputs: list[str], solve) -> list[dict]:
    """Expected outputs come from `solve`, a Python function written independently of the
    teacher program's text, so running the program against them is a real check."""
    return [{"input": text + "\n", "output": solve(text) + "\n"} for text in inputs]


def _function_tests(arg_lists: list[list], fn) -> list[dict]:
    return [{"input": json.dumps(args), "output": json.dumps(fn(*args))} for args in arg_lists]


def _ints(rng: random.Random, n: int, lo: int = -50, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _word(rng: random.Random, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 9)))


def code_weighted_sum(rng):
    p, q = rng.randint(2, 20), rng.randint(2, 20)
    inputs = [" ".join(map(str, _ints(rng, 2))) for _ in range(3)]
    return _code("weighted_sum", f"Read two integers a and b from one line and print {p}*a+{q}*b.",
                 f"Read a and b, then print {p}*a+{q}*b.",
                 ["a, b = map(int, input().split())", f"print({p} * a + {q} * b)"],
                 _stdio_tests(inputs, lambda t: str(p * int(t.split()[0]) + q * int(t.split()[1]))))


def code_count_chars(rng):
    chars = "".join(sorted(rng.sample(string.ascii_lowercase, rng.randint(2, 4))))
    alphabet = chars + "bdfhklmnrtz"  # inputs that contain the counted letters often
    inputs = [_word(rng, alphabet) + " " + _word(rng, alphabet) for _ in range(3)]
    return _code("count_chars", f'Read a line and print how many of its characters are in "{chars}".',
                 f'Count the characters of the line that are in "{chars}".',
                 ["s = input()", f'print(sum(ch in "{chars}" for ch in s))'],
                 _stdio_tests(inputs, lambda t: str(sum(t.count(c) for c in chars))))


CASES = {"": "", " in upper case": ".upper()", " capitalized": ".capitalize()"}  # prompt -> method


def code_reverse(rng):
    k, sep, case = rng.randint(2, 9), rng.choice("-+,:;|/*#=_~"), rng.choice(list(CASES))
    change = {"": str, " in upper case": str.upper, " capitalized": str.capitalize}[case]
    inputs = [_word(rng) for _ in range(3)]
    return _code("reverse", f'Read a word and print it reversed{case}, {k} times joined by "{sep}".',
                 f'Reverse the word with s[::-1] and join {k} copies with "{sep}".',
                 [f"s = input()[::-1]{CASES[case]}", f'print("{sep}".join([s] * {k}))'],
                 _stdio_tests(inputs, lambda t: sep.join([change(t[::-1])] * k)))


def code_list_extreme(rng):
    which, op, k = rng.choice(("largest", "smallest")), rng.choice(("plus", "times")), rng.randint(2, 99)
    fn, sym = ("max" if which == "largest" else "min"), ("+" if op == "plus" else "*")
    inputs = [" ".join(map(str, _ints(rng, rng.randint(3, 6)))) for _ in range(3)]

    def solve(text):
        xs = [int(v) for v in text.split()]
        best = max(xs) if fn == "max" else min(xs)
        return str(best + k if sym == "+" else best * k)
    return _code("list_extreme", f"Read integers from one line and print the {which} one {op} {k}.",
                 f"Take the {fn} of the list, then apply {sym}{k}.",
                 ["xs = list(map(int, input().split()))", f"print({fn}(xs) {sym} {k})"],
                 _stdio_tests(inputs, solve))


def code_square(rng):
    p, k = rng.randint(2, 9), rng.randint(1, 99)
    inputs = [str(n) for n in rng.sample(range(0, 40), 3)]
    return _code("square", f"Read an integer n and print {p}*n*n+{k}.",
                 f"Square n, multiply by {p} and add {k}.",
                 ["n = int(input())", f"print({p} * n * n + {k})"],
                 _stdio_tests(inputs, lambda t: str(p * int(t) ** 2 + k)))


WORDS = ("Fizz", "Buzz", "Ping", "Pong", "Zap", "Hop", "Tick", "Boom", "Bang", "Pop", "Zip", "Tock",
         "Fuzz", "Bee", "Moo", "Yes")


def code_fizz(rng):
    a, word, negate = rng.randint(2, 12), rng.choice(WORDS), rng.random() < 0.5
    rel, cmp = ("not divisible", "!=") if negate else ("divisible", "==")
    inputs = [str(n) for n in rng.sample(range(1, 16), 3)]
    solve = lambda t: "\n".join(word if (i % a == 0) != negate else str(i) for i in range(1, int(t) + 1))  # noqa: E731
    return _code("fizz", f'Read n. For i from 1 to n print "{word}" if i is {rel} by {a}, else print i.',
                 f"Loop i from 1 to n and test i % {a} {cmp} 0.",
                 ["n = int(input())", "for i in range(1, n + 1):", f"    if i % {a} {cmp} 0:",
                  f'        print("{word}")', "    else:", "        print(i)"],
                 _stdio_tests(inputs, solve))


def code_fn_linear(rng):
    p, q = rng.randint(2, 20), rng.randint(2, 20)
    args = [_ints(rng, 2) for _ in range(3)]
    return _code("fn_linear", f"Write a function f(a, b) that returns {p}*a-{q}*b.",
                 f"Return {p}*a-{q}*b directly.",
                 ["def f(a, b):", f"    return {p} * a - {q} * b"],
                 _function_tests(args, lambda a, b: p * a - q * b), fn_name="f")


def code_fn_count(rng):
    rel, k = rng.choice(("greater than", "less than", "equal to")), rng.randint(-50, 99)
    sym = {"greater than": ">", "less than": "<", "equal to": "=="}[rel]
    test = {">": lambda x: x > k, "<": lambda x: x < k, "==": lambda x: x == k}[sym]
    args = [[_ints(rng, rng.randint(2, 6), k - 5, k + 5)] for _ in range(3)]
    return _code("fn_count", f"Write a function f(xs) that returns how many elements of the list xs are {rel} {k}.",
                 f"Count the elements x with x {sym} {k}.",
                 ["def f(xs):", f"    return sum(1 for x in xs if x {sym} {k})"],
                 _function_tests(args, lambda xs: sum(map(test, xs))), fn_name="f")


def code_fn_replace(rng):
    c, d = rng.sample(string.ascii_lowercase, 2)
    args = [[_word(rng, c + "aeiost")] for _ in range(3)]
    return _code("fn_replace", f'Write a function f(s) that returns s with every "{c}" replaced by "{d}".',
                 "Use str.replace.",
                 ["def f(s):", f'    return s.replace("{c}", "{d}")'],
                 _function_tests(args, lambda s: "".join(d if ch == c else ch for ch in s)), fn_name="f")


def code_fn_multiples(rng):
    k = rng.randint(2, 400)
    args = [[n] for n in rng.sample(range(0, 20), 3)]
    return _code("fn_multiples", f"Write a function f(n) that returns the sum of the first n multiples of {k}.",
                 f"Add {k}*i for i from 1 to n.",
                 ["def f(n):", f"    return sum({k} * i for i in range(1, n + 1))"],
                 _function_tests(args, lambda n: k * n * (n + 1) // 2), fn_name="f")


def code_fn_map(rng):
    k, m = rng.randint(2, 9), rng.randint(1, 50)
    args = [[_ints(rng, rng.randint(1, 4), -9, 9)] for _ in range(3)]
    return _code("fn_map", f"Write a function f(xs) that returns the list of {k}*x+{m} for each x in xs.",
                 "Build the new list with a list comprehension.",
                 ["def f(xs):", f"    return [{k} * x + {m} for x in xs]"],
                 _function_tests(args, lambda xs: [k * x + m for x in xs]), fn_name="f")


CODE_KINDS = (code_weighted_sum, code_count_chars, code_reverse, code_list_extreme, code_square, code_fizz,
              code_fn_linear, code_fn_count, code_fn_replace, code_fn_multiples, code_fn_map)


def code_task(rng: random.Random) -> dict:
    return rng.choice(CODE_KINDS)(rng)


# ---------------------------------------------------------------- science

def _choice(kind: str, rng: random.Random, stem: str, correct: str, distractors: list[str], reason: str) -> dict:
    """A four-option question; the options are shuffled so the letters are uniform."""
    wrong = list(dict.fromkeys(d for d in distractors if d != correct))
    assert len(wrong) >= 3, (stem, distractors)
    options = [correct] + rng.sample(wrong, 3)
    rng.shuffle(options)
    letter = LETTERS[options.index(correct)]
    prompt = stem + "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, options))
    return {"domain": "science", "kind": kind, "key": stem, "prompt": prompt,
            "solution": f"{reason}, option {letter}. \\boxed{{{letter}}}", "answer": letter}


UNITS = (  # (large unit, small unit, how many small in one large)
    ("meter", "centimeters", 100), ("kilometer", "meters", 1000), ("kilogram", "grams", 1000),
    ("hour", "minutes", 60), ("minute", "seconds", 60), ("liter", "milliliters", 1000),
    ("day", "hours", 24), ("centimeter", "millimeters", 10),
)


def science_units(rng):
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 99)
    answer = n * factor
    wrong = [answer * 10, n + factor, answer + factor, answer - factor, n * factor // 10 if factor > 10 else answer * 2]
    return _choice("units", rng, f"How many {small} are in {n} {big}s?", str(answer), [str(w) for w in wrong],
                   f"1 {big} = {factor} {small}, so {n} {big}s = {n}*{factor} = {answer} {small}")


FORMULAS = (  # (kind, question with {x} {y}, law, unit, divide): the answer is x*y, or x/y when divide
    ("speed", "A car travels {x} km in {y} hours. What is its average speed?", "speed = distance/time", "km/h", True),
    ("current", "A {x} V battery is connected to a {y} ohm resistor. What current flows?", "I = V/R", "A", True),
    ("force", "A {x} kg object accelerates at {y} m/s^2. What net force acts on it?", "F = m*a", "N", False),
    ("work", "A force of {x} N pushes a box {y} m. How much work is done?", "W = F*d", "J", False),
    ("voltage", "A current of {x} A flows through a {y} ohm resistor. What is the voltage?", "V = I*R", "V", False),
)


def science_formula(rng):
    kind, question, law, unit, divide = rng.choice(FORMULAS)
    a, y = rng.randint(2, 30), rng.randint(2, 9)
    x, answer = (a * y, a) if divide else (a, a * y)
    op = "/" if divide else "*"
    wrong = [x * y if divide else x + y, x + y if divide else x * y * 10, answer + y, answer + 1, answer * 2]
    return _choice(kind, rng, question.format(x=x, y=y), f"{answer} {unit}", [f"{w} {unit}" for w in wrong],
                   f"{law} = {x}{op}{y} = {answer} {unit}")


PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
ELEMENTS = (("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
            ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"), ("sulfur", "S"),
            ("chlorine", "Cl"), ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"),
            ("zinc", "Zn"), ("silver", "Ag"), ("gold", "Au"), ("lead", "Pb"), ("tin", "Sn"))
STATES = (("water", "liquid"), ("ice", "solid"), ("steam", "gas"), ("oxygen", "gas"), ("iron", "solid"),
          ("mercury", "liquid"), ("salt", "solid"), ("helium", "gas"), ("nitrogen", "gas"), ("gold", "solid"),
          ("milk", "liquid"), ("sand", "solid"), ("carbon dioxide", "gas"), ("ethanol", "liquid"),
          ("copper", "solid"), ("neon", "gas"), ("bromine", "liquid"), ("wood", "solid"))


def science_fact(rng):
    """Facts from small fixed tables: planet order, element symbols, states of matter."""
    table = rng.choice(("planet", "symbol", "element", "state"))
    if table == "planet":
        i = rng.randrange(len(PLANETS))
        return _choice("planet", rng, f"Which planet is {ORDINALS[i]} from the Sun?", PLANETS[i], list(PLANETS),
                       f"In order from the Sun: {', '.join(PLANETS)}. The {ORDINALS[i]} is {PLANETS[i]}")
    if table in ("symbol", "element"):
        name, symbol = rng.choice(ELEMENTS)
        if table == "symbol":
            return _choice("symbol", rng, f"What is the chemical symbol of {name}?", symbol,
                           [s for _, s in ELEMENTS], f"The symbol of {name} is {symbol}")
        return _choice("element", rng, f"Which element has the symbol {symbol}?", name,
                       [n for n, _ in ELEMENTS], f"{symbol} is the symbol of {name}")
    substance, state = rng.choice(STATES)
    return _choice("state", rng, f"What is the state of {substance} at room temperature?", state,
                   ["solid", "liquid", "gas", "plasma"], f"At room temperature {substance} is a {state}")


SCIENCE_KINDS = ((science_units, 0.4), (science_formula, 0.45), (science_fact, 0.15))


def science_task(rng: random.Random) -> dict:
    make = rng.choices([m for m, _ in SCIENCE_KINDS], [w for _, w in SCIENCE_KINDS])[0]
    return make(rng)


def make_task(domain: str, rng: random.Random, math_digits: int = 2) -> dict:
    if domain == "math":
        return math_task(rng, math_digits)
    if domain == "code":
        return code_task(rng)
    if domain == "science":
        return science_task(rng)
    raise ValueError(f"unknown domain {domain!r}; known: math, code, science")
