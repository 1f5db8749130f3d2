"""Module-name patterns from adapter configs, checked before use and matched in time linear in the name.

PEFT runs `rank_pattern`, `alpha_pattern` and a string `target_modules` through Python's backtracking `re`
(`utils/other.py` get_pattern_key: `re.match(rf"(.*\\.)?({key})$", name)`; `tuners_utils.py`
check_target_module_exists: `re.fullmatch(target_modules, name)`). Adapters come from strangers, and a key such as
`(([a-z0-9]|\\.)+)+X` makes `re` backtrack for ever. slora therefore

1. accepts only a subset of regular expressions, and refuses the rest at once, naming the key:
   - literal characters and escaped punctuation (`\\.`), `.`, character classes `[a-z_0-9]` / `[^.]`, the
     escapes `\\d \\D \\w \\W \\s \\S`, groups `( )` and `(?: )`, alternation `|`, anchors `^` and `$`;
   - quantifiers `? * + {m} {m,} {m,n}` (lazy forms too, n <= 100), but never a quantified group that itself
     holds a quantifier (nested quantifiers: the shape of every catastrophic pattern), nor two in a row;
   - not: back-references, look-arounds, named groups, inline flags, `\\b`, possessive quantifiers, > 1000 chars.
2. matches what it accepts with its own Thompson NFA (Thompson 1968; Cox, "Regular Expression Matching Can Be
   Simple And Fast", 2007): the set of live states advances one character at a time, so a match costs
   O(len(name) · states) whatever the pattern. Whether a full match exists is the same for `re` and the NFA on
   this subset (no back-references), so the results are PEFT's.

Literal keys (what slora itself writes: `re.escape`d module names) and fixed-length keys skip the NFA.
"""
from __future__ import annotations

from functools import lru_cache

from slora.errors import SloraError

MAX_PATTERN_CHARS = 1000
MAX_REPEAT = 100      # largest m or n in {m,n}
MAX_STATES = 20_000   # NFA size after expanding {m,n}
CLASS_ESCAPES = {"d": str.isdigit, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}
ESCAPABLE = set("\\.^$*+?{}[]()|-/ _#&~%!@,:;'\"<>=`")


def _any(c):
    return c != "\n"  # `.` without re.DOTALL


def _escape_pred(e: str):
    if e in CLASS_ESCAPES:
        return CLASS_ESCAPES[e]
    if e.lower() in CLASS_ESCAPES:
        f = CLASS_ESCAPES[e.lower()]
        return lambda c: not f(c)
    return None


