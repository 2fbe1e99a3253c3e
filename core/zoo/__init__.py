"""Scripts that build the embedded model zoo in assets/models/ (one command each, seeded)."""
from __future__ import annotations

import json
from pathlib import Path


def save_checkpoint(model, tl_cfg: dict, out_dir: Path) -> None:
    """Weights as safetensors and the TransformerLens config as hooked_config.json (what `load_model` reads)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "hooked_config.json").write_text(json.dumps(tl_cfg, indent=2) + "\n")
