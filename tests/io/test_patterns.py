"""slora.io.patterns against Python's `re` (the oracle: PEFT runs the same keys through it) on the accepted subset,
and the refusals of what can backtrack without bound."""
import re
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from slora.errors import SloraError
from slora.io.patterns import compile_pattern

# Module names of the shapes PEFT sees: dotted components of lower-case words, digits and underscores.
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head", "q_proj", "a.b",
         "encoder.layer.3.attention.self.query", "classifier", "classifier.dense", "", "x.y.z"]
module_names = st.one_of(st.sampled_from(NAMES), st.lists(st.text("abq_019", min_size=1, max_size=4),
                                                          min_size=1, max_size=4).map(".".join))


@st.composite
def subset_patterns(draw, depth=2):
    """Patterns of the accepted subset: literals, `.`, classes, escapes, groups, alternation, quantifiers on
    atoms or on groups that hold none."""
    atoms = st.sampled_from(["a", "b", "q", "_", "0", "1", r"\.", ".", "[a-z]", "[^.]", r"\d", r"\w", "[0-9_]",
                             "proj", "layers", "q_proj"])
    quant = st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "*?"])
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if depth > 0 and draw(st.booleans()):
            inner = draw(subset_patterns(depth=depth - 1))
            alt = draw(subset_patterns(depth=depth - 1)) if draw(st.booleans()) else None
            group = f"({inner}|{alt})" if alt is not None else f"(?:{inner})"
            has_q = any(c in inner + (alt or "") for c in "*+?{")
            parts.append(group + ("" if has_q else draw(quant)))
        else:
            parts.append(draw(atoms) + draw(quant))
    return "".join(parts)


@given(subset_patterns(), module_names)
@example(r"model\.layers\.0\.self_attn\.q_proj", "model.layers.0.self_attn.q_proj")  # what slora writes
@example("q_proj", "model.layers.0.self_attn.q_proj")         # a plain suffix
@example("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj")  # unescaped dots: wildcards
@example("(q|v)_proj", "model.layers.11.self_attn.v_proj")
@example(".*", "")
@example("a|", "")
def test_matches_like_re(pattern, name):
    p = compile_pattern(pattern, "key")
    assert p.fullmatch(name) == (re.fullmatch(pattern, name) is not None)
    assert p.peft_key(name) == (re.match(rf"(.*\.)?({pattern})$", name) is not None)


@pytest.mark.parametrize("pattern", [
    r"(([a-z0-9]|\.)+)+X", "(a*)*", "(a+)+b", "(a|aa)+?(b*)+", "((a)*)*", "(?:x+)*y", "(a{1,5}){2,}",
])
def test_nested_quantifiers_are_refused_at_once(pattern):
    t0 = time.perf_counter()
    with pytest.raises(SloraError, match="nested quantifier"):
        compile_pattern(pattern, "rank_pattern key")
    assert time.perf_counter() - t0 < 0.1


@pytest.mark.parametrize("pattern,what", [
    ("a**", "two quantifiers"), ("(?=a)", "group kind"), ("(?<=a)b", "group kind"), ("(?P<n>a)", "group kind"),
    ("(?i)a", "group kind"), (r"(a)\1", r"escape \\1"), (r"\bq", r"escape \\b"), ("a++", "possessive"),
    ("[a", "unclosed '\\['"), ("(a", "unclosed '\\('"), ("a)", "unmatched"), ("*a", "nothing to repeat"),
    ("a{101}", "repeat"), ("a{3,2}", "repeat"), ("x" * 1001, "1001 characters"), ("^*", "quantifies an anchor"),
])
def test_outside_the_subset_is_refused(pattern, what):
    with pytest.raises(SloraError, match=what):
        compile_pattern(pattern, "key")


def test_many_wildcards_still_run_in_linear_time():
    # `re` backtracks polynomially here (each .* tries every split); the NFA walks the name once
    p = compile_pattern(".*" * 12 + "X", "key")
    t0 = time.perf_counter()
    assert not p.peft_key("a" * 3000) and not p.fullmatch("a" * 3000)
    assert time.perf_counter() - t0 < 2.0
