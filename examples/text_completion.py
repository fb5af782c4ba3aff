"""Complete text prompts (or chat dialogs) with a Meta-format Llama 3 checkpoint, like Meta's example scripts.

python examples/text_completion.py CKPT_DIR [--tokenizer PATH] [--chat] [--temperature 0.6] [--max-gen-len 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lamina import LaminaError, Llama

PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
]
DIALOGS = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.model (default: CKPT_DIR/tokenizer.model)"
    )
    parser.add_argument("--chat", action="store_true", help="run chat dialogs instead of text prompts")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-gen-len", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    try:
        llama = Llama.build(
            args.ckpt_dir,
            args.tokenizer or args.ckpt_dir / "tokenizer.model",
            args.max_seq_len,
            max_batch_size=4,
            device=args.device,
            dtype=args.dtype,
        )
        sampling = dict(temperature=args.temperature, top_p=args.top_p, max_gen_len=args.max_gen_len)
        if args.chat:
            for dialog, result in zip(DIALOGS, llama.chat_completion(DIALOGS, **sampling)):
                for message in dialog:
                    print(f"{message['role'].capitalize()}: {message['content']}")
                print(f"> Assistant: {result['generation']['content']}\n" + "=" * 34 + "\n")
        else:
            for prompt, result in zip(PROMPTS, llama.text_completion(PROMPTS, **sampling)):
                print(prompt)
                print(f"> {result['generation']}\n" + "=" * 34 + "\n")
    except LaminaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
