import json
import re

import numpy as np
import torch

from core import plots

EVIL = '</script><script>alert(1)</script>'


def test_pattern_heatmap_values_labels_and_escaping():
    pat = torch.softmax(torch.randn(4, 4), -1).tril()
    toks = ["<|bos|>", "a", EVIL, "a"]
    fig = plots.pattern_heatmap(pat, toks, "t")
    hm = fig.data[0]
    np.testing.assert_allclose(np.array(hm.z), pat.numpy())
    assert list(hm.x) == list(hm.y) == ["0: &lt;|bos|&gt;", "1: a", f"2: {plots.safe(EVIL)}", "3: a"]
    assert len(set(hm.x)) == 4  # repeated tokens stay separate columns
    assert hm.customdata[3][2] == ["a", plots.safe(EVIL)]
    assert "attention: %{z:.4f}" in hm.hovertemplate
    dumped = fig.to_json()
    assert "<script>" not in dumped and "</script>" not in dumped


def test_all_heads_grid_has_one_trace_per_head():
    pats = torch.rand(2, 3, 5, 5)
    fig = plots.all_heads_grid(pats, list("abcde"), selected=(1, 2))
    assert len(fig.data) == 12  # a heatmap and a click target per head
    np.testing.assert_allclose(np.array(fig.data[5].z), pats[1, 2].numpy())
    assert fig.data[6 + 5].name == "open L1H2"
    assert fig.data[4].name == "L1H1"
    assert "<b>L1H2</b>" in [a.text for a in fig.layout.annotations]


def test_clicked_head_from_selection_event():
    fig = plots.all_heads_grid(torch.rand(2, 3, 4, 4), list("abcd"))
    target = fig.data[6 + 4]  # the click target over L1H1
    event = {"selection": {"points": [{"curve_number": 10, "point_index": 0, "customdata": list(target.customdata[0])}]}}
    assert plots.clicked_head(event, 2, 3) == (1, 1)
    assert target.hoverinfo == "none"  # "skip" would swallow the click
    assert plots.clicked_head({"selection": {"points": [{"curve_number": 2, "z": 0.3}]}}, 2, 3) is None  # a heatmap
    assert plots.clicked_head(None, 2, 3) is None and plots.clicked_head({"selection": {}}, 2, 3) is None


def test_head_score_heatmap_values():
    s = torch.tensor([[0.1, 0.2], [0.3, 0.95]])
    fig = plots.head_score_heatmap(s, "Induction score", selected=(1, 1))
    np.testing.assert_allclose(np.array(fig.data[0].z), s.numpy())
    assert fig.data[0].customdata[1][0] == "L1H0"
    assert len(fig.layout.shapes) == 1


def test_residual_norm_heatmap_rows():
    norms = torch.rand(3, 4)
    fig = plots.residual_norm_heatmap(norms, ["<|bos|>", "x", "y", "z"])
    assert list(fig.data[0].y) == ["resid_pre 0", "resid_pre 1", "resid_post 1"]
    np.testing.assert_allclose(np.array(fig.data[0].z), norms.numpy())


def test_circuitsvis_html_is_offline_and_script_safe():
    pats = torch.softmax(torch.randn(2, 3, 3), -1)
    html = plots.circuitsvis_attention_html(["<|bos|>", EVIL, "&amp;"], pats, ["L0H0", "L0H1"])
    assert "unpkg.com" not in html and "cdn" not in html.split("<script")[0]
    assert "CircuitsVis.render" in html  # the inlined bundle
    assert html.count("</script>") == 1  # only the real end of the script block
    assert "<script>alert" not in html
    # the props still decode to the original tokens and values
    props = re.search(r'CircuitsVis\.AttentionHeads,\s*(\{.*\})\s*\)\s*</script>', html, re.S).group(1)
    decoded = json.loads(props)
    assert decoded["tokens"] == ["<|bos|>", EVIL, "&amp;"]
    np.testing.assert_allclose(np.array(decoded["attention"]), pats.numpy(), rtol=1e-6)