class _Parser:
    """Recursive descent over the accepted subset; builds ("char", pred, literal | None), ("cat", [..]),
    ("alt", [..]), ("rep", node, lo, hi | None), ("bol",), ("eol",)."""

    def __init__(self, pattern: str, culprit: str):
        self.p, self.i, self.culprit = pattern, 0, culprit

    def fail(self, what: str):
        raise SloraError(self.culprit, f"pattern {self.p!r} {what} at character {self.i}; slora accepts literal "
                                       f"module names and a safe regex subset (see slora/patterns.py)")

    def peek(self):
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self):
        node = self.alt()
        if self.i != len(self.p):
            self.fail("has an unmatched ')'")
        return node

    def alt(self):
        options = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.cat())
        return options[0] if len(options) == 1 else ("alt", options)

    def cat(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            atom = self.atom()
            q = self.quantifier()
            if q is not None:
                if atom[0] in ("bol", "eol"):
                    self.fail("quantifies an anchor")
                if _has_rep(atom):
                    self.fail("has a nested quantifier (a quantified group that holds a quantifier), which can "
                              "backtrack without bound")
                atom = ("rep", atom, *q)
                if self.peek() in ("*", "+", "?", "{"):
                    self.fail("has two quantifiers in a row")
            items.append(atom)
        return items[0] if len(items) == 1 else ("cat", items)

    def quantifier(self):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            end = self.p.find("}", self.i)
            body = self.p[self.i + 1:end] if end > 0 else ""
            lo, comma, hi = body.partition(",")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                self.fail("has a '{' that is not a repeat {m}, {m,} or {m,n} (write \\{ for the character)")
            lo_n, hi_n = int(lo), (int(hi) if hi else (None if comma else int(lo)))
            if lo_n > MAX_REPEAT or (hi_n is not None and (hi_n > MAX_REPEAT or hi_n < lo_n)):
                self.fail(f"has a repeat {{{body}}} outside 0 <= m <= n <= {MAX_REPEAT}")
            self.i = end + 1
            bounds = (lo_n, hi_n)
        else:
            return None
        if self.peek() == "?":  # lazy: the same full matches exist
            self.i += 1
        elif self.peek() == "+":
            self.fail("has a possessive quantifier")
        return bounds

    def atom(self):
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                self.fail("has a group kind other than ( ) and (?: ) (look-around, named group or flag)")
            node = self.alt()
            if self.peek() != ")":
                self.fail("has an unclosed '('")
            self.i += 1
            return node
        self.i += 1
        if c == "[":
            return self.char_class()
        if c == ".":
            return ("char", _any, None)
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "\\":
            return self.escape()
        if c in "*+?{":
            self.i -= 1
            self.fail("has a quantifier with nothing to repeat")
        return ("char", c.__eq__, c)

    def escape(self):
        e = self.peek()
        if e is None:
            self.fail("ends with a lone backslash")
        self.i += 1
        pred = _escape_pred(e)
        if pred is not None:
            return ("char", pred, None)
        if e in ESCAPABLE:
            return ("char", e.__eq__, e)
        if e in "nt":
            ch = {"n": "\n", "t": "\t"}[e]
            return ("char", ch.__eq__, ch)
        self.i -= 1
        self.fail(f"has the escape \\{e} (back-references, \\b, \\A, \\x.. are not accepted)")

    def char_class(self):
        negate = self.peek() == "^"
        self.i += negate
        singles, ranges, preds, first = set(), [], [], True
        while True:
            c = self.peek()
            if c is None:
                self.fail("has an unclosed '['")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            if c == "\\":
                e = self.peek()
                if e is None:
                    self.fail("ends with a lone backslash")
                self.i += 1
                pred = _escape_pred(e)
                if pred is not None:
                    preds.append(pred)
                    continue
                if e not in ESCAPABLE:
                    self.fail(f"has the escape \\{e} inside [ ]")
                c = e
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                hi = self.p[self.i + 1]
                if hi == "\\" or hi < c:
                    self.fail("has a bad range inside [ ]")
                ranges.append((c, hi))
                self.i += 2
            else:
                singles.add(c)

        def member(ch, singles=frozenset(singles), ranges=tuple(ranges), preds=tuple(preds), negate=negate):
            inside = ch in singles or any(a <= ch <= b for a, b in ranges) or any(f(ch) for f in preds)
            return inside != negate
        return ("char", member, None)


def _has_rep(node) -> bool:
    if node[0] == "rep":
        return True
    if node[0] in ("cat", "alt"):
        return any(_has_rep(n) for n in node[1])
    return False


# -----------------------------------------------------------------------------
# Thompson NFA: states are ("char", pred, next), ("split", a, b), ("bol"|"eol", next), ("match",)

class _NFA:
    def __init__(self, node, culprit: str, pattern: str):
        self.states: list = []
        self.culprit, self.pattern = culprit, pattern
        match = self._new(("match",))
        self.start = self._build(node, match)

    def _new(self, state) -> int:
        if len(self.states) >= MAX_STATES:
            raise SloraError(self.culprit, f"pattern {self.pattern!r} expands to more than {MAX_STATES} states")
        self.states.append(state)
        return len(self.states) - 1

    def _build(self, node, nxt: int) -> int:
        """The start state of `node`, whose accepting exits lead to state `nxt` (built back to front)."""
        kind = node[0]
        if kind == "char":
            return self._new(("char", node[1], nxt))
        if kind in ("bol", "eol"):
            return self._new((kind, nxt))
        if kind == "cat":
            for n in reversed(node[1]):
                nxt = self._build(n, nxt)
            return nxt
        if kind == "alt":
            starts = [self._build(n, nxt) for n in node[1]]
            s = starts[-1]
            for a in reversed(starts[:-1]):
                s = self._new(("split", a, s))
            return s
        _, sub, lo, hi = node
        if hi is None:  # sub{lo,}: lo copies, then a loop
            loop = self._new(None)
            self.states[loop] = ("split", self._build(sub, loop), nxt)
            tail = loop
        else:  # sub{lo,hi}: lo copies, then hi - lo optional ones
            tail = nxt
            for _ in range(hi - lo):
                tail = self._new(("split", self._build(sub, tail), nxt))
        for _ in range(lo):
            tail = self._build(sub, tail)
        return tail

    def _closure(self, states, pos: int, n: int) -> set[int]:
        out, stack = set(), list(states)
        while stack:
            s = stack.pop()
            if s in out:
                continue
            out.add(s)
            st = self.states[s]
            if st[0] == "split":
                stack += [st[1], st[2]]
            elif st[0] == "bol" and pos == 0 or st[0] == "eol" and pos == n:
                stack.append(st[1])
        return out

    def fullmatch(self, text: str) -> bool:
        current = self._closure([self.start], 0, len(text))
        for pos, ch in enumerate(text):
            step = [st[2] for st in (self.states[s] for s in current) if st[0] == "char" and st[1](ch)]
            if not step:
                return False
            current = self._closure(step, pos + 1, len(text))
        return any(self.states[s][0] == "match" for s in current)


class Pattern:
    """A checked pattern. `fullmatch(name)` is `re.fullmatch(pattern, name)`; `peft_key(name)` is PEFT's
    get_pattern_key test `re.match(rf"(.*\\.)?({pattern})$", name)`."""

    def __init__(self, pattern: str, culprit: str):
        if not isinstance(pattern, str):
            raise SloraError(culprit, f"pattern {pattern!r} is a {type(pattern).__name__}, not a string")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise SloraError(culprit, f"pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
        self.text = pattern
        node = _Parser(pattern, culprit).parse()
        items = node[1] if node[0] == "cat" else [node]
        # fixed length: a plain run of single characters (literal, `.`, classes); no NFA needed
        self.fixed = [n[1] for n in items] if all(n[0] == "char" for n in items) else None
        self.literal = "".join(n[2] for n in items) if self.fixed and all(n[2] is not None for n in items) else None
        self.nfa = _NFA(node, culprit, pattern)
        prefix = ("rep", ("cat", [("rep", ("char", _any, None), 0, None), ("char", ".".__eq__, ".")]), 0, 1)
        self.suffix_nfa = None if self.fixed is not None else _NFA(("cat", [prefix, node]), culprit, pattern)

    def _fixed_at(self, name: str, start: int) -> bool:
        return all(f(c) for f, c in zip(self.fixed, name[start:]))

    def fullmatch(self, name: str) -> bool:
        if self.literal is not None:
            return name == self.literal
        if self.fixed is not None:
            return len(name) == len(self.fixed) and self._fixed_at(name, 0)
        return self.nfa.fullmatch(name)

    def peft_key(self, name: str) -> bool:
        if self.literal is not None:
            return name == self.literal or name.endswith("." + self.literal)
        if self.fixed is not None:
            k = len(self.fixed)
            head = name[:len(name) - k]
            return len(name) >= k and (head == "" or (head.endswith(".") and "\n" not in head)) and \
                self._fixed_at(name, len(name) - k)
        return self.suffix_nfa.fullmatch(name)


def compile_pattern(pattern: str, culprit: str) -> Pattern:
    """The checked Pattern of `pattern`; SloraError(culprit, ...) when it is outside the accepted subset."""
    if not isinstance(pattern, str):
        raise SloraError(culprit, f"pattern {pattern!r} is a {type(pattern).__name__}, not a string")
    return _compile(pattern, culprit)


@lru_cache(maxsize=4096)
def _compile(pattern: str, culprit: str) -> Pattern:
    return Pattern(pattern, culprit)
