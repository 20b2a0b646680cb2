import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from flex_pbs.analysis import plotting
from flex_pbs.analysis.synthetic import planted_qkv

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "explore_masks.ipynb"
METHODS = ["dense", "xattention", "meanpool", "pbs_mean", "pbs"]
SMALL = {"block_size": 32, "key_block_size": None, "segment_size": 64, "stride": 8}


@pytest.fixture(scope="module")
def qkv():
    return planted_qkv(batch=1, q_heads=4, kv_heads=2, seq_len=512, head_dim=64, seed=1)


def render(fig) -> None:
    fig.savefig(io.BytesIO(), format="png")


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def colorbar_axes(fig):
    return [ax for ax in fig.axes if not ax.images and ax.get_label() == "<colorbar>"]


def test_pooled_attention_unpooled_is_the_exact_causal_softmax_in_the_given_key_layout(qkv):
    q, k, _ = qkv
    plan = plotting.method_plans(q, k, ["pbs"], threshold=0.9, **SMALL)["pbs"]
    head, kv_head = 3, 1
    logits = q[0, head] @ k[0, kv_head].T / math.sqrt(64)
    exact = torch.softmax(logits.masked_fill(torch.ones(512, 512, dtype=torch.bool).triu(1), -math.inf), dim=-1)
    assert torch.allclose(plotting.pooled_attention(q, k, head), exact, atol=1e-6)
    permuted = plotting.pooled_attention(q, k, head, plan.key_order)
    assert torch.allclose(permuted, exact[:, plan.key_order[0, kv_head]], atol=1e-6)


def test_pooled_attention_max_and_sum_pooling_with_a_ragged_last_tile(qkv):
    q, k, _ = qkv
    q, k = q[..., :500, :], k[..., :500, :]
    exact = plotting.pooled_attention(q, k, 0)
    maxed = plotting.pooled_attention(q, k, 0, pool=64, pooling="max")
    summed = plotting.pooled_attention(q, k, 0, pool=64, pooling="sum")
    assert maxed.shape == summed.shape == (8, 8)
    assert torch.isclose(maxed[7, 7], exact[448:, 448:].max())
    assert torch.allclose(summed.sum(-1), torch.ones(8), atol=1e-5)  # rows of tiles are per-query mass
    assert (maxed.triu(1) == 0).all()


