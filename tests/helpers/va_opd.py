"""VA-OPD's loss as the issue defines it, written out rollout by rollout in plain torch (float64): the
reference test_va_opd.py checks VAOPDLoss against and test_trl.py the trainer's method='va_opd'."""
import math

import torch


def reference(s, a, aw, tokens, mask, groups, top_frac=0.2, lam=0.5, tau=1.0, T=1.0):
    """The issue's definition, written out rollout by rollout."""
    ls, la, lw = (x.double().div(T).log_softmax(-1) for x in (s, a, aw))
    B = s.shape[0]
    losses, means, vas = [], [], torch.zeros(tokens.shape, dtype=torch.float64)
    for k in range(B):
        idx = [t for t in range(tokens.shape[1]) if mask[k, t]]
        va = {t: max(float(la[k, t, tokens[k, t]] - lw[k, t, tokens[k, t]]), 0.0) for t in idx}
        for t in idx:
            vas[k, t] = va[t]
        kl = {t: (ls[k, t].exp() * (ls[k, t] - la[k, t])).sum() for t in idx}
        means.append(sum(va.values()) / len(idx) if idx else 0.0)
        if not idx:
            losses.append(torch.zeros((), dtype=torch.float64))
            continue
        n_high = max(math.floor(top_frac * len(idx)), 1)
        high = sorted(idx, key=lambda t: (-va[t], t))[:n_high]
        low = [t for t in idx if t not in high]
        loss = lam * sum(kl[t] for t in high) / len(high)
        if low:
            loss = loss + (1 - lam) * sum(kl[t] for t in low) / len(low)
        losses.append(loss)
    weights, total, prompts = torch.zeros(B, dtype=torch.float64), 0.0, sorted(set(groups.tolist()))
    for p in prompts:
        ks = [k for k in range(B) if groups[k] == p]
        m = torch.tensor([means[k] for k in ks], dtype=torch.float64)
        z = (m - m.mean()) / (m.std(unbiased=False) + 1e-6)
        w = (z / tau).softmax(0)
        weights[ks] = w
        total = total + sum(w[i] * losses[k] for i, k in enumerate(ks))
    return total / len(prompts), vas, weights
