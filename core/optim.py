"""Muon for the 2-D transformer matrices + AdamW for everything else; single-process and ZeRO-2.

    from core.optim import build_optimizer, apply_schedule
    opt = build_optimizer(model, plan)                      # MuonAdamW, or DistMuonAdamW under torchrun
    ...backward...
    apply_schedule(opt, plan, step)                         # lr x multiplier, Muon momentum and WD
    opt.step(); opt.zero_grad(set_to_none=True)

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) per step, on each shape-group of
matrices stacked into one (K, m, n) tensor: Nesterov momentum; MuonEq row equilibration
(arXiv:2603.28254); Frobenius normalisation (x1.01); 5 Polar Express iterations
X <- aX + (bA + cA^2)X, A = X^T X (tall) or X X^T (wide) (Amsel et al., arXiv:2505.16932);
Muon+ rescale to sqrt(min(m, n)) (arXiv:2602.21545); NorMuon factored second moment with the
total norm preserved (arXiv:2510.05491); cautious weight decay p -= lr*g + lr*wd*p*[g*p >= 0]
(arXiv:2510.12402). lr is multiplied by max(1, m/n)^0.5.

DistMuonAdamW does the gradient sync itself (no DDP wrapper), ZeRO-2 style: large AdamW params
are reduce-scattered by rows, updated on the owner's slice (sharded state) and all-gathered; small
ones are all-reduced; each Muon group is stacked, reduce-scattered by matrix, each rank updates the
matrices it owns and the results are all-gathered. All collectives are async and overlap the
updates; SUM then x(1/world) so that the averaged gradient equals single-process gradient
accumulation bit for bit. Works on gloo (CPU) and NCCL. state_dict() is this rank's shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

POLAR_EXPRESS_COEFFS = (  # num_iters=5, safety 2e-2, cushion 2 (arXiv:2505.16932)
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SMALL_PARAM = 1024  # AdamW params below this many elements are all-reduced, not sharded

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -------------------------------------------------------------------------------------------- math


def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step, lr, beta1, beta2, eps,
                 wd) -> None:
    """Decoupled weight decay, then bias-corrected Adam (arXiv:1711.05101). In place, fp32 math.
    step and the hyperparameters are numbers, or 0-D fp32 tensors under compiled() (a tensor's new
    value reuses the compiled kernel; a new Python number would recompile it)."""
    p32, g = p.float(), grad.float()
    p32.mul_(1 - lr * wd)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(g.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    p32.sub_(exp_avg / denom * (lr / (1 - beta1 ** step)))
    if p32 is not p:
        p.copy_(p32)


_COMPILED: dict = {}


def compiled(fn):
    """`fn` under torch.compile(dynamic=False, fullgraph=True), built once per process: the reference
    compiles its fused AdamW and Muon steps this way, one graph per parameter shape, so the dozens of
    element-wise ops of a step run as a few fused loops instead of one pass over memory each."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


_FUSED_DEVICES = ("cpu", "cuda")


