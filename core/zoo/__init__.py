"""Scripts that build the embedded model zoo in assets/models/ (one command each, seeded)."""
from __future__ import annotations

import json
from pathlib import Path


def save_checkpoint(model, tl_cfg: dict, out_dir: Path) -> None:
    """Weights as safetensors and the TransformerLens config, under the names `load_model` reads."""
    from safetensors.torch import save_file

    from core.models import CONFIG_FILE, WEIGHTS_FILE

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(tl_cfg, indent=2) + "\n")
