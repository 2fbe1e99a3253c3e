"""The notebook API: a model, a task, a labelled patching sweep and its figure, in three lines.

    pip install -e .          # once, from the repository root
    python examples/notebook_patching.py [out.html]     # from any directory

In a notebook, the first three lines below are all there is; `fig.show()` draws the figure.
"""
import sys

from core import models, patching, plots, tasks

model = models.load_model("ce-circuits-3l-attn")  # an embedded model: offline
result = patching.sweep_task(model, tasks.make_task("ioi", model, template="when_went"), "z", direction="noise")
fig = plots.figure(result)  # a labelled layer × head heatmap; fig.show() in a notebook

# What the figure shows, as text: the heads whose noising moves the IOI metric most.
grid, (layers, heads) = result.values, result.labels
order = (grid - result.baseline).abs().flatten().argsort(descending=True)[:3].tolist()
print(f"{result.title} ({result.value_label}; an unchanged run is {result.baseline:g}):")
for i in order:
    layer, head = divmod(i, grid.shape[1])
    print(f"  {layers[layer]}{heads[head]}: {float(grid[layer, head]):+.3f}")
if len(sys.argv) > 1:
    fig.write_html(sys.argv[1], include_plotlyjs=True)
    print(f"figure written to {sys.argv[1]}")