def test_attention_heatmap_has_two_labelled_panels_and_a_colorbar(qkv):
    q, k, _ = qkv
    plan = plotting.method_plans(q, k, ["pbs"], **SMALL)["pbs"]
    fig = plotting.attention_heatmap(q, k, 2, plan.key_order, segment_size=64, max_pixels=100)
    render(fig)
    panels = image_axes(fig)
    assert [ax.get_title() for ax in panels] == ["original key order", "after segment-local permutation"]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    assert all(ax.images[0].get_array().shape == (86, 86) for ax in panels)  # 512 tokens, 6 per pixel
    assert len(panels[0].lines) == 2 * (512 // 64 - 1)  # segment boundaries on both axes
    assert colorbar_axes(fig) and colorbar_axes(fig)[0].get_ylabel()
    assert "head 2" in fig.get_suptitle()
    single = plotting.attention_heatmap(q, k, 0)
    assert len(image_axes(single)) == 1


def test_heatmap_rejects_bad_inputs_with_the_fix(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"head must be an int in \[0, 4\)"):
        plotting.attention_heatmap(q, k, 4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        plotting.attention_heatmap(q, k, 0, pooling="mean")
    with pytest.raises(ValueError, match=r"key_order must have shape \(1, 2, 512\)"):
        plotting.attention_heatmap(q, k, 0, torch.arange(512))
    with pytest.raises(ValueError, match=r"q .* and k .* must share batch, length"):
        plotting.attention_heatmap(q, k[..., :256, :], 0)


def test_block_masks_show_each_method_with_density_and_recall(qkv):
    q, k, _ = qkv
    plans = plotting.method_plans(q, k, METHODS, threshold=0.8, **SMALL)
    recalls = plotting.head_recalls(q, k, plans, head=1)
    assert recalls["dense"] == pytest.approx(1.0, abs=1e-5) and all(0 < r <= 1 + 1e-6 for r in recalls.values())
    fig = plotting.block_masks(plans, 1, recalls)
    render(fig)
    panels = image_axes(fig)
    assert [ax.get_title().splitlines()[0] for ax in panels] == METHODS
    assert all("density" in ax.get_title() and "recall" in ax.get_title() for ax in panels)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    # Each panel is drawn in its method's own key layout: pbs_mean permutes, the default pbs does not.
    assert panels[METHODS.index("pbs_mean")].get_xlabel() == "key block (permuted layout)"
    assert panels[METHODS.index("pbs")].get_xlabel() == "key block (original order)"
    assert colorbar_axes(fig) and fig.get_suptitle()


def test_block_masks_draw_narrower_key_blocks_in_token_proportions(qkv):
    q, k, _ = qkv
    plans = plotting.method_plans(q, k, ["pbs"], threshold=0.8, block_size=64, key_block_size=32, segment_size=64)
    fig = plotting.block_masks(plans, 0)
    render(fig)
    (panel,) = image_axes(fig)
    assert panel.images[0].get_array().shape == (8, 16) and panel.get_aspect() == 2.0
    assert "64×32-token blocks" in fig.get_suptitle()


def test_block_states_of_the_dense_plan_are_the_causal_mask(qkv):
    q, k, _ = qkv
    dense = plotting.method_plans(q, k, ["dense"], **SMALL)["dense"]
    states = torch.from_numpy(plotting.block_states(dense, 0))
    assert dense.dense and states.shape == (16, 16)
    assert ((states > 0) == torch.ones(16, 16, dtype=torch.bool).tril()).all()
    assert (states != 1).all()  # nothing skipped


def test_block_masks_wants_a_recall_for_every_plan(qkv):
    q, k, _ = qkv
    plans = plotting.method_plans(q, k, ["xattention", "pbs"], **SMALL)
    with pytest.raises(ValueError, match=r"recalls has no entry for \['pbs'\]"):
        plotting.block_masks(plans, 0, {"xattention": 0.9})
    with pytest.raises(ValueError, match="plans is empty"):
        plotting.block_masks({}, 0)


def test_sweep_layer_rows_and_curves(qkv):
    q, k, _ = qkv
    rows = plotting.sweep_layer(q, k, ["xattention", "pbs"], [0.5, 0.8, 1.0], **SMALL)
    assert [(r["method"], r["threshold"]) for r in rows] == [
        (m, t) for m in ("xattention", "pbs") for t in (0.5, 0.8, 1.0)
    ]
    for method in ("xattention", "pbs"):
        densities = [r["density"] for r in rows if r["method"] == method]
        assert densities == sorted(densities) and densities[-1] == pytest.approx(1.0)
    assert all(len(r["head_densities"]) == len(r["head_recalls"]) == 4 for r in rows)
    assert all(0 < r["recall"] <= 1 + 1e-6 for r in rows)

    for figure in (plotting.density_vs_threshold(rows), plotting.recall_vs_density(rows)):
        render(figure)
        (ax,) = figure.axes
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["xattention", "pbs"]


def test_sweep_layer_and_curves_reject_what_they_cannot_use(qkv):
    q, k, _ = qkv
    with pytest.raises(ValueError, match="'dense' has no threshold"):
        plotting.sweep_layer(q, k, ["dense", "pbs"], [0.9])
    with pytest.raises(ValueError, match="threshold must be in"):
        plotting.sweep_layer(q, k, ["pbs"], [1.5], **SMALL)
    with pytest.raises(ValueError, match="rows lack"):
        plotting.density_vs_threshold([{"method": "pbs", "threshold": 0.9}])


def test_layer_table_and_its_markdown(qkv):
    q, k, v = qkv
    table = plotting.layer_table({7: (q, k, v), 2: (q, k, v)}, threshold=0.8, **SMALL)
    assert [row["layer"] for row in table] == [2, 7]
    columns = ["layer", "xattention density", "xattention recall", "pbs_antidiagonal density", "pbs_antidiagonal recall"]
    assert list(table[0]) == columns
    text = plotting.format_table(table, digits=2)
    lines = text.splitlines()
    assert lines[0] == "| " + " | ".join(columns) + " |"
    assert len(lines) == 4 and lines[2].startswith("| 2 | 0.")
    with pytest.raises(ValueError, match="row 1 has columns"):
        plotting.format_table([{"a": 1}, {"b": 2}])


def test_committed_notebook_has_no_outputs_or_execution_counts():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, "the notebook has no code cell"
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    assert all(not cell.get("metadata") for cell in notebook["cells"])
    assert set(notebook["metadata"]) <= {"kernelspec", "language_info"}
