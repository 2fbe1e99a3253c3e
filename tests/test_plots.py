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


def test_all_heads_grid_places_every_head_in_its_panel():
    pats = torch.rand(2, 3, 5, 5)
    fig = plots.all_heads_grid(pats, list("abcde"), selected=(1, 2))
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (2 * 6 - 1, 3 * 6 - 1)
    for layer in range(2):
        for head in range(3):
            np.testing.assert_allclose(z[layer * 6 : layer * 6 + 5, head * 6 : head * 6 + 5], pats[layer, head].numpy(), rtol=1e-6)
    assert np.isnan(z[5]).all() and np.isnan(z[:, 5]).all()  # gaps between panels
    assert fig.data[0].y[6 + 2] == "L1 query 2: c" and fig.data[0].x[12 + 4] == "H2 key 4: e"
    assert len(set(fig.data[0].x)) == len(fig.data[0].x) and len(set(fig.data[0].y)) == len(fig.data[0].y)
    targets = fig.data[1]
    assert [list(c) for c in targets.customdata] == [[l, h] for l in range(2) for h in range(3)]
    assert len(fig.layout.shapes) == 1


def test_all_heads_grid_pools_long_prompts():
    n = plots.GRID_MAX_CELLS * 2
    pats = torch.rand(1, 2, n, n)
    fig = plots.all_heads_grid(pats, [f"t{i}" for i in range(n)])
    z = np.array(fig.data[0].z, dtype=float)
    m = plots.GRID_MAX_CELLS
    # each cell is the mean of a 2x2 block
    np.testing.assert_allclose(z[0, 0], pats[0, 0, :2, :2].mean().item(), rtol=1e-5)
    np.testing.assert_allclose(z[m - 1, m + 1 + m - 1], pats[0, 1, -2:, -2:].mean().item(), rtol=1e-5)
    assert fig.data[0].y[0] == "L0 query 0–1"


def test_clicked_head_from_selection_event():
    fig = plots.all_heads_grid(torch.rand(2, 3, 4, 4), list("abcd"))
    targets = fig.data[1]  # the click targets, one per head
    event = {"selection": {"points": [{"curve_number": 1, "point_index": 4, "customdata": list(targets.customdata[4])}]}}
    assert plots.clicked_head(event, 2, 3) == (1, 1)
    target = targets
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
    props = re.search(r'CircuitsVis\.AttentionHeads,\s*(\{.*\})\)\);\s*</script>', html, re.S).group(1)
    decoded = json.loads(props)
    assert decoded["tokens"] == ["<|bos|>", EVIL, "&amp;"]
    np.testing.assert_allclose(np.array(decoded["attention"]), pats.numpy(), rtol=1e-6)
    # Opened on another head: that head first, under its own name, the others after it in order.
    html = plots.circuitsvis_attention_html(["a", "b", "c"], pats, ["L0H0", "L0H1"], first=1)
    decoded = json.loads(re.search(r'CircuitsVis\.AttentionHeads,\s*(\{.*\})\)\);\s*</script>', html, re.S).group(1))
    assert decoded["attentionHeadNames"] == ["L0H1", "L0H0"]
    np.testing.assert_allclose(np.array(decoded["attention"]), pats[[1, 0]].numpy(), rtol=1e-6)
    # Drawn once the frame has a width (a frame in a hidden tab is 0 px wide when it loads).
    assert "ResizeObserver" in html and "clientWidth > 0" in html
