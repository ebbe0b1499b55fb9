"""The small MLP / one-layer transformer the steering tests drive (test_steering.py, test_seams.py,
test_health.py), its three losses, each component's gradient by torch.autograd.grad and the steered
gradient every policy should give, written independently of the library."""
import torch
from torch import nn

GAMMA, LAM, ETA = 2.0, 0.01, 0.41


class Net(nn.Module):
    """An MLP or a one-layer transformer with: a frozen parameter, a parameter only the "vis"
    component reaches, and one no component reaches."""

    def __init__(self, kind="mlp", d=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        if kind == "mlp":
            self.body = nn.Sequential(nn.Linear(d, 12), nn.Tanh(), nn.Linear(12, d))
        else:
            self.body = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.vis_only = nn.Parameter(torch.randn(d) * 0.1)
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = self.body(self.frozen(x))
        return h, h + self.vis_only


def make_batch(n=12, kind="mlp", d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if kind == "mlp" else (n, 3, d)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def losses(model, x, y, scale=1.0):
    h, hv = model(x)
    return {"std": scale * ((h - y) ** 2).mean(), "vis": scale * (hv.sin() * y).mean(),
            "lp": scale * (h ** 3).mean()}


def flat_grads(model, x, y, scale=1.0):
    """Each component's gradient over the trainable parameters, flattened (zeros where unused);
    computed on the losses times `scale` (AMP), then divided by it."""
    params = [p for p in model.parameters() if p.requires_grad]
    L = losses(model, x, y, scale)
    out = {}
    for n, loss in L.items():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[n] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]) / scale
    return out


def user_policy(G, names):  # any function of the Gram matrix
    return torch.stack([G[1, 1], G[0, 0], G[0, 1].abs()]) / (G[0, 0] + G[1, 1])


def expected(policy, g, eta_fixed=ETA):
    s, v, lp = g["std"], g["vis"], g["lp"]
    if policy in ("vgs", "auto"):
        return s.norm() / (s + GAMMA * v).norm() * (s + GAMMA * v + LAM * lp)
    if policy == "project":
        d = s @ v
        sp = s - d / (v @ v) * v if d < 0 else s
        return s.norm() / (sp + GAMMA * v).norm() * (sp + GAMMA * v + LAM * lp)
    if policy == "sum":
        return s + GAMMA * v + LAM * lp
    if policy == "fixed":
        return eta_fixed * (s + GAMMA * v + LAM * lp)
    c = user_policy(torch.stack([s, v]) @ torch.stack([s, v]).T, None)
    return c[0] * s + c[1] * v + c[2] * lp


def steered_grad(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
