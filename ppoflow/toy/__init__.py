"""The offline toy RLHF world: a tiny SFT policy, a reward model and prompts, plus the hidden truth.

`build_toy(out_dir, seed)` writes `policy/`, `reward/`, `prompts.jsonl`, dated partitions of its
train prompts in `prompts/` and `toy.json`; `add_partition(toy_dir, date, n, seed)` adds one more
night of new prompts; `oracle_score(prompts, completions)` is the ground-truth reward the reward
model was trained to imitate, so evaluation can tell real improvement from reward hacking.
"""

from ppoflow.toy.build import add_partition, build_toy
from ppoflow.toy.world import oracle_score

__all__ = ["add_partition", "build_toy", "oracle_score"]