def adamw_group_update(group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict],
                       fused: bool = True, scalars: "_Scalars | None" = None) -> None:
    """AdamW on a list of (param, grad, state); one multi-tensor fused kernel when possible (torch's
    _fused_adamw_ does the same arithmetic as adamw_update in a single pass over memory). Otherwise
    adamw_update per tensor: compiled() with its hyperparameters as `scalars` tensors when given (the
    reference's fused step), else eager."""
    if not params:
        return
    for p, st in zip(params, states):
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    same = all(p.dtype == g.dtype == torch.float32 for p, g in zip(params, grads))
    if fused and same and params[0].device.type in _FUSED_DEVICES and hasattr(torch, "_fused_adamw_"):
        if params[0].device.type != "cpu":
            steps = [s.to(params[0].device) for s in steps]
        torch._fused_adamw_(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                            [], steps, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=False, maximize=False)
        return
    if scalars is not None:
        hyper = scalars.fill(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"])
        for p, g, st in zip(params, grads, states):
            compiled(adamw_update)(p, g, st["exp_avg"], st["exp_avg_sq"], st["step"], *hyper)
        return
    for p, g, st in zip(params, grads, states):
        adamw_update(p, g, st["exp_avg"], st["exp_avg_sq"], int(st["step"].item()), group["lr"], beta1, beta2,
                     group["eps"], group["weight_decay"])


class _Scalars:
    """0-D fp32 CPU tensors holding a step's hyperparameters for the compiled steps, refilled in place
    before each call (the reference passes its hyperparameters the same way)."""

    def __init__(self):
        self.t: dict[str, Tensor] = {}

    def fill(self, **values: float) -> list[Tensor]:
        for k, v in values.items():
            if k not in self.t:
                self.t[k] = torch.zeros((), dtype=torch.float32)
            self.t[k].fill_(v)
        return [self.t[k] for k in values]


def orthogonalize(g: Tensor, ns_steps: int = 5) -> Tensor:
    """Row-equilibrate, normalise and run Polar Express on stacked matrices (..., m, n)."""
    x = g
    target = x.float().norm(dim=(-2, -1), keepdim=True) / (x.size(-2) ** 0.5)
    row_norm = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    x = x * (target / row_norm).to(x.dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    if g.size(-2) > g.size(-1):  # tall: iterate on the small n x n Gram matrix
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = x.mT @ x
            x = a * x + x @ (b * A + c * (A @ A))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = x @ x.mT
            x = a * x + (b * A + c * (A @ A)) @ x
    return x


def muon_update(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum: Tensor,
                momentum, lr, wd, beta2, ns_steps: int, ns_dtype: torch.dtype = torch.float32) -> None:
    """One Muon step on stacked (K, m, n) grads/params, in place (grads are clobbered). momentum, lr,
    wd, beta2: numbers, or 0-D fp32 tensors under compiled() (see adamw_update)."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)  # Nesterov
    g = orthogonalize(g.to(ns_dtype), ns_steps).to(params.dtype)
    # Muon+: snap the Frobenius norm to that of an exactly semi-orthogonal matrix
    g = g * (min(g.size(-2), g.size(-1)) ** 0.5 / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # NorMuon: per-row (tall) / per-column (wide) second moment, total norm preserved
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum.lerp_(v_mean, 1 - beta2)
    step_size = second_momentum.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
    # cautious weight decay: only where the update and the weight agree in sign
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


def _muon_state(state: dict, n: int, shape, like: Tensor) -> tuple[Tensor, Tensor]:
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros(n, *shape, dtype=like.dtype, device=like.device)
        sm_shape = (n, shape[0], 1) if shape[0] >= shape[1] else (n, 1, shape[1])
        state["second_momentum_buffer"] = torch.zeros(sm_shape, dtype=like.dtype, device=like.device)
    return state["momentum_buffer"], state["second_momentum_buffer"]


def _muon_lr(group: dict, shape) -> float:
    return group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5


def _grad(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class _Schedulable:
    """What both optimizers share: the schedule setter and how a step's math runs. compile_steps: the
    AdamW (when not the fused kernel) and Muon math through compiled(), as the reference does."""

    def _setup(self, fused_adamw: bool, compile_steps: bool) -> None:
        self.fused_adamw, self.compile_steps = fused_adamw, compile_steps
        self._scalars = _Scalars() if compile_steps else None
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def _adamw(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]) -> None:
        adamw_group_update(group, params, grads, states, self.fused_adamw, self._scalars)

    def _muon(self, group: dict, grads: Tensor, params: Tensor, buf: Tensor, buf2: Tensor) -> None:
        hyper = (group["momentum"], _muon_lr(group, params.shape[1:]), group["weight_decay"], group["beta2"])
        if self._scalars is None:
            muon_update(grads, params, buf, buf2, *hyper, group["ns_steps"], _dtype(group["ns_dtype"]))
            return
        hyper = self._scalars.fill(momentum=hyper[0], lr=hyper[1], wd=hyper[2], beta2=hyper[3])
        compiled(muon_update)(grads, params, buf, buf2, *hyper, group["ns_steps"], _dtype(group["ns_dtype"]))

    def set_schedule(self, lr_multiplier: float, muon_momentum: float | None = None,
                     muon_weight_decay: float | None = None) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                if muon_momentum is not None:
                    group["momentum"] = muon_momentum
                if muon_weight_decay is not None:
                    group["weight_decay"] = muon_weight_decay


class MuonAdamW(_Schedulable, torch.optim.Optimizer):
    """Single-process combined optimizer. Groups: dicts with kind='adamw' (lr, betas, eps,
    weight_decay) or kind='muon' (lr, momentum, ns_steps, beta2, weight_decay, ns_dtype; all params
    of one shape)."""

    def __init__(self, param_groups: list[dict], fused_adamw: bool = True, compile_steps: bool = False):
        super().__init__(param_groups, defaults={})
        self._setup(fused_adamw, compile_steps)
        for group in self.param_groups:
            if group["kind"] == "muon" and len({tuple(p.shape) for p in group["params"]}) > 1:
                raise ValueError("a Muon group must hold matrices of one shape (they are stacked)")

    def _step_adamw(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        self._adamw(group, params, [p.grad for p in params], [self.state[p] for p in params])

    def _step_muon(self, group: dict) -> None:
        params = group["params"]
        if not params:
            return
        buf, buf2 = _muon_state(self.state[params[0]], len(params), params[0].shape, params[0])
        stacked_params = torch.stack(params)
        self._muon(group, torch.stack([_grad(p) for p in params]), stacked_params, buf, buf2)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            elif group["kind"] == "muon":
                self._step_muon(group)
            else:
                raise ValueError(f"unknown optimizer group kind {group['kind']!r} (adamw or muon)")


class DistMuonAdamW(_Schedulable, torch.optim.Optimizer):
    """ZeRO-2 MuonAdamW for multi-process training; gradient sync included (do not wrap in DDP)."""

    def __init__(self, param_groups: list[dict], fused_adamw: bool = True, compile_steps: bool = False):
        super().__init__(param_groups, defaults={})
        if not dist.is_initialized():
            raise RuntimeError("DistMuonAdamW needs an initialised process group (core.common.init_distributed)")
        self._setup(fused_adamw, compile_steps)

    # phase 1: launch every reduction
    def _launch_adamw(self, group, world):
        infos = []
        for p in group["params"]:
            grad = _grad(p)
            if p.numel() < SMALL_PARAM or p.shape[0] % world:
                work = dist.all_reduce(grad, op=dist.ReduceOp.SUM, async_op=True)
                infos.append((p, work, grad, True))
            else:
                out = torch.empty_like(grad[: p.shape[0] // world])
                infos.append((p, _reduce_scatter(out, grad, op=dist.ReduceOp.SUM, async_op=True), out, False))
        return infos

    def _launch_muon(self, group, world):
        params = group["params"]
        chunk = -(-len(params) // world)
        p0 = params[0]
        stacked = torch.zeros(chunk * world, *p0.shape, dtype=p0.dtype, device=p0.device)
        stacked[: len(params)].copy_(torch.stack([_grad(p) for p in params]))
        out = torch.empty(chunk, *p0.shape, dtype=p0.dtype, device=p0.device)
        return (_reduce_scatter(out, stacked, op=dist.ReduceOp.SUM, async_op=True), out, stacked, chunk)

    # phase 2: wait, update the owned shard, launch the gathers
    def _update_adamw(self, group, infos, rank, world, gathers):
        slices, grads = [], []
        for p, work, grad, small in infos:
            work.wait()
            grad.mul_(1.0 / world)
            rows = p.shape[0] // world
            slices.append(p if small else p[rank * rows:(rank + 1) * rows])
            grads.append(grad)
        self._adamw(group, slices, grads, [self.state[p] for p, *_ in infos])
        for (p, _, _, small), p_slice in zip(infos, slices):
            if not small:
                gathers.append((_all_gather(p, p_slice.clone(), async_op=True), None, None))

    def _update_muon(self, group, info, rank, gathers):
        work, grad_chunk, stacked, chunk = info
        work.wait()
        grad_chunk.mul_(1.0 / dist.get_world_size())
        params = group["params"]
        shape = params[0].shape
        start = rank * chunk
        owned = max(0, min(chunk, len(params) - start))
        buf, buf2 = _muon_state(self.state[params[0]], chunk, shape, params[0])
        updated = torch.zeros(chunk, *shape, dtype=params[0].dtype, device=params[0].device)
        if owned:
            updated[:owned] = torch.stack(params[start:start + owned])
            self._muon(group, grad_chunk[:owned], updated[:owned], buf[:owned], buf2[:owned])
        gathers.append((_all_gather(stacked, updated, async_op=True), stacked, params))

    @torch.no_grad()
    def step(self) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        launched = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                launched.append(self._launch_adamw(group, world))
            elif group["kind"] == "muon":
                launched.append(self._launch_muon(group, world) if group["params"] else None)
            else:
                raise ValueError(f"unknown optimizer group kind {group['kind']!r} (adamw or muon)")
        gathers: list = []
        for group, info in zip(self.param_groups, launched):
            if group["kind"] == "adamw":
                self._update_adamw(group, info, rank, world, gathers)
            elif info is not None:
                self._update_muon(group, info, rank, gathers)
        for work, stacked, params in gathers:  # phase 3: wait for the gathers, copy Muon params back
            work.wait()
            if params is not None:
                torch._foreach_copy_(params, list(stacked[: len(params)].unbind(0)))


def _dtype(name: str) -> torch.dtype:
    # Polar Express runs in bf16 when the model computes in bf16; never fp16 (exponent range too small)
    return torch.bfloat16 if name == "bfloat16" else torch.float32


# -------------------------------------------------------------------------------------------- build


def param_groups(model, *, lm_head_lr: float, wte_lr: float, value_embeds_lr: float, resid_lr: float,
                 x0_lr: float, smear_lr: float, matrix_lr: float, weight_decay: float,
                 muon_momentum: float = 0.95, muon_beta2: float = 0.9, ns_steps: int = 5) -> list[dict]:
    """The reference grouping (docs/reference.md#optimizer). LRs are final (already scaled)."""
    def adamw(name, params, lr, betas, wd):
        return dict(kind="adamw", name=name, params=list(params), lr=lr, initial_lr=lr, betas=betas,
                    eps=1e-10, weight_decay=wd)

    groups = [
        adamw("lm_head", model.lm_head.parameters(), lm_head_lr, (0.8, 0.96), 0.01),
        adamw("wte", model.transformer.wte.parameters(), wte_lr, (0.8, 0.995), 0.001),
        adamw("value_embeds", model.value_embeds.parameters(), value_embeds_lr, (0.8, 0.995), 0.01),
        adamw("resid_lambdas", [model.resid_lambdas], resid_lr, (0.8, 0.95), 0.05),
        adamw("x0_lambdas", [model.x0_lambdas], x0_lr, (0.96, 0.95), 0.0),
        adamw("smear", [model.smear_gate.weight, model.smear_lambda, model.backout_lambda], smear_lr,
              (0.8, 0.95), 0.0),
    ]
    ns_dtype = "bfloat16" if getattr(model, "compute_dtype", torch.float32) == torch.bfloat16 else "float32"
    matrices = list(model.transformer.h.parameters())
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", name=f"muon_{shape[0]}x{shape[1]}",
                           params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                           initial_lr=matrix_lr, momentum=muon_momentum, ns_steps=ns_steps, beta2=muon_beta2,
                           weight_decay=weight_decay, ns_dtype=ns_dtype))
    groups = [g for g in groups if g["params"]]
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing or len(covered) != sum(len(g["params"]) for g in groups):
        raise ValueError(f"optimizer groups do not cover each parameter exactly once (missing: {missing})")
    return groups


def build_optimizer(model, plan=None, distributed: bool | None = None, fused_adamw: bool = True,
                    compile_steps: bool = False, **lrs):
    """MuonAdamW (or DistMuonAdamW when distributed; default: a process group of > 1 ranks is up).
    LRs come from `plan` (core.scaling.TrainingPlan), else the reference values at batch 2^19;
    keyword arguments override single entries (see param_groups). compile_steps: see _Schedulable."""
    if plan is not None:
        values = plan.optimizer_lrs()
    else:
        from core.scaling import reference_lrs
        values = reference_lrs(model.config.n_embd)
    unknown = set(lrs) - set(values)
    if unknown:
        raise ValueError(f"build_optimizer: unknown LR settings {sorted(unknown)} (known: {sorted(values)})")
    values.update(lrs)
    groups = param_groups(model, **values)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    cls = DistMuonAdamW if distributed else MuonAdamW
    return cls(groups, fused_adamw=fused_adamw, compile_steps=compile_steps)


def apply_schedule(optimizer, plan, step: int) -> float:
    """Set this step's lr multiplier, Muon momentum and weight decay from the plan; returns lrm."""
    lrm = plan.lr_multiplier(step)
    optimizer.set_schedule(lrm, plan.muon_momentum(step), plan.muon_weight_decay(step))
    return lrm


# ---- re-sharding the optimizer state across process counts (ZeRO-2 layout of DistMuonAdamW) ----------


def unshard_state(states: list[dict], groups: list[dict]) -> dict[int, dict]:
    """Per-rank optimizer state dicts (ZeRO-2 shards, or one full state) -> full single-process state."""
    full, idx = {}, 0
    for g in groups:
        params = g["params"]
        if g["kind"] == "adamw":
            for p in params:
                per = [s["state"].get(idx) for s in states]
                if per[0] is not None:
                    st = dict(per[0])
                    for key in ("exp_avg", "exp_avg_sq"):
                        if st[key].shape != p.shape:  # row shards: rank r holds rows [r*rows, (r+1)*rows)
                            st[key] = torch.cat([s[key] for s in per], 0)
                    full[idx] = st
                idx += 1
        else:  # a Muon group's state lives on its first param: rank r owns matrices [r*chunk, (r+1)*chunk)
            per = [s["state"].get(idx) for s in states]
            if per[0] is not None:
                full[idx] = {k: torch.cat([s[k] for s in per], 0)[:len(params)] for k in per[0]}
            idx += len(params)
    return full


def shard_state(full: dict[int, dict], groups: list[dict], rank: int, world: int) -> dict[int, dict]:
    """Full state -> this rank's shard in the layout of core.optim (MuonAdamW or DistMuonAdamW)."""
    out, idx = {}, 0
    for g in groups:
        params = g["params"]
        if g["kind"] == "adamw":
            for p in params:
                if idx in full:
                    st = dict(full[idx])
                    if world > 1 and not (p.numel() < SMALL_PARAM or p.shape[0] % world):
                        rows = p.shape[0] // world
                        st = {k: (v[rank * rows:(rank + 1) * rows].clone() if k != "step" else v) for k, v in st.items()}
                    out[idx] = st
                idx += 1
        else:
            if idx in full:
                n = len(params)
                chunk = -(-n // world)
                lo, owned = rank * chunk, max(0, min(chunk, n - rank * chunk))
                st = {}
                for k, v in full[idx].items():
                    buf = torch.zeros((chunk, *v.shape[1:]), dtype=v.dtype)
                    buf[:owned] = v[lo:lo + owned]
                    st[k] = buf
                out[idx] = st
            idx += len(params)
    return out
