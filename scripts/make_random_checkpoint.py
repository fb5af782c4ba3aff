"""Write a small random Llama 3 checkpoint in Meta's format (params.json, consolidated.00.pth, tokenizer.model).

Its text is gibberish: it exists to exercise loading and generation end to end without downloading weights.
The tokenizer is Meta's Llama 3 tokenizer.model, taken from the llama-models package unless --tokenizer is given.

    python scripts/make_random_checkpoint.py /tmp/lamina-tiny [--dim 256 --layers 4 --seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

from lamina.model import ModelConfig, Transformer


def default_tokenizer() -> Path | None:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=None, help="Llama 3 tokenizer.model (default: llama-models')")
    args = parser.parse_args()

    tokenizer = args.tokenizer or default_tokenizer()
    if tokenizer is None or not tokenizer.is_file():
        print("error: no Llama 3 tokenizer.model: pass --tokenizer PATH or `pip install llama-models`", file=sys.stderr)
        return 2
    params = {
        "dim": args.dim,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "n_kv_heads": args.kv_heads,
        "vocab_size": 128256,
        "multiple_of": 256,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    torch.manual_seed(args.seed)  # a script, not the library: seeding the global generator is its own business
    model = Transformer(ModelConfig.from_meta(params), device=torch.device("cpu"), dtype=torch.float32)
    state = {name: t.to(torch.bfloat16) for name, t in model.state_dict().items()}  # Meta ships bfloat16
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "params.json").write_text(json.dumps(params, indent=2))
    torch.save(state, args.out_dir / "consolidated.00.pth")
    shutil.copyfile(tokenizer, args.out_dir / "tokenizer.model")
    n_params = sum(t.numel() for t in state.values())
    print(f"wrote a random {n_params / 1e6:.1f}M-parameter Llama 3 checkpoint to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
