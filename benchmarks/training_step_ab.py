"""Before / after, side by side in one run: each method's training step with the textbook forward it used to have
and with the forward peftx uses now (issue 6: find and remove the largest cost of each method's step).

"before" swaps the old formulations back in on the same model instance:
- RLRR: autograd through W' = W + W ⊙ (s_row s_colᵀ) (S built explicitly), SSF as LayerNorm(x) * γ + β;
- LoRA / AOFT: base(x) + B(A x) as a separate add; AOFT's generator called once per slice.
"after" is peftx as installed. Full fine-tuning and the frozen-backbone reference are timed in the same rounds.

    python benchmarks/training_step_ab.py [--rounds 8] [--batch 32] [--threads N]
"""

from __future__ import annotations

import argparse
import types

import numpy as np
import torch
import torch.nn.functional as F

from peftx.bench import MODELS, paired_ratio, physical_cores, timed_rounds, train_setup
from peftx.methods import SSF, AOFTLinear, LowRankLinear, RLRRLinear
from peftx.methods.orthogonal import ao_basis


def _rlrr_before(self, x):
    if self.merged:
        return self._merged_forward(x)
    w = self.base_layer.weight
    return F.linear(x, w + w * self.scale_matrix(), self.effective_bias())


def _ssf_before(self, x):
    y = self.base(x)
    return y if self.merged else y * self.ssf_scale + self.ssf_shift


def _low_rank_before(self, x):
    if self.merged:
        return self._merged_forward(x)
    u, v = self.factors()
    return self.base_layer(x) + F.linear(F.linear(x, v), u)


def _aoft_factors_before(self):
    ups, downs = [], []
    for i in range(len(self.slices)):
        ups.append(ao_basis(self.q_up[i], self.rank) * (self.scale * self.lam[i]))
        downs.append(ao_basis(self.q_down[i], self.rank).T)
    return torch.stack(ups), torch.stack(downs)


def before(setup):
    """Put the old forwards back on this model's modules (instance attributes; the classes are untouched)."""
    for m in setup.model.modules():
        if isinstance(m, RLRRLinear):
            m.forward = types.MethodType(_rlrr_before, m)
        elif isinstance(m, SSF):
            m.forward = types.MethodType(_ssf_before, m)
        elif isinstance(m, LowRankLinear):
            m.forward = types.MethodType(_low_rank_before, m)
            if isinstance(m, AOFTLinear):
                m.slice_factors = types.MethodType(_aoft_factors_before, m)
    return setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--model", default="vit_s14", choices=sorted(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec, dev = MODELS[args.model], torch.device("cpu")
    setups = {m: train_setup(spec, m, batch=args.batch, device=dev) for m in ("full", "frozen")}
    for m in ("rlrr", "lora", "aoft"):
        setups[f"{m} before"] = before(train_setup(spec, m, batch=args.batch, device=dev))
        setups[f"{m} after"] = train_setup(spec, m, batch=args.batch, device=dev)
    # same seed, same init: before and after must agree on the loss of the first step
    for m in ("rlrr", "lora", "aoft"):
        a, b = setups[f"{m} before"].step(), setups[f"{m} after"].step()
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (m, a, b)
    t = timed_rounds(
        {k: s.step for k, s in setups.items()},
        warmup=1,
        min_rounds=args.rounds,
        max_rounds=args.rounds,
        budget_s=0.0,
        seed=0,
    ).times
    print(f"{spec.label}, {args.batch} images/step, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"{'variant':<14}{'step ms p50':>12}{'/ full':>9}{'/ frozen':>10}{'after/before':>14}")
    for k, v in t.items():
        m = k.split()[0]
        ab = f"{paired_ratio(v, t[f'{m} before']):.3f}" if k.endswith("after") else ""
        print(
            f"{k:<14}{1e3 * np.median(v):>12.0f}{paired_ratio(v, t['full']):>9.3f}"
            f"{paired_ratio(v, t['frozen']):>10.3f}{ab:>14}"
        )


if __name__ == "__main__":
    main()
