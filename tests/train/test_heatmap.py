"""ranks_svg: valid SVG, layers as rows and module types as columns, the rank in each cell, deterministic."""
import xml.etree.ElementTree as ET

import pytest

from slora.train.heatmap import colour, ranks_svg, split_name

SVG = "{http://www.w3.org/2000/svg}"
LLAMA = {f"model.layers.{i}.{kind}": r
         for i in (0, 2, 10)  # 10 must sort after 2
         for kind, r in (("self_attn.q_proj", i % 7), ("self_attn.v_proj", 3), ("mlp.down_proj", 8 - i % 7))}


def parse(svg):
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def cell_titles(root):
    """{title text: fill} of every filled cell (empty cells carry no title)."""
    return {r.find(f"{SVG}title").text: r.get("fill") for r in root.iter(f"{SVG}rect")
            if r.find(f"{SVG}title") is not None}


@pytest.mark.parametrize("name,want", [
    ("model.layers.12.self_attn.q_proj", (12, "self_attn.q_proj")),
    ("bert.encoder.layer.3.attention.self.query", (3, "attention.self.query")),
    ("encoder.layer.0.output.dense", (0, "output.dense")),
    ("classifier", (None, "classifier")),
    ("lm_head", (None, "lm_head")),
])
def test_split_name(name, want):
    assert split_name(name) == want


def test_every_rank_is_in_its_cell():
    root = parse(ranks_svg(LLAMA))
    titles = cell_titles(root)
    assert set(titles) == {f"{n.split('.')[2]} {n.split('.', 3)[3]}: rank {r}" for n, r in LLAMA.items()}
    numbers = [t.text for t in root.iter(f"{SVG}text")]
    for r in LLAMA.values():
        assert str(r) in numbers


def test_rows_sorted_by_layer_and_columns_in_model_order():
    root = parse(ranks_svg(LLAMA))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts.index("self_attn.q_proj") < texts.index("self_attn.v_proj") < texts.index("mlp.down_proj")
    rows = [(t.text, float(t.get("y"))) for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end"]
    assert [r for r, _ in rows] == ["0", "2", "10"]
    assert rows[0][1] < rows[1][1] < rows[2][1]


def test_names_without_a_layer_get_their_own_rows():
    ranks = {"bert.encoder.layer.0.attention.self.query": 4, "classifier": 2, "bert.pooler.dense": 1}
    root = parse(ranks_svg(ranks))
    row_labels = [t.text for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end"]
    assert row_labels == ["0", "classifier", "bert.pooler.dense"]
    assert "classifier (no layer): rank 2" in cell_titles(root)


def test_colour_scale_runs_from_light_to_dark():
    titles = cell_titles(parse(ranks_svg({"layers.0.a": 0, "layers.0.b": 5, "layers.1.a": 10})))
    lum = {t: sum(int(f[i:i + 2], 16) for i in (1, 3, 5)) for t, f in titles.items()}
    assert lum["0 a: rank 0"] > lum["0 b: rank 5"] > lum["1 a: rank 10"]
    assert colour(0.0) == (247, 251, 255) and colour(1.0) == (8, 48, 107)


def test_has_title_axis_labels_and_legend():
    texts = [t.text for t in parse(ranks_svg(LLAMA)).iter(f"{SVG}text")]
    assert {"LoRA rank per module", "module type", "layer", "rank"} <= set(texts)


def test_deterministic_and_escaped():
    ranks = {"weird<&>.layer.0.q": 1, 'x"y': 2}
    assert ranks_svg(ranks) == ranks_svg(dict(ranks))
    root = parse(ranks_svg(ranks))  # would not parse without escaping
    assert 'x"y' in [t.text for t in root.iter(f"{SVG}text")]


@pytest.mark.parametrize("ranks,match", [
    ({}, "no ranks"), ({"layers.0.q": -1}, "layers.0.q"), ({"layers.0.q": 1.5}, "int"),
    ({"a.0.q": 1, "b.0.q": 2}, "b.0.q"),  # two names land in one cell
])
def test_bad_input(ranks, match):
    with pytest.raises(ValueError, match=match):
        ranks_svg(ranks)
