"""One method's runs in one accuracy study against another's in a second study, paired over the same test
items and seeds: an ablation's zFLoRA against the main study's LoRA, each with its own recipe.

    .venv/bin/python scripts/compare_studies.py A_DIR B_DIR [--a-method zflora] [--b-method lora]

A_DIR, B_DIR: `zflora accuracy --output` directories (their committed files are enough). Prints the
settings that differ between the two studies and the paired bootstrap 95% interval of (A - B) per
category, in points (`zflora.finetune.accuracy_report.paired_across`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zflora.finetune.accuracy_report import paired_across


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--a-method", default="zflora")
    ap.add_argument("--b-method", default="lora")
    args = ap.parse_args()
    out = paired_across(args.a, args.b, args.a_method, args.b_method)
    print(f"A: {out['a']}\nB: {out['b']}")
    for name, (a, b) in out["differing_settings"].items():
        print(f"  {name}: {a} (A) / {b} (B)")
    print("\n| category | A − B | 95% CI | seeds | items |\n|---|---|---|---|---|")
    for category, p in out["paired"].items():
        print(f"| {category} | {p['diff']:+.2f} | [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}] | "
              f"{', '.join(map(str, p['seeds']))} | {p['items']} |")  # fmt: skip


if __name__ == "__main__":
    main()
